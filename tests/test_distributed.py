"""torchrun with 2 CPU ranks (Gloo): one set of logs, losses averaged over ranks with one collective
per flush, sharded evaluation, resume, and a failing rank named."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from test_train import metric_records

WORKER = pathlib.Path(__file__).with_name("ddp_worker.py")


def torchrun(corpus, out_dir, name, *extra, fail_at=None, timeout=300, nproc=2):
    env = {**os.environ, "BDH_TEST_OUT": str(out_dir), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(WORKER.parent)}
    if fail_at:
        env["BDH_TEST_FAIL_AT"] = fail_at
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(WORKER), "--preset", "tiny", "--no-compile", "--data", str(corpus), "--out_dir", str(out_dir),
           "--run_name", name, "--no_progress", "--nvml_interval", "0", "--log_train_freq", "4",
           "--probe_freq", "0", "--generate_freq", "0", *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def ddp_run(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    proc = torchrun(corpus, out, "run", "--max_iters", "12", "--eval_freq", "6", "--eval_iters", "3",
                    "--ckpt_freq", "6", "--peak_tflops", "1.0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_one_set_of_logs_and_the_world_size_recorded(ddp_run):
    out, proc = ddp_run
    run_dir = out / "run"
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1
    assert len(list(run_dir.rglob("metrics.jsonl"))) == 1
    config = json.loads((run_dir / "config.json").read_text())
    assert config["world_size"] == 2 and config["effective_batch_size"] == 2 * config["batch_size"]
    assert "2 data-parallel ranks: effective batch 16" in proc.stdout
    assert proc.stdout.count("Training done") == 1  # only rank 0 prints


def test_logged_loss_is_the_mean_of_the_ranks_with_one_collective_per_flush(ddp_run):
    out, _ = ddp_run
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    local = [{s: l for f in flushes for s, l in zip(f["steps"], f["local_loss"])} for flushes in ranks]
    assert local[0].keys() == local[1].keys() == set(range(1, 13))
    assert any(local[0][s] != local[1][s] for s in local[0])  # each rank drew its own batches
    logged = {r["step"]: r["train/loss"] for r in metric_records(out / "run")}
    for step, value in logged.items():
        assert value == pytest.approx((local[0][step] + local[1][step]) / 2, rel=1e-6)
    for flushes in ranks:
        assert all(f["collectives"] == 1 for f in flushes), flushes


def test_sharded_evaluation_is_logged_once(ddp_run):
    out, _ = ddp_run
    evals = [r for r in metric_records(out / "run", key="val/loss")]
    assert [r["step"] for r in evals] == [6, 12]
    assert all(r["val/loss"] > 0 and 0 <= r["val/accuracy"] <= 1 for r in evals)


def test_resume_under_torchrun(ddp_run, corpus):
    out, _ = ddp_run
    proc = subprocess.run([sys.executable, "-c", "pass"])  # keep the fixture's files as they are
    assert proc.returncode == 0
    resumed = torchrun(corpus, out, "ignored", "--resume", str(out / "run"), "--max_iters", "16")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    steps = [r["step"] for r in metric_records(out / "run")]
    assert steps == list(range(1, 17))


def test_a_failing_rank_fails_the_job_and_is_named(corpus, tmp_path):
    proc = torchrun(corpus, tmp_path, "fail", "--max_iters", "40", "--eval_freq", "0", fail_at="1:6")
    assert proc.returncode != 0
    assert "bdh_fast: rank 1 failed" in proc.stderr
    steps = [r["step"] for r in metric_records(tmp_path / "fail")]
    assert steps[:4] == [1, 2, 3, 4]  # what rank 0 had was flushed


def test_no_collective_in_a_training_step(ddp_run):
    """DDP's gradient all-reduce (in its C++ reducer) is the only per-step collective: no buffer
    broadcast, nothing of ours; each flush makes one (checked above)."""
    out, _ = ddp_run
    for rank in (0, 1):
        per_step = json.loads((out / f"rank{rank}-steps.json").read_text())
        assert per_step and set(per_step.values()) == {0}, per_step


def test_more_ranks_than_evaluation_batches_completes(corpus, tmp_path):
    proc = torchrun(corpus, tmp_path, "r3", "--max_iters", "8", "--eval_freq", "4", "--eval_iters", "2",
                    "--ckpt_freq", "0", nproc=3, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    evals = metric_records(tmp_path / "r3", key="val/loss")
    assert [r["step"] for r in evals] == [4, 8] and all(r["val/loss"] > 0 for r in evals)


def test_interrupted_and_resumed_two_rank_run_with_dropout_equals_the_straight_one(corpus, tmp_path):
    import torch

    common = ("--dropout", "0.1", "--eval_freq", "0", "--ckpt_freq", "5")
    straight = torchrun(corpus, tmp_path / "a", "s", "--max_iters", "10", *common)
    assert straight.returncode == 0, straight.stderr[-3000:]
    first = torchrun(corpus, tmp_path / "b", "s", "--max_iters", "5", *common)
    assert first.returncode == 0, first.stderr[-3000:]
    second = torchrun(corpus, tmp_path / "b", "s", "--resume", str(tmp_path / "b" / "s"), "--max_iters", "10")
    assert second.returncode == 0, second.stderr[-3000:]
    want = torch.load(tmp_path / "a" / "s" / "ckpt.pt", weights_only=True)["model"]
    got = torch.load(tmp_path / "b" / "s" / "ckpt.pt", weights_only=True)["model"]
    assert max((got[k] - want[k]).abs().max().item() for k in want) <= 1e-6
    losses = [metric_records(tmp_path / d / "s") for d in ("a", "b")]
    assert [r["step"] for r in losses[1]] == list(range(1, 11))
    assert [r["train/loss"] for r in losses[1]] == pytest.approx([r["train/loss"] for r in losses[0]], rel=1e-6)


def test_mfu_is_per_gpu(ddp_run):
    """perf/tokens_per_sec counts every rank's tokens; MFU divides by every rank's peak."""
    out, _ = ddp_run
    config = json.loads((out / "run" / "config.json").read_text())
    rows = [r for r in metric_records(out / "run", key="perf/mfu")]
    assert rows
    for r in rows:
        want = config["flops_per_token"] * r["perf/tokens_per_sec"] / (1.0e12 * 2)
        assert r["perf/mfu"] == pytest.approx(want, rel=1e-9)
