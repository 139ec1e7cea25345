"""Memory over a long run: host RSS is logged at every flush (`system/host_rss_gb`), and nothing the
telemetry keeps grows with the number of steps (issue 16, item 6): the writer's queue, the timer's
marks, the step buffer, the host RSS itself."""

from __future__ import annotations

import torch

from bdh_fast.model import BDH, BDHConfig
from bdh_fast.telemetry import Telemetry
from bdh_fast.telemetry.system import host_rss_gb

from test_backends import read_jsonl

TINY = BDHConfig(n_layer=1, n_embd=16, n_head=1, mlp_internal_dim_multiplier=4, dropout=0.0)
WINDOW = 4


def test_many_flush_windows_leave_every_store_flat(tmp_path):
    torch.manual_seed(0)
    model = BDH(TINY)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, 256, (2, 8))
    steps = 600
    telemetry = Telemetry(model, optimizer, log_dir=tmp_path, max_iters=steps, log_train_freq=WINDOW,
                          log_freq=10_000, tokens_per_step=16, log_backend="jsonl,tensorboard")
    rss, queued = {}, []
    for step in range(1, steps + 1):
        _, loss = model(x, x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        telemetry.after_backward(loss)
        optimizer.step()
        telemetry.step(step)
        assert len(telemetry.buffer) < WINDOW and len(telemetry.timer.marks) < WINDOW
        queued.append(telemetry.logger.queued_values)
        if step in (200, steps):
            telemetry.logger.flush(timeout=60)
            rss[step] = host_rss_gb()
    telemetry.close()
    # Every window reached the writer process: nothing piled up in this one.
    assert max(queued) < 20 * WINDOW * len(telemetry.buffer.names)
    assert rss[steps] - rss[200] < 0.03, rss  # 400 more steps, 100 more windows: < 30 MiB (allocator noise)
    records = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "train/loss" in r]
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    windows = [r["system/host_rss_gb"] for r in records if "system/host_rss_gb" in r]
    assert len(windows) == steps // WINDOW and all(0 < v < 1024 for v in windows)
