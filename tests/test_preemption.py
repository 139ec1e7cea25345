"""Preemption, tried as a cluster does it: SIGTERM / SIGINT / kill -9 at random moments of a real
`python -m bdh_fast.train` process (start-up, data, forward, backward, optimizer, flush, evaluation,
sampling, probes, checkpoint), then `--resume`. The resumed run must equal the uninterrupted one:
final weights (fp32, dropout on) to 1e-6, every step exactly once in JSONL and TensorBoard with the
same loss, every evaluation. A signal ends the run at a step boundary with exit status 130 and one
line saying how to resume; kill -9 loses at most the steps after the last checkpoint (and a run
killed before its first checkpoint starts over under --resume).

BDH_PREEMPT_TRIALS (default 4 per kind) sets how many random moments each kind gets.
"""

from __future__ import annotations

import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

STEPS = 48
TRIALS = int(os.environ.get("BDH_PREEMPT_TRIALS", "4"))


def flags(corpus, out: pathlib.Path, name: str, backends: str = "jsonl,tensorboard,wandb") -> list[str]:
    return ["--preset", "tiny", "--no-compile", "--data", str(corpus), "--out_dir", str(out), "--run_name", name,
            "--no_progress", "--nvml_interval", "0", "--dropout", "0.1", "--max_iters", str(STEPS),
            "--log_train_freq", "4", "--log_freq", "8", "--ckpt_freq", "8", "--eval_freq", "12", "--eval_iters", "2",
            "--generate_freq", "24", "--sample_tokens", "8", "--probe_freq", "16",
            "--log_backend", backends, "--wandb_mode", "offline"]


def train_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "bdh_fast.train", *args]


def env() -> dict[str, str]:
    wandb_home = pathlib.Path(os.environ.get("PYTEST_WANDB_HOME", "/tmp/bdh-preempt-wandb"))
    # Each trainer starts its own wandb-core, as a job launched from a shell does: not pytest's, which an
    # in-process W&B test leaves in WANDB_SERVICE (that case is tested in test_backends.py).
    inherited = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    return {**inherited, "OMP_NUM_THREADS": "1",  # the same math in every process
            "WANDB_SILENT": "true", "WANDB_INIT_TIMEOUT": "600",  # a loaded 2-core CI machine is slow
            "WANDB_CACHE_DIR": str(wandb_home / "cache"),
            "WANDB_CONFIG_DIR": str(wandb_home / "config"), "WANDB_DATA_DIR": str(wandb_home / "data")}


def wandb_rows(run_dir: pathlib.Path) -> list[dict]:
    """Every history row of every W&B segment of the run, read with wandb's own reader."""
    from bdh_fast.telemetry.backends import wandb_history

    run_id = (run_dir / "wandb_id.txt").read_text().strip()
    return [row for log in wandb_history.transaction_logs(run_dir, run_id)
            for row in wandb_history.history_items(log)]


