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


@pytest.mark.compiled
def test_run_all_quick_subset(tmp_path):
    """run_all runs the named benchmarks as subprocesses and files one JSON and one markdown summary."""
    proc = subprocess.run([sys.executable, "bench/run_all.py", "--quick", "--only", "overhead_matrix,stats",
                           "--out_dir", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, f"run_all exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    (json_path,), (md_path,) = list(tmp_path.glob("*.json")), list(tmp_path.glob("*.md"))
    summary = json.loads(json_path.read_text())
    assert summary["bench"] == "run_all" and summary["quick"] is True and summary["failed"] == []
    assert [e["name"] for e in summary["results"]] == ["overhead_matrix", "stats"]
    records = {e["name"]: e["record"] for e in summary["results"]}
    matrix = records["overhead_matrix"]
    assert matrix["bench"] == "overhead_matrix" and matrix["preset"] == "tiny"
    names = [row["row"] for row in matrix["rows"]]
    assert names[:3] == ["log_train_freq 1", "log_train_freq 10", "log_train_freq 100"]
    assert any("wandb" in n for n in names) and "probes" in names and any("nvml" in n for n in names)
    for row in matrix["rows"]:
        assert row["verdict"] in ("GOAL", "PASS", "FAIL", "SKIPPED", "N/A"), row
        if row["status"] == "ok":
            assert row["median_ms"] > 0 and math.isfinite(row["overhead_pct"])
    assert records["stats"]["bench"] == "stats" and records["stats"]["speedup_cpu"] > 0
    assert_machine(summary)
    text = md_path.read_text()
    assert "| benchmark | key figure | target | verdict |" in text
    assert "overhead matrix" in text and "stats" in text and "Machine:" in text
