"""The GPU proof's harness: each step as a subprocess in its own process group, with a timeout
drawn from the budgets and the deadline; the group killed when the step ends or runs out of time;
its output captured into capped log files; its last JSON line judged; the per-step files and the
summary (JSON and markdown) written, every file under 16 MB.

Also the two ends of the JSON-line protocol between the harness and its children: a child ends its
stdout with `emit(record)`; the harness reads it back with `last_json`.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime
import json
import math
import os
import pathlib
import signal
import subprocess
import sys
import time
from typing import Callable

from records import clean, emit, last_json  # noqa: F401  (the children's side: proof_checks, proof_runs)
from proof_verdicts import FAIL, FAILED, NOT_RUN, OK, TARGETS, TIMEOUT, Checks, versions_line

REPO = pathlib.Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
PROOF = BENCH / "gpu_proof.py"  # the entry point; its `--check NAME` runs one check in a child

FILE_LIMIT = 16 * 2**20  # no file under --out may reach this
LOG_LIMIT = 2 * 2**20  # each step's captured stdout / stderr: head + tail beyond this
ARTIFACT_LIMIT = 6 * 2**20  # compressed traces / snapshots are kept only below this
TAIL_CHARS = 4000  # output tail kept in each step's JSON and markdown
SUMMARY_RESERVE_S = 10.0  # of the deadline, kept for writing the summary

# ---------------------------------------------------------------------------------------------
# A step: its command, budget and judge
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Ctx:
    dry: bool
    out: pathlib.Path
    work: pathlib.Path
    env: dict[str, str]
    scale: float = 1.0
    deadline: float = math.inf  # time.monotonic() value
    stop_reason: str | None = None  # set when no CUDA GPU is visible: CUDA steps are not started


@dataclasses.dataclass
class Step:
    id: str
    name: str  # files under --out: <id>_<name>.json / .md
    title: str
    budget_s: float  # at most this long on the GPU (x --budget-scale)
    dry_budget_s: float  # at most this long in --dry-run
    min_s: float  # started only when at least this much time is left
    argv: Callable[[Ctx, pathlib.Path, float], list[str]]  # (ctx, step work dir, timeout)
    judge: Callable[[dict, Checks], None]
    needs_cuda: bool = True  # not started when the GPU is missing (outside --dry-run)

    @property
    def file_stem(self) -> str:
        return f"{self.id}_{self.name}"


def me(check: str, ctx: Ctx, work: pathlib.Path, timeout: float, *extra: str) -> list[str]:
    """The entry point as a child: `--check NAME` runs one in-process check and ends with a JSON line."""
    argv = [sys.executable, str(PROOF), "--check", check, "--work", str(work),
            "--budget", f"{timeout:.0f}", "--artifacts", str(ctx.out / "artifacts"), *extra]
    return argv + (["--dry-run"] if ctx.dry else [])


def bench(script: str, gpu: list[str], dry: list[str]) -> Callable[[Ctx, pathlib.Path, float], list[str]]:
    return lambda ctx, work, timeout: [sys.executable, str(BENCH / script), *(dry if ctx.dry else gpu)]


# ---------------------------------------------------------------------------------------------
# Running steps: subprocess per step, process group killed on timeout, files written per step
# ---------------------------------------------------------------------------------------------


def child_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The children's environment: the checkout importable even if pip failed, unbuffered output
    (a killed step still leaves its output), no network, and TRITON_INTERPRET never set (it would
    run the Triton kernels on the CPU interpreter)."""
    env = dict(os.environ if base is None else base)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.update(PYTHONUNBUFFERED="1", PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INDEX="1", PIP_NO_INPUT="1",
               WANDB_MODE="offline", WANDB_SILENT="true", HF_HUB_OFFLINE="1")
    return env


def kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the child's whole process group (inductor's compile workers, nested pytest or
    training runs), SIGKILL after 5 s."""
    for sig, wait_s in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def run_process(argv: list[str], env: dict[str, str], timeout: float, stdout_path: pathlib.Path,
                stderr_path: pathlib.Path) -> tuple[int | None, bool]:
    """(exit status, timed out). Output streams straight into the log files. Popen in its own
    session rather than subprocess.run(timeout=): run() kills only the child, not what it started.
    The children's own subprocesses stay in that group, so whatever is left of it when the step
    ends (a compile worker, a build that a child's own timeout orphaned) goes with it."""
    stdout_path.parent.mkdir(parents=True, exist_ok=True)
    with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            rc, timed_out = proc.wait(timeout=max(1.0, timeout)), False
        except subprocess.TimeoutExpired:
            kill_group(proc)
            rc, timed_out = proc.returncode, True
        except BaseException:  # Ctrl-C on the harness: take the step down with it
            kill_group(proc)
            raise
        finally:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)  # leftovers of the step's process group
        return rc, timed_out


def read_text(path: pathlib.Path, limit: int = LOG_LIMIT) -> str:
    """The file's text, or its last `limit` bytes (where the final JSON line and the error are)."""
    if not path.exists():
        return ""
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - limit))
        return f.read().decode(errors="replace")


def cap_file(path: pathlib.Path, limit: int = LOG_LIMIT) -> None:
    """Keep a text file under `limit` bytes: its head and its tail, the middle cut and marked."""
    if not path.exists() or path.stat().st_size <= limit:
        return
    data = path.read_bytes()
    head, tail = limit // 8, limit - limit // 8 - 200
    path.write_bytes(data[:head] + f"\n... [{len(data) - head - tail} bytes cut] ...\n".encode() + data[-tail:])


def tail(text: str, n: int = TAIL_CHARS) -> str:
    return text if len(text) <= n else "..." + text[-n:]


def run_step(step: Step, ctx: Ctx, timeout: float) -> dict:
    work = ctx.work / step.file_stem
    work.mkdir(parents=True, exist_ok=True)
    argv = step.argv(ctx, work, timeout)
    logs = ctx.out / "logs"
    stdout_path, stderr_path = logs / f"{step.file_stem}.stdout.txt", logs / f"{step.file_stem}.stderr.txt"
    t0 = time.monotonic()
    try:
        rc, timed_out = run_process(argv, ctx.env, timeout, stdout_path, stderr_path)
    except OSError as e:  # could not start at all
        rc, timed_out = None, False
        stderr_path.write_text(f"could not start {argv[0]}: {e}\n")
    seconds = time.monotonic() - t0
    stdout, stderr = read_text(stdout_path), read_text(stderr_path)
    record = last_json(stdout)
    if timed_out:
        status = TIMEOUT
    elif rc != 0 or record is None or record.get("partial"):
        status = FAILED
    else:
        status = OK
    checks = Checks(ctx.dry, status)
    try:
        step.judge(record or {}, checks)
    except Exception as e:  # noqa: BLE001 - a record the judge cannot read is reported, not fatal
        checks.items.append({"check": "harness", "claim": "the harness reads the step's record", "figure": "-",
                             "value": None, "target": "-", "source": "-", "verdict": FAIL,
                             "note": f"judge failed: {type(e).__name__}: {e}"})
    for path in (stdout_path, stderr_path):
        cap_file(path)
    why = ""
    if status == TIMEOUT:
        why = f"ran past its {timeout:.0f} s budget; killed"
    elif status == FAILED:
        last_err = [ln for ln in stderr.strip().splitlines() if ln.strip()][-1:] or [""]
        why = ((f"exit {rc}" if rc != 0 else "no final JSON line")
               + (f": {last_err[0].strip()[:300]}" if last_err[0] else ""))
    return {"id": step.id, "name": step.name, "file": step.file_stem, "title": step.title, "status": status,
            "why": why, "seconds": round(seconds, 1), "timeout_s": round(timeout, 1), "command": shell(argv),
            "returncode": rc, "record": record, "checks": checks.items,
            "stdout_tail": tail(stdout), "stderr_tail": tail(stderr),
            "logs": [str(p.relative_to(ctx.out)) for p in (stdout_path, stderr_path)]}


def not_run(step: Step, reason: str, ctx: Ctx) -> dict:
    checks = Checks(ctx.dry, NOT_RUN)
    with contextlib.suppress(Exception):
        step.judge({}, checks)
    for item in checks.items:
        item["note"] = reason
    return {"id": step.id, "name": step.name, "file": step.file_stem, "title": step.title, "status": NOT_RUN,
            "why": reason, "seconds": 0.0, "timeout_s": 0.0, "command": "", "returncode": None, "record": None,
            "checks": checks.items, "stdout_tail": "", "stderr_tail": "", "logs": []}


