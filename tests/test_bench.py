"""The benchmark harnesses run end to end (`--quick`: tiny preset, a block or two, no gate) and end
stdout with one JSON line carrying their numbers; the verdict rule says "unresolved" when the noise
is wider than the target; run_all fails on a failed target. Timings here are not checked: a test
machine is noisy; bench/results/ holds the real runs."""

import json
import math
import os
import pathlib
import re
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import run_all  # noqa: E402
import targets  # noqa: E402

TIMEOUT_S = 900  # torch.compile of the tiny model on a loaded 2-core CPU
SCRIPTS = ("throughput.py", "overhead.py", "stats.py", "generate.py", "probes.py", "ddp.py")
VERDICTS = ("GOAL", "PASS", "FAIL", "unresolved", "reported")


def bench_env() -> dict:
    """The scripts run as `python bench/X.py`: the checkout importable whatever the install."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


def run_quick(script: str, *extra: str) -> dict:
    proc = subprocess.run([sys.executable, f"bench/{script}", "--quick", *extra], cwd=REPO, capture_output=True,
                          text=True, timeout=TIMEOUT_S, env=bench_env())
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
    assert_positive(record, ["bare_ms", "full_ms", "full_neurons_ms", "naive_ms", "compile_s"])
    for key in ("full_overhead_pct", "naive_overhead_pct", "neuron_stats_overhead_pct"):
        assert isinstance(record[key], float) and math.isfinite(record[key])
    assert record["verdict_full"] in VERDICTS
    # the neuron statistics' row: full against full without them, judged against its own target; and
    # counted: compiled, inductor fuses their reductions into the model's kernels (no launch added)
    assert {v["target"] for v in record["verdicts"]} & {"neuron_stats", "neuron_stats_reference"}
    assert record["neuron_stats_extra_launches"] == 0, record["neuron_stats_model_launches"]
    # the full variant really ran bdh_fast's telemetry: its steps reached metrics.jsonl
    assert record["full_steps_logged"] > 0
    assert_launch_rows(record)
    assert_machine(record)


def assert_launch_rows(record: dict) -> None:
    """The launch-bound rows: the writer row measured, the launches counted (compiled and eager)."""
    assert isinstance(record["writer_overhead_pct"], float) and math.isfinite(record["writer_overhead_pct"])
    lo, hi = record["writer_paired_range_pct"]
    assert lo <= hi
    assert record["writer_row"]["ops_per_window"] >= 1000 and record["writer_row"]["metrics_per_step"] == 16
    assert "telemetry_launches_per_step" in record and record["telemetry_launches_note"]
    launches, eager = record["telemetry_launches_per_step"], record["telemetry_launches_eager_per_step"]
    assert 0 < launches <= 6 < eager  # counted: the compiled row function folds the eager ops
    judged = {v["target"]: v for v in record["verdicts"]}
    assert judged["writer"]["verdict"] in VERDICTS and judged["writer"]["quick"] is True


def test_overhead_writer_only_quick_fills_the_launch_bound_keys():
    """`--quick --writer_only`: no model timing, seconds; the last line still carries both keys."""
    record = run_quick("overhead.py", "--writer_only")
    assert record["bench"] == "overhead" and record["quick"] is True
    assert_launch_rows(record)


@pytest.mark.compiled
def test_run_all_quick_subset(tmp_path):
    """run_all runs the named benchmarks as subprocesses and files one JSON and one markdown summary."""
    proc = subprocess.run([sys.executable, "bench/run_all.py", "--quick", "--only", "overhead_matrix,stats",
                           "--out_dir", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT_S,
                          env=bench_env())
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
        assert row["verdict"] in (*VERDICTS, "SKIPPED", "N/A"), row
        if row["status"] == "ok":
            assert row["median_ms"] > 0 and math.isfinite(row["overhead_pct"])
    assert records["stats"]["bench"] == "stats" and records["stats"]["speedup_cpu"] > 0
    assert_machine(summary)
    text = md_path.read_text()
    assert "| benchmark | claim | figure | target | verdict |" in text
    assert "overhead_matrix" in text and "stats" in text and "Machine:" in text


# --- the verdict rule -------------------------------------------------------------------------


@pytest.mark.parametrize("value, paired, verdict", [
    (0.5, [-11.0, 14.0], "unresolved"),  # the case: a range far wider than the 3% target
    (10.5, [-11.0, 14.0], "unresolved"),  # some rounds meet it: unresolved even with a bad median
    (0.5, [-0.4, 1.5], "PASS"),  # meets the target; the range is wider than the 1% goal: no GOAL
    (0.5, [0.2, 0.9], "GOAL"),
    (2.5, [2.0, 3.4], "PASS"),  # narrow and straddling: the median decides
    (3.2, [2.9, 3.6], "FAIL"),
    (60.0, [40.0, 75.0], "FAIL"),  # every round misses: wide or not, a failure
    (2.5, None, "PASS"),  # no paired range: the median alone
])
def test_a_verdict_is_unresolved_when_the_paired_range_is_wider_than_the_target(value, paired, verdict):
    judged = targets.judge("overhead_cpu", value, device="cpu", preset="small", paired=paired)
    assert judged["verdict"] == verdict, judged
    assert judged["verdict"] not in ("PASS", "GOAL") or not paired or paired[1] - paired[0] <= 3.0


def test_speedup_targets_use_the_margin_over_parity_and_other_setups_are_reported():
    assert targets.judge("throughput", 1.36, device="cpu", preset="small", paired=[1.30, 1.45])["verdict"] == "PASS"
    assert targets.judge("throughput", 1.36, device="cpu", preset="small", paired=[0.9, 1.5])["verdict"] == "unresolved"
    assert targets.judge("throughput", 1.1, device="cpu", preset="small", paired=[1.05, 1.2])["verdict"] == "FAIL"
    assert targets.judge("throughput", 1.1, device="cuda", preset="reference")["verdict"] == "reported"
    assert targets.judge("launches", 22, device="cpu")["verdict"] == "FAIL"  # counted: no noise to hide behind
    # a ratio's spread is relative: 52..65x is a clear pass of a 10x target, 1.18..4.91x hides a 1.3x one
    assert targets.judge("histograms", 52.7, device="cpu", paired=[52.55, 64.89])["verdict"] == "PASS"
    judged = targets.judge("throughput", 1.24, device="cpu", preset="small", paired=[1.18, 4.91])
    assert judged["verdict"] == "unresolved" and "below the noise floor" in judged["figure"]


def test_a_figure_below_the_noise_floor_says_so():
    assert "below the noise floor" in targets.judge("overhead_row", 0.11, paired=[-2.6, 3.1])["figure"]
    assert "below the noise floor" not in targets.judge("overhead_row", 4.0, paired=[3.5, 4.4])["figure"]


# --- run_all gates on the verdicts ------------------------------------------------------------


def fake_entry(name: str, verdict: str) -> dict:
    judged = targets.judge("overhead_row", {"FAIL": 9.0, "PASS": 3.0, "unresolved": 3.0}[verdict],
                           paired={"FAIL": [8.0, 10.0], "PASS": [2.5, 3.5], "unresolved": [-8.0, 9.0]}[verdict])
    assert judged["verdict"] == verdict
    return {"name": name, "command": f"python bench/{name}.py", "ok": True, "seconds": 0.1,
            "record": {"bench": name, "verdicts": [judged]}}


@pytest.mark.parametrize("verdicts, quick, status", [
    (("PASS", "unresolved"), False, 0),  # unresolved is reported, not a failure
    (("PASS", "FAIL"), False, 1),
    (("PASS", "FAIL"), True, 0),  # --quick gates nothing
])
def test_run_all_exits_non_zero_when_a_target_fails(tmp_path, monkeypatch, verdicts, quick, status):
    names = ["throughput", "stats"]
    entries = dict(zip(names, (fake_entry(n, v) for n, v in zip(names, verdicts))))
    monkeypatch.setattr(run_all, "run_one", lambda name, args: entries[name])
    argv = ["--only", ",".join(names), "--out_dir", str(tmp_path)] + (["--quick"] if quick else [])
    assert run_all.main(argv) == status
    summary = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert summary["failed_targets"] == ([] if quick or "FAIL" not in verdicts else
                                         ["stats: each telemetry setting vs the bare loop"])


def test_run_all_exits_non_zero_when_a_benchmark_crashes(tmp_path, monkeypatch):
    crashed = {"name": "stats", "command": "python bench/stats.py", "ok": False, "error": "exit 1: boom"}
    monkeypatch.setattr(run_all, "run_one", lambda name, args: crashed)
    assert run_all.main(["--quick", "--only", "stats", "--out_dir", str(tmp_path)]) == 1


# --- one harness ------------------------------------------------------------------------------


def test_every_benchmark_shares_the_harness_flags_and_the_packaged_corpus():
    """Each script builds its parser with bench_parser (--quick, --save, --device; --compile /
    --no-compile as bdh_fast.train spells it), reads no ../shared/data and no random bytes, and its
    text cites no issue tracker."""
    for script in SCRIPTS:
        text = (REPO / "bench" / script).read_text()
        assert "bench_parser(" in text and "ArgumentParser(" not in text, script
        assert "--no_compile" not in text and "no_compile" not in text, script
        assert not re.search(r"shared/data|random bytes|tracker|issue \d", text), script
    for name in ("interleaved", "cpu_model", "markdown_table", "timed"):
        defined = [p.name for p in (REPO / "bench").glob("*.py") if re.search(rf"^def {name}\(", p.read_text(), re.M)]
        assert len(defined) <= 1, (name, defined)
    proc = subprocess.run([sys.executable, "bench/overhead.py", "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env=bench_env())
    assert proc.returncode == 0 and "--no-compile" in proc.stdout and "--save" in proc.stdout
    assert "--quick" in proc.stdout