def jsonl(run_dir: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def per_step(records: list[dict], key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in records if key in r]


def tensorboard_steps(run_dir: pathlib.Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def weights(run_dir: pathlib.Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "ckpt.pt", weights_only=True)["model"]


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    run_dir = out / "r"
    t0 = time.perf_counter()
    # With the trials' own backends, so its timeline (start-up, training, exit) is theirs too.
    proc = subprocess.Popen(train_cmd(*flags(corpus, out, "r")), env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    while proc.poll() is None and not (run_dir / "config.json").exists():
        time.sleep(0.02)
    started = time.perf_counter() - t0  # the Trainer is built: the loop is about to start
    _, err = proc.communicate(timeout=600)
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, err[-3000:]
    return {"dir": run_dir, "started": started, "wall": wall, "records": jsonl(run_dir), "weights": weights(run_dir)}


def assert_equals_reference(run_dir: pathlib.Path, reference: dict, what: str) -> None:
    records = jsonl(run_dir)
    ref = reference["records"]
    steps = [s for s, _ in per_step(records, "train/loss")]
    assert steps == list(range(1, STEPS + 1)), f"{what}: steps {steps}"
    for key in ("train/loss", "train/grad_norm", "val/loss", "train/loss_eval", "model/param_norm/embed"):
        got, want = per_step(records, key), per_step(ref, key)
        assert [s for s, _ in got] == [s for s, _ in want], f"{what}: {key} steps"
        for (step, a), (_, b) in zip(got, want):
            assert a == pytest.approx(b, rel=1e-5, abs=1e-6), f"{what}: {key} at step {step}: {a} vs {b}"
    samples = [(r["step"], r["rows"]) for r in records if r.get("name") == "samples"]
    assert samples == [(r["step"], r["rows"]) for r in ref if r.get("name") == "samples"], what
    assert [s for s, _ in samples] == [24, 48], what
    tb = tensorboard_steps(run_dir, "train/loss")
    assert [s for s, _ in tb] == list(range(1, STEPS + 1)), f"{what}: TensorBoard steps {[s for s, _ in tb]}"
    tb_eval = [s for s, _ in tensorboard_steps(run_dir, "val/loss")]
    assert tb_eval == [s for s, _ in per_step(ref, "val/loss")], f"{what}: TensorBoard evaluations {tb_eval}"
    rows = wandb_rows(run_dir)
    for key in ("train/loss", "val/loss"):
        got = sorted((r["step"], r[key]) for r in rows if key in r)  # every row of every segment
        want = per_step(ref, key)
        assert [s for s, _ in got] == [s for s, _ in want], f"{what}: W&B {key} steps {[s for s, _ in got]}"
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-5, abs=1e-6), what
    assert sorted(r["step"] for r in rows if "samples.nrows" in r) == [s for s, _ in samples], what
    got_w = weights(run_dir)
    for name, value in reference["weights"].items():
        diff = (got_w[name] - value).abs().max().item()
        assert diff <= 1e-6, f"{what}: {name} differs by {diff}"


def interrupt_then_resume(corpus, tmp_path, reference, kind: int, delay: float) -> dict:
    out = tmp_path / f"{signal.Signals(kind).name}-{delay:.2f}"
    proc = subprocess.Popen(train_cmd(*flags(corpus, out, "r")), env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    time.sleep(delay)
    proc.send_signal(kind)
    _, err = proc.communicate(timeout=600)
    run_dir = out / "r"
    result = {"kind": signal.Signals(kind).name, "delay": round(delay, 2), "rc": proc.returncode}
    if kind == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
    elif proc.returncode == -kind and not out.exists():
        # Python's own start-up, before bdh_fast.train's first line could install a handler: nothing ran.
        result["before_start"] = True
        proc = subprocess.run(train_cmd(*flags(corpus, out, "r")), env=env(), capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    elif proc.returncode == -kind:
        # Python's own shutdown, after main() returned (the interpreter resets handlers as it exits):
        # the run must have finished and written everything.
        assert torch.load(run_dir / "ckpt.pt", weights_only=True)["step"] == STEPS, err[-2000:]
        result["finished_first"] = True
        proc.returncode = 0
    elif proc.returncode == 0:
        result["finished_first"] = True  # the signal came after the run ended
    else:
        assert proc.returncode == 130, err[-3000:]
        lines = [line for line in err.splitlines() if "--resume" in line]
        assert len(lines) == 1 and f"--resume {run_dir}" in lines[0], err[-2000:]
        saved = torch.load(run_dir / "ckpt.pt", weights_only=True)["step"]
        logged = [s for s, _ in per_step(jsonl(run_dir), "train/loss")]
        assert logged == list(range(1, saved + 1)), (saved, logged)  # stopped at a step boundary, all logged
        result["stopped_at"] = saved
    if proc.returncode != 0:
        # What a preemption script runs: the same command plus --resume.
        resumed = subprocess.run(train_cmd(*flags(corpus, out, "r"), "--resume", str(run_dir)), env=env(),
                                 capture_output=True, text=True, timeout=600)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        result["restarted"] = "starting it" in resumed.stdout
        warnings = [line for line in resumed.stderr.splitlines() if line.startswith("warning")]
        assert not warnings, (result, warnings)  # every backend started and kept working
    assert_equals_reference(run_dir, reference, str(result))
    return result


@pytest.mark.parametrize("kind", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL], ids=lambda k: k.name)
def test_interrupted_at_random_moments_then_resumed_equals_uninterrupted(corpus, tmp_path, reference, kind):
    rng = random.Random(f"{kind}-{TRIALS}")
    # One moment in start-up (imports, building the model and backends), the rest in the loop
    # (steps, flushes, evaluations, samples, probes, checkpoints) and its end.
    started, wall = reference["started"], reference["wall"]
    delays = [rng.uniform(0.2, started)] + sorted(rng.uniform(started, wall * 0.95) for _ in range(TRIALS - 1))
    results = [interrupt_then_resume(corpus, tmp_path, reference, kind, d) for d in delays]
    print(json.dumps(results))
    if kind != signal.SIGKILL:
        assert sum("stopped_at" in r for r in results) >= max(1, TRIALS // 2), results


def test_a_fresh_run_refuses_a_directory_with_an_earlier_run(corpus, tmp_path):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "train/loss": 5.0}\n')
    proc = subprocess.run(train_cmd(*flags(corpus, tmp_path, "r")), env=env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]  # one line
    assert "already holds a run" in proc.stderr and "--resume" in proc.stderr
    assert (run_dir / "metrics.jsonl").read_text() == '{"step": 1, "train/loss": 5.0}\n'  # untouched
