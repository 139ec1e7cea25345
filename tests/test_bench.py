"""The benchmark harnesses run end to end (`--quick`: tiny preset, a block or two, no gate) and end
stdout with one JSON line carrying their numbers. Timings here are not checked: a test machine is
noisy; bench/results/ holds the real runs."""

import json
import math
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
TIMEOUT_S = 900  # torch.compile of the tiny model on a loaded 2-core CPU


def run_quick(script: str) -> dict:
    proc = subprocess.run([sys.executable, f"bench/{script}", "--quick"], cwd=REPO, capture_output=True,
                          text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, f"{script} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    lines = proc.stdout.strip().splitlines()
    assert lines, f"{script} printed nothing"
    record = json.loads(lines[-1])  # the last stdout line is the machine-readable result
    assert isinstance(record, dict)
    return record


def assert_positive(record: dict, keys: list[str]) -> None:
    for key in keys:
        value = record[key]
        assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (key, value)


def assert_machine(record: dict) -> None:
    machine = record["machine"]
    assert machine["cpu"] and machine["torch"] and machine["date"]
    assert machine["cores"] >= 1


@pytest.mark.compiled
def test_throughput_quick():
    record = run_quick("throughput.py")
    assert record["bench"] == "throughput"
    assert record["preset"] == "tiny" and record["quick"] is True
    assert record["device"] in ("cpu", "cuda")
    assert_positive(record, ["eager_tokens_per_s", "compiled_tokens_per_s", "speedup", "compile_s"])
    assert record["mfu"] is None or 0 < record["mfu"] < 1
    assert "mfu" in record
    assert_machine(record)


@pytest.mark.compiled
def test_overhead_quick():
    record = run_quick("overhead.py")
    assert record["bench"] == "overhead"
    assert record["preset"] == "tiny" and record["quick"] is True
    assert record["device"] in ("cpu", "cuda")
    assert_positive(record, ["bare_ms", "full_ms", "naive_ms", "compile_s"])
    for key in ("full_overhead_pct", "naive_overhead_pct"):
        assert isinstance(record[key], float) and math.isfinite(record[key])
    assert record["verdict_full"] in ("GOAL", "PASS", "FAIL")
    # the full variant really ran bdh_fast's telemetry: its steps reached metrics.jsonl
    assert record["full_steps_logged"] > 0
    assert_machine(record)