def shell(argv: list[str]) -> str:
    shown = ["python" if a == sys.executable else os.path.relpath(a, REPO) if a.startswith(str(REPO)) else a
             for a in argv]
    return " ".join(shown)


def budget_of(step: Step, ctx: Ctx) -> float:
    return (step.dry_budget_s if ctx.dry else step.budget_s) * ctx.scale


def step_timeout(step: Step, later: list[Step], ctx: Ctx) -> float:
    """A step may run for its own budget plus whatever earlier steps left unused, but never into
    the budgets of the steps after it, nor past the deadline: one slow step cannot starve the rest."""
    left = ctx.deadline - time.monotonic()
    reserved = sum(budget_of(s, ctx) for s in later if not (ctx.stop_reason and s.needs_cuda))
    return min(left, max(budget_of(step, ctx), left - reserved))


def run_plan(plan: list[Step], ctx: Ctx, after_each: Callable[[dict], None] | None = None) -> list[dict]:
    """Each step in order with its timeout (step_timeout); a step whose minimum no longer fits is
    NOT RUN, and so is a CUDA step once the harness knows there is no GPU."""
    results = []
    for i, step in enumerate(plan):
        timeout = step_timeout(step, plan[i + 1:], ctx)
        need = min(step.min_s * ctx.scale, budget_of(step, ctx))
        if ctx.stop_reason and step.needs_cuda:
            result = not_run(step, ctx.stop_reason, ctx)
        elif timeout < need:
            result = not_run(step, f"{max(timeout, 0):.0f} s left before the deadline, the step needs at least "
                                   f"{need:.0f} s", ctx)
        else:
            print(f"[{step.id} {step.name}] {step.title} (timeout {timeout:.0f} s)", flush=True)
            result = run_step(step, ctx, timeout)
        verdicts = collections.Counter(item["verdict"] for item in result["checks"])
        print(f"[{step.id} {step.name}] {result['status']} in {result['seconds']:.0f} s"
              + (f" ({result['why']})" if result["why"] else "") + ": "
              + ", ".join(f"{v} {n}" for v, n in verdicts.items()), flush=True)
        write_step_files(result, ctx)
        results.append(result)
        if after_each is not None:
            after_each(result)
    return results


def probe_env(ctx: Ctx, timeout: float = 40.0) -> dict:
    """The environment record (versions, GPU) when the install step does not provide it."""
    logs = ctx.out / "logs"
    run_process(me("env", ctx, ctx.work / "env", timeout), ctx.env, timeout, logs / "env.stdout.txt",
                logs / "env.stderr.txt")
    return last_json(read_text(logs / "env.stdout.txt")) or {}


# ---------------------------------------------------------------------------------------------
# Files: per step, summary
# ---------------------------------------------------------------------------------------------


def write_capped(path: pathlib.Path, text: str) -> None:
    data = text.encode()
    if len(data) >= FILE_LIMIT:  # never expected (records and tails are small); still a hard stop
        data = data[:FILE_LIMIT - 4096] + b"\n... [cut at the 16 MB file limit]\n"
    path.write_bytes(data)


