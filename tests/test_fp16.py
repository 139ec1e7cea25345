"""fp16 with a GradScaler whose first scale overflows (as GradScaler does on purpose while it looks
for a scale): the run keeps training, logs the scale and the steps the scaler skipped, and never
refuses a checkpoint for a step the scaler skipped itself."""

from __future__ import annotations

import pytest
import torch

from bdh_fast import train
from bdh_fast.config import resolve

from test_train import metric_records

STEPS = 30
HUGE_SCALE = 2.0 ** 30  # fp16 gradients overflow until the scaler has halved it ~15 times


def fp16_trainer(corpus, tmp_path, on_nonfinite):
    config = resolve(dict(preset="tiny", compile=False, data=str(corpus), out_dir=str(tmp_path), run_name="h",
                          progress=False, nvml_interval=0.0, log_backend="jsonl", eval_freq=0, generate_freq=0,
                          probe_freq=0, ckpt_freq=10, dtype="float16", max_iters=STEPS, log_train_freq=5,
                          on_nonfinite=on_nonfinite), cuda_available=torch.cuda.is_available())
    trainer = train.Trainer(config, None)
    assert trainer.scaler is not None
    trainer.scaler = torch.amp.GradScaler(trainer.device.type, init_scale=HUGE_SCALE)
    return trainer


@pytest.mark.parametrize("on_nonfinite", ["stop", "warn"])
def test_overflowing_scaler_keeps_training_and_checkpointing(corpus, tmp_path, capsys, on_nonfinite):
    trainer = fp16_trainer(corpus, tmp_path, on_nonfinite)
    try:
        assert trainer.fit()
        trainer.save_checkpoint()
    finally:
        trainer.close()
    rows = metric_records(tmp_path / "h")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    skipped = [r["step"] for r in rows if r["train/scaler_skipped"]]
    scales = [r["train/grad_scale"] for r in rows]
    assert skipped[:3] == [1, 2, 3] and len(skipped) < STEPS - 5, skipped  # overflow first, then it trains
    assert scales[0] == HUGE_SCALE and scales[-1] < HUGE_SCALE / 2 ** 5
    assert all(b <= a for a, b in zip(scales, scales[1:skipped[-1]]))  # halved at each skip
    finite = [r["train/loss"] for r in rows]
    assert finite[-1] < finite[0]  # it learned once the scale fit
    assert "not saving a checkpoint" not in capsys.readouterr().out
    assert torch.load(tmp_path / "h" / "ckpt.pt", weights_only=True)["step"] == STEPS
