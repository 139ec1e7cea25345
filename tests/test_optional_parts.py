"""DESIGN.md invariant 9: an optional part that fails never ends a training run. Each failure is
injected on CPU (a probe that raises, a profiler that raises, a memory snapshot that cannot record
or dump); the run completes, says so in exactly one warning line, and every step's metrics still
reach the logs. The Triton kernels' gate is tested in test_ops.py, NVML in test_system.py."""

from __future__ import annotations

import pathlib

import pytest
import torch

from bdh_fast import train
from bdh_fast.telemetry import probes as probes_mod
from bdh_fast.telemetry import profiling

from test_train import metric_records, tiny_args

STEPS = 8


def run(corpus, out: pathlib.Path, *extra: str) -> pathlib.Path:
    assert train.main(tiny_args(corpus, out, "r", "--max_iters", str(STEPS), "--log_train_freq", "2",
                                "--eval_freq", "0", "--generate_freq", "0", *extra)) == 0
    return out / "r"


def warnings_about(stderr: str, part: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("warning:") and part in line]


def assert_every_step_logged(run_dir: pathlib.Path) -> None:
    assert [r["step"] for r in metric_records(run_dir)] == list(range(1, STEPS + 1))


def test_histogram_kernel_that_raises_turns_probes_off_once(corpus, tmp_path, capsys, monkeypatch):
    calls = []

    def broken(x, bins=64):
        calls.append(bins)
        raise RuntimeError("triton: out of shared memory")

    monkeypatch.setattr(probes_mod, "tensor_stats", broken)
    run_dir = run(corpus, tmp_path, "--probe_freq", "2", "--metrics", "full")  # full: the histograms too
    lines = warnings_about(capsys.readouterr().err, "model probes")
    assert len(lines) == 1 and "out of shared memory" in lines[0] and "step 2" in lines[0], lines
    assert len(calls) == 1  # off after the first failure, never tried again
    assert_every_step_logged(run_dir)
    assert not metric_records(run_dir, "model/param_norm/embed")


def test_probe_collect_that_raises_turns_probes_off_once(corpus, tmp_path, capsys, monkeypatch):
    def broken(self):
        raise ValueError("probe exploded")

    monkeypatch.setattr(probes_mod.Probes, "collect", broken)
    run_dir = run(corpus, tmp_path, "--probe_freq", "2")
    lines = warnings_about(capsys.readouterr().err, "model probes")
    assert len(lines) == 1 and "probe exploded" in lines[0]
    assert_every_step_logged(run_dir)


def test_probes_that_work_still_log(corpus, tmp_path, capsys):
    run_dir = run(corpus, tmp_path, "--probe_freq", "4")
    assert not warnings_about(capsys.readouterr().err, "probes")
    assert [r["step"] for r in metric_records(run_dir, "model/param_norm/embed")] == [4, 8]


def test_profiler_that_raises_at_a_step_is_turned_off(corpus, tmp_path, capsys, monkeypatch):
    def broken(self):
        raise RuntimeError("CUPTI_ERROR_NOT_INITIALIZED")

    monkeypatch.setattr(torch.profiler.profile, "step", broken)
    run_dir = run(corpus, tmp_path, "--profile")
    lines = warnings_about(capsys.readouterr().err, "profiler")
    assert len(lines) == 1 and "CUPTI_ERROR_NOT_INITIALIZED" in lines[0]
    assert_every_step_logged(run_dir)


def test_profiler_that_cannot_start_is_off(corpus, tmp_path, capsys, monkeypatch):
    def broken(self):
        raise RuntimeError("profiler already running in this process")

    monkeypatch.setattr(torch.profiler.profile, "start", broken)
    run_dir = run(corpus, tmp_path, "--profile")
    assert len(warnings_about(capsys.readouterr().err, "profiler")) == 1
    assert_every_step_logged(run_dir)


@pytest.mark.parametrize("fails", ["record", "dump"])
def test_memory_snapshot_failure_warns_once_and_is_off(tmp_path, capsys, monkeypatch, fails):
    """The snapshot is CUDA-only; its failure paths are driven with the CUDA calls replaced."""
    calls = []

    def record(*args, **kwargs):
        calls.append(("record", kwargs))
        if fails == "record" and kwargs.get("enabled", "state") != None:  # noqa: E711
            raise RuntimeError("record_memory_history: not supported")

    def dump(path):
        calls.append(("dump", path))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch.cuda.memory, "_record_memory_history", record)
    monkeypatch.setattr(torch.cuda.memory, "_dump_snapshot", dump)
    printed = []
    snapshot = profiling.MemorySnapshot(tmp_path, torch.device("cuda"), 2, printed.append)
    for _ in range(5):
        snapshot.step()
    lines = warnings_about(capsys.readouterr().err, "memory snapshot")
    assert len(lines) == 1, lines
    assert ("not supported" if fails == "record" else "No space left") in lines[0]
    assert printed == []  # no "memory snapshot: <path>" claim for a file that was not written
    assert [c[0] for c in calls].count("dump") == (0 if fails == "record" else 1)
    assert calls[-1] == ("record", {"enabled": None})  # recording stopped