def checks_table(checks: list[dict], steps: list[str] | None = None) -> str:
    """One row per check; with `steps`, a first column naming each row's step."""
    head = (["step"] if steps is not None else []) + ["check", "figure", "target", "verdict", "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, item in enumerate(checks):
        cells = ([steps[i]] if steps is not None else []) + [
            item["claim"], item["figure"], item["target"], f"**{item['verdict']}**", item["note"]]
        lines.append("| " + " | ".join(str(cell).replace("|", "\\|").replace("\n", " ") for cell in cells) + " |")
    return "\n".join(lines)


def write_step_files(result: dict, ctx: Ctx) -> None:
    stem = ctx.out / result["file"]
    write_capped(stem.with_suffix(".json"), json.dumps(clean(result), indent=2, default=str) + "\n")
    record = json.dumps(clean(result["record"]), indent=2, default=str) if result["record"] else "(none)"
    text = "\n".join([
        f"# {result['id']} {result['name']}: {result['title']}", "",
        f"Status **{result['status']}** in {result['seconds']:.0f} s (timeout {result['timeout_s']:.0f} s)"
        + (f": {result['why']}" if result["why"] else ""), "",
        f"`{result['command']}`" if result["command"] else "", "",
        checks_table(result["checks"]), "",
        "## Record (the step's last JSON line)", "", "```json", tail(record, 200_000), "```", "",
        "## stdout (tail)", "", "```", result["stdout_tail"], "```", "",
        "## stderr (tail)", "", "```", result["stderr_tail"], "```", "",
        "Full output: " + ", ".join(result["logs"]) if result["logs"] else "", ""])
    write_capped(stem.with_suffix(".md"), text)


def order_key(result: dict) -> tuple:
    step_id = result["id"]
    return (int(step_id[0]) if step_id[0].isdigit() else 99, step_id)


def build_summary(results: list[dict], ctx: Ctx, machine: dict, started: float, argv: list[str],
                  complete: bool) -> dict:
    ordered = sorted(results, key=order_key)
    verdicts = collections.Counter(item["verdict"] for r in ordered for item in r["checks"])
    return {
        "proof": "gpu_proof", "complete": complete, "dry_run": ctx.dry,
        "command": "python bench/gpu_proof.py " + " ".join(argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "wall_s": round(time.monotonic() - started, 1),
        "deadline_s": None if math.isinf(ctx.deadline) else round(ctx.deadline + SUMMARY_RESERVE_S - started),
        "machine": machine, "verdicts": dict(verdicts),
        "steps": [{"id": r["id"], "name": r["name"], "title": r["title"], "status": r["status"], "why": r["why"],
                   "seconds": r["seconds"], "timeout_s": r["timeout_s"], "checks": r["checks"]} for r in ordered],
        "targets": {k: dataclasses.asdict(t) for k, t in TARGETS.items()},
    }


def summary_markdown(summary: dict) -> str:
    m = summary["machine"] or {}
    counts = ", ".join(f"{k} {v}" for k, v in sorted(summary["verdicts"].items()))
    checks = [item for s in summary["steps"] for item in s["checks"]]
    labels = [f"{s['id']} {s['name']}" for s in summary["steps"] for _ in s["checks"]]
    lines = [f"# GPU proof{' (DRY RUN on CPU: a harness check, not a proof)' if summary['dry_run'] else ''}: "
             f"{m.get('gpu') or 'no GPU'}, {summary['date'][:10]}", "",
             f"`{summary['command']}`: {summary['wall_s']:.0f} s"
             + (f" of a {summary['deadline_s']:.0f} s deadline" if summary["deadline_s"] else "")
             + ("" if summary["complete"] else " (INCOMPLETE: the harness stopped early)"), "",
             f"Machine: {versions_line(m) if m else 'unknown (the environment probe did not run)'}; "
             f"{m.get('cpu', 'CPU')} x {m.get('cpu_count', '?')}", "", f"Verdicts: {counts}", "",
             checks_table(checks, labels), "",
             "| step | status | seconds | timeout s | note |", "|---|---|---:|---:|---|"]
    for s in summary["steps"]:
        lines.append(f"| {s['id']} {s['name']} | {s['status']} | {s['seconds']:.0f} | {s['timeout_s']:.0f} | "
                     f"{s['why'].replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def write_summary(summary: dict, ctx: Ctx) -> str:
    text = summary_markdown(summary)
    write_capped(ctx.out / "summary.json", json.dumps(clean(summary), indent=2, default=str) + "\n")
    write_capped(ctx.out / "summary.md", text)
    return text


def enforce_file_limit(out: pathlib.Path) -> list[str]:
    """Last safety net: nothing under --out reaches 16 MB (text is cut, anything else removed)."""
    fixed = []
    for path in out.rglob("*"):
        if path.is_file() and path.stat().st_size >= FILE_LIMIT:
            if path.suffix in (".txt", ".md", ".json"):
                cap_file(path, FILE_LIMIT // 2)
            else:
                path.unlink()
            fixed.append(str(path.relative_to(out)))
    return fixed
