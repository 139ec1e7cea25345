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


def torchrun(corpus, out_dir, name, *extra, fail_at=None, timeout=300):
    env = {**os.environ, "BDH_TEST_OUT": str(out_dir), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(WORKER.parent)}
    if fail_at:
        env["BDH_TEST_FAIL_AT"] = fail_at
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(WORKER), "--preset", "tiny", "--no-compile", "--data", str(corpus), "--out_dir", str(out_dir),
           "--run_name", name, "--no_progress", "--nvml_interval", "0", "--log_train_freq", "4",
           "--probe_freq", "0", "--generate_freq", "0", *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def ddp_run(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    proc = torchrun(corpus, out, "run", "--max_iters", "12", "--eval_freq", "6", "--eval_iters", "3",
                    "--ckpt_freq", "6")
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
