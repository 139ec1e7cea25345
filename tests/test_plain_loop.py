"""examples/plain_loop.py: a plain PyTorch loop gains the monitoring with five lines, and those lines
read nothing on the host between flushes (DESIGN.md invariant 1, as test_telemetry checks the CLI)."""

from __future__ import annotations

import ast
import pathlib
import runpy
import subprocess
import sys

import pytest

from bdh_fast.telemetry.seam import Telemetry

from test_backends import load_tensorboard
from test_telemetry import count_host_reads
from test_train import metric_records

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "plain_loop.py"
STEPS = 12


def telemetry_lines(source: str) -> list[int]:
    """Line numbers (1-based) of the code lines that mention telemetry, the docstring left out."""
    body_starts = ast.parse(source).body[1].lineno  # after the module docstring
    return [i for i, line in enumerate(source.splitlines(), start=1)
            if i >= body_starts and "telemetry" in line.lower()]


@pytest.fixture(scope="module")
def run(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("plain") / "run"
    proc = subprocess.run([sys.executable, str(EXAMPLE), "--data", str(corpus), "--out_dir", str(out),
                           "--max_iters", str(STEPS)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout


def test_the_plain_loop_logs_every_step_to_tensorboard_and_jsonl(run):
    out, stdout = run
    records = metric_records(out)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for r in records:
        assert {"train/loss", "train/lr", "train/grad_norm", "train/grad_norm/encoder", "perf/step_ms",
                "perf/tokens_per_sec"} <= set(r)
    assert records[-1]["train/loss"] < records[0]["train/loss"]  # it learns
    assert [e.step for e in load_tensorboard(str(out)).Scalars("train/grad_norm")] == list(range(1, STEPS + 1))
    assert f"Step: {STEPS}/{STEPS} loss" in stdout and "To be or " in stdout


def test_the_monitoring_is_five_lines_and_the_loop_runs_without_them(corpus, tmp_path):
    source = EXAMPLE.read_text()
    added = telemetry_lines(source)
    assert len(added) == 5, [source.splitlines()[i - 1] for i in added]
    plain = tmp_path / "plain_loop_without_telemetry.py"
    plain.write_text("\n".join(line for i, line in enumerate(source.splitlines(), start=1) if i not in added))
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(plain), "--data", str(corpus), "--out_dir", str(out),
                           "--max_iters", "3"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Training done" in proc.stdout and "Step:" not in proc.stdout
    assert not out.exists()


def test_the_added_lines_read_nothing_on_the_host_between_flushes(corpus, tmp_path, monkeypatch, capsys):
    """Host reads are counted inside the loop's telemetry calls, except at their sync points."""
    reads: list[str] = []
    paused = {"on": True}
    flushed_at: list[int] = []

    def counted(fn, on: bool):
        def wrapper(self, *args, **kwargs):
            before, paused["on"] = paused["on"], not on
            try:
                return fn(self, *args, **kwargs)
            finally:
                paused["on"] = before
        return wrapper

    real_flush = Telemetry.flush
    monkeypatch.setattr(Telemetry, "after_backward", counted(Telemetry.after_backward, on=True))
    monkeypatch.setattr(Telemetry, "step", counted(Telemetry.step, on=True))
    monkeypatch.setattr(Telemetry, "flush", counted(lambda self: flushed_at.append(self.current_step) or
                                                    real_flush(self), on=False))
    for sync_point in ("probe", "evaluate", "log_samples"):
        monkeypatch.setattr(Telemetry, sync_point, counted(getattr(Telemetry, sync_point), on=False))
    monkeypatch.setattr(sys, "argv", [str(EXAMPLE), "--data", str(corpus), "--out_dir", str(tmp_path / "run"),
                                      "--max_iters", str(STEPS)])
    with count_host_reads(reads, paused):
        runpy.run_path(str(EXAMPLE), run_name="__main__")
    assert reads == []
    assert flushed_at[:2] == [10, STEPS]  # a full window, then the last step (close() flushes nothing more)
    assert f"Step: {STEPS}/{STEPS} loss" in capsys.readouterr().out
