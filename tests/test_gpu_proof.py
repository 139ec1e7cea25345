"""bench/gpu_proof.py: the dry run (the same code on CPU, tiny sizes) writes every step's files and
a summary with a verdict per check, CUDA-only checks SKIPPED with their reason; the budget logic
records a step that runs past its budget as TIMEOUT (its process group killed) and goes on."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import gpu_proof  # noqa: E402
import proof_harness  # noqa: E402
import proof_verdicts  # noqa: E402

DRY_RUN_TIMEOUT_S = 900  # a few minutes on a loaded 2-core CPU; the proof's own deadline is longer
VERDICTS = {"PASS", "FAIL", "unresolved", "SKIPPED", "REPORTED", "FAILED", "TIMEOUT", "NOT RUN"}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("proof")
    proc = subprocess.run([sys.executable, "bench/gpu_proof.py", "--dry-run", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=DRY_RUN_TIMEOUT_S)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return out, proc.stdout


@pytest.mark.compiled  # bench/throughput.py compiles the tiny model once
def test_dry_run_writes_every_step_a_verdict_per_check_and_a_summary(dry_run):
    out, stdout = dry_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] is True and summary["complete"] is True
    assert json.loads(stdout.strip().splitlines()[-1]) == summary  # the last stdout line is the summary
    assert "torch" in summary["machine"] and summary["machine"]["cuda_available"] is False
    assert [s["id"] for s in summary["steps"]] == sorted((s.id for s in gpu_proof.STEPS), key=lambda i: (i[0], i))
    for step in summary["steps"]:
        assert step["status"] == "OK", step  # on a CPU every step's harness runs
        assert step["checks"], step["name"]
        for check in step["checks"]:
            assert check["verdict"] in VERDICTS, check
            assert check["target"] == gpu_proof.TARGETS[check["check"]].target
            if gpu_proof.TARGETS[check["check"]].cuda_only and check["verdict"] != "REPORTED":
                assert check["verdict"] == "SKIPPED" and check["note"], check  # CUDA claims: skipped, saying why
    verdicts = {c["check"]: c["verdict"] for s in summary["steps"] for c in s["checks"]}
    # the parts that do run on a CPU are judged: the loss falls in bf16, the trace holds every range
    assert verdicts["bf16_training"] == "PASS" and verdicts["profile_ranges"] == "PASS"
    assert verdicts["profile_run"] == "PASS" and verdicts["tokens_per_s"] == "REPORTED"
    assert "DRY RUN" in (out / "summary.md").read_text()


def test_dry_run_files_per_step_all_under_16_mb(dry_run):
    out, _ = dry_run
    for step in gpu_proof.STEPS:
        record = json.loads((out / f"{step.file_stem}.json").read_text())
        assert record["id"] == step.id and record["checks"]
        assert (out / f"{step.file_stem}.md").read_text().startswith(f"# {step.id} {step.name}")
    files = [p for p in out.rglob("*") if p.is_file()]
    assert files and all(p.stat().st_size < 16 * 2**20 for p in files)


# --- the budget logic, with fake steps (no torch, a few seconds) ------------------------------


def fake_step(step_id: str, code: str, budget_s: float, min_s: float = 0.5) -> gpu_proof.Step:
    def judge(record: dict, checks: proof_verdicts.Checks) -> None:
        if "value" in record:
            checks.reported("versions", record["value"])
        else:
            checks.missing("versions")

    argv = lambda ctx, work, timeout: [sys.executable, "-c", textwrap.dedent(code)]  # noqa: E731
    return gpu_proof.Step(step_id, f"fake{step_id}", "a fake step", budget_s, budget_s, min_s, argv, judge,
                          needs_cuda=False)


def make_ctx(tmp_path: pathlib.Path, deadline_s: float = 60.0) -> gpu_proof.Ctx:
    return gpu_proof.Ctx(dry=True, out=tmp_path / "out", work=tmp_path / "work", env=gpu_proof.child_env(),
                         deadline=time.monotonic() + deadline_s)


def test_a_step_past_its_budget_is_a_timeout_its_processes_are_killed_and_the_next_step_runs(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    slow = fake_step("1", f"""
        import json, subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        open({str(pid_file)!r}, "w").write(str(child.pid))
        print(json.dumps({{"value": "partial", "partial": True}}), flush=True)
        time.sleep(120)
    """, budget_s=3.0)
    quick = fake_step("2", 'import json; print("working"); print(json.dumps({"value": "done"}))', budget_s=20.0)
    ctx = make_ctx(tmp_path, deadline_s=23.0)  # the budgets' sum: no spare time to lend the slow step
    ctx.out.mkdir()
    t0 = time.monotonic()
    results = gpu_proof.run_plan([slow, quick], ctx)
    assert time.monotonic() - t0 < 20
    assert [r["status"] for r in results] == ["TIMEOUT", "OK"]
    assert "budget" in results[0]["why"] and results[0]["checks"][0]["figure"] == "partial"  # its partial record
    assert results[1]["checks"][0]["verdict"] == "REPORTED" and results[1]["checks"][0]["figure"] == "done"
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and pid_alive(grandchild):
        time.sleep(0.1)
    assert not pid_alive(grandchild)  # the whole process group went, not just the step's process
    assert (ctx.out / "1_fake1.json").exists() and (ctx.out / "2_fake2.md").exists()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = pathlib.Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(")")[-1].split()[0] == "Z")  # a zombie is gone


def test_a_failing_step_keeps_its_output_tail_and_the_proof_goes_on(tmp_path):
    failing = fake_step("1", 'import sys; print("boom: the GPU caught fire", file=sys.stderr); sys.exit(3)', 10.0)
    quick = fake_step("2", 'import json; print(json.dumps({"value": "done"}))', 10.0)
    ctx = make_ctx(tmp_path)
    ctx.out.mkdir()
    results = gpu_proof.run_plan([failing, quick], ctx)
    assert [r["status"] for r in results] == ["FAILED", "OK"]
    assert "exit 3" in results[0]["why"] and "boom" in results[0]["why"]
    assert "boom" in results[0]["stderr_tail"]
    assert results[0]["checks"][0]["verdict"] == "FAILED"  # a check without its figure carries the status


def test_what_a_finished_step_left_running_is_killed_with_it(tmp_path):
    pid_file = tmp_path / "orphan.pid"
    leaves = fake_step("1", f"""
        import json, subprocess, sys
        orphan = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        open({str(pid_file)!r}, "w").write(str(orphan.pid))
        print(json.dumps({{"value": "done"}}))
    """, budget_s=20.0)
    ctx = make_ctx(tmp_path)
    ctx.out.mkdir()
    (result,) = gpu_proof.run_plan([leaves], ctx)
    assert result["status"] == "OK"
    orphan = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and pid_alive(orphan):
        time.sleep(0.1)
    assert not pid_alive(orphan)


def test_a_step_that_no_longer_fits_before_the_deadline_is_not_run(tmp_path):
    ctx = make_ctx(tmp_path, deadline_s=2.0)
    ctx.out.mkdir()
    late = fake_step("1", "print('{}')", budget_s=30.0, min_s=10.0)
    (result,) = gpu_proof.run_plan([late], ctx)
    assert result["status"] == "NOT RUN" and "deadline" in result["why"]
    assert result["checks"][0]["verdict"] == "NOT RUN"


def test_a_step_may_use_time_left_by_earlier_steps_but_not_the_later_steps_budgets(tmp_path):
    ctx = make_ctx(tmp_path, deadline_s=100.0)
    first, second, third = (fake_step(str(i), "", budget_s=b) for i, b in ((1, 10.0), (2, 20.0), (3, 30.0)))
    # 100 s left, 50 s owed to the two later steps: the first may run 50 s, not 100
    assert proof_harness.step_timeout(first, [second, third], ctx) == pytest.approx(50.0, abs=1.0)
    ctx.deadline = time.monotonic() + 25.0  # earlier steps overran: no more than what is left
    assert proof_harness.step_timeout(third, [], ctx) == pytest.approx(25.0, abs=1.0)


@pytest.mark.parametrize("value, paired, verdict", [
    (0.4, [0.1, 0.8], "PASS"),  # the whole paired range under the target
    (1.5, [1.2, 1.9], "FAIL"),  # the whole range over it
    (0.5, [-2.0, 3.0], "unresolved"),  # wider than the target and straddling it
    (0.9, [0.5, 1.3], "PASS"),  # straddling but narrow: the median decides
    (1.1, None, "FAIL"),  # no paired range: the median alone
])
def test_at_most_uses_the_paired_range(value, paired, verdict):
    assert proof_verdicts.at_most(value, 1.0, paired)[0] == verdict


def test_the_targets_table_covers_every_check_and_the_budgets_fit_the_deadline():
    assert sum(s.budget_s for s in gpu_proof.STEPS) <= gpu_proof.GPU_DEADLINE_S - 10
    assert len({s.id for s in gpu_proof.STEPS}) == len(gpu_proof.STEPS)
    assert all(t.claim and t.target and t.source for t in gpu_proof.TARGETS.values())
