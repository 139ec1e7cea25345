"""Spike handling on the device (issue 16, item 2): a window of the last losses and grad norms kept
on the device, a z-score test at every step, `--on_spike warn|skip`, no host sync."""

from __future__ import annotations

import json

import pytest
import torch

from bdh_fast.telemetry.grads import GradNorms, SpikeDetector

from test_telemetry import count_host_reads, make_trainer

SPIKE_STEP = 100


def jsonl(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("mode", ["skip", "warn"])
def test_random_bytes_at_step_k_of_a_trained_model_are_flagged_at_k(corpus, tmp_path, mode, capsys):
    trainer = make_trainer(corpus, tmp_path, max_iters=SPIKE_STEP + 4, lr=3e-3, log_train_freq=8, log_freq=1000,
                           on_spike=mode, spike_window=32, ckpt_freq=0)
    try:
        for step in range(1, SPIKE_STEP):
            trainer.run_step(step)
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        real = trainer.data.get_batch
        g = torch.Generator().manual_seed(0)

        def random_bytes(split):  # once: a batch of noise where text was
            trainer.data.get_batch = real
            x = torch.randint(0, 256, (trainer.config.batch_size, trainer.config.block_size + 1), generator=g)
            return x[:, :-1].contiguous(), x[:, 1:].contiguous()

        trainer.data.get_batch = random_bytes
        reads: list[str] = []
        with count_host_reads(reads):
            trainer.train_step(SPIKE_STEP)  # the decision and the skip: on the device
        assert reads == []
        trainer.step = SPIKE_STEP
        unchanged = all(torch.equal(before[n], p) for n, p in trainer.model.named_parameters())
        assert unchanged == (mode == "skip")
        for step in range(SPIKE_STEP + 1, SPIKE_STEP + 5):
            trainer.run_step(step)
    finally:
        trainer.close()
    records = jsonl(tmp_path / "t")
    steps = {r["step"]: r for r in records if "train/loss" in r}
    flagged = [s for s in range(2, SPIKE_STEP + 5) if steps[s]["train/spikes"] > steps[s - 1]["train/spikes"]]
    # Skipped, the noise leaves no trace; applied, its update shakes the next steps' grad norms too.
    assert flagged == [SPIKE_STEP] if mode == "skip" else flagged[0] == SPIKE_STEP, flagged
    assert steps[SPIKE_STEP]["train/loss_zscore"] > 6 and steps[SPIKE_STEP - 1]["train/loss_zscore"] < 6
    alerts = [r for r in records if r.get("event") == "alert"]
    assert [a["step"] for a in alerts] == flagged
    assert f"update {'skipped' if mode == 'skip' else 'applied'}" in alerts[0]["text"]
    assert f"spike at step {SPIKE_STEP}" in capsys.readouterr().out


def test_the_window_keeps_spikes_and_non_finite_values_out():
    p = torch.nn.Parameter(torch.zeros(4))
    norms = GradNorms([("w", p)], {}, torch.device("cpu"))
    spikes = SpikeDetector(torch.device("cpu"), window=8, z=4.0, min_history=4)
    flags = []
    for i, (loss, scale) in enumerate([(2.0, 1.0), (2.1, 1.1), (1.9, 0.9), (2.0, 1.0), (2.05, 1.0),
                                        (9.0, 1.0), (float("nan"), 1.0), (2.0, 40.0), (2.0, 1.0)]):
        p.grad = torch.full((4,), scale / 2)  # grad norm = scale
        row, skip = norms.step_row(torch.tensor(loss), spikes=spikes, skip_spikes=True)
        flags.append(int(row[-3]))
        if i == 7:
            assert skip == 1.0  # a grad-norm spike alone is one
    assert flags == [0, 0, 0, 0, 0, 1, 0, 1, 0]
    assert int(spikes.count) == 6  # the spikes and the NaN never entered the window
    state = spikes.state_dict()
    restored = SpikeDetector(torch.device("cpu"), window=8, z=4.0, min_history=4)
    restored.load_state_dict(state)
    assert torch.equal(restored.history, spikes.history) and int(restored.count) == 6


def test_only_the_grad_norm_votes_under_data_parallel():
    p = torch.nn.Parameter(torch.zeros(4))
    norms = GradNorms([("w", p)], {}, torch.device("cpu"))
    spikes = SpikeDetector(torch.device("cpu"), window=8, z=4.0, min_history=4, loss_votes=False)
    p.grad = torch.ones(4)
    for loss in (2.0, 2.1, 1.9, 2.0, 2.05):
        norms.step_row(torch.tensor(loss), spikes=spikes)
    row, _ = norms.step_row(torch.tensor(50.0), spikes=spikes, skip_spikes=True)  # this rank's loss only
    assert int(row[-3]) == 0 and float(row[-2]) > 4


def test_an_alert_reaches_every_backend_without_dropping_one(tmp_path, monkeypatch):
    from test_backends import wandb_offline_env

    from bdh_fast.logger import Logger

    wandb_offline_env(monkeypatch, tmp_path)
    logger = Logger("jsonl,tensorboard,wandb", log_dir=tmp_path / "run", wandb_mode="offline")
    logger.log_alert("loss spike", "loss or grad-norm spike at step 7", 7)
    assert logger.finish() and logger.failed == []
    assert [r for r in jsonl(tmp_path / "run") if r.get("event") == "alert"] == [
        {"step": 7, "event": "alert", "title": "loss spike", "text": "loss or grad-norm spike at step 7"}]
