"""Prove the GPU claims in one command, on one fresh GPU machine, in at most 8 minutes, offline.

    python bench/gpu_proof.py --out DIR              # on the GPU machine
    python bench/gpu_proof.py --dry-run --out DIR    # the same code on CPU, tiny sizes (tests/test_gpu_proof.py)
    python bench/gpu_proof.py --list                 # the steps, their time budgets and the targets
    python bench/gpu_proof.py --out DIR --only 1b,2  # a subset, by id or name

Every step runs as a subprocess with its own time budget; a step that fails or runs out of time is
recorded as FAILED / TIMEOUT with the tail of its output (and whatever partial record it printed),
its whole process group is killed, and the proof goes on. The budgets add up to the deadline
(--deadline, 470 s): a step may use its own budget plus what earlier steps left unused, never the
budgets of the steps after it, so one slow step cannot starve the rest; a step starts only if its
minimum still fits. Steps run in priority order (what matters most first), reported in id order:

  0a install                pip install --no-build-isolation --no-deps --no-index -e . (builds csrc/
                            against the torch already there; touches no other package); versions,
                            bdh_fast._C, GPU, wandb
  1b sync_bf16              >= 50 compiled reference-preset bf16 steps under
                            torch.cuda.set_sync_debug_mode("error"), with eval, samples, probes and
                            checkpoints at their steps (those run under "warn", their syncs counted
                            and named); the loss falls; a memory snapshot
  1c tensor_stats           Triton tensor_stats vs the float64 reference over dtypes and sizes, and
                            a bf16 tensor of 2**31 + 4099 elements vs its exact analytic statistics
  1a cuda_tests             the project's CUDA tests (pytest -k cuda)
  2  throughput             bench/throughput.py, reference preset: tokens/s, MFU, compile time
  3a overhead_reference     bench/overhead.py, reference preset: bare vs full telemetry vs naive
  6  profiled_run           python -m bdh_fast.train --preset reference --max_iters 300 --profile:
                            trace ranges, CUDA kernels, NVML metrics in TensorBoard
  4  eval_probes            the same run with eval + samples + probes on vs off (interleaved blocks)
  5  stats                  bench/stats.py on CUDA: fused op vs torch ops, GB/s vs peak bandwidth
  3b overhead_launch_bound  bench/overhead.py at the small preset (launch-bound on a GPU)
  0b wandb                  the W&B backend offline (SKIPPED, saying so, when wandb is missing)

--dry-run runs every step on the CPU with tiny sizes and skips pip; the CUDA-only checks come out
SKIPPED with the reason. Figures always come from the sub-benchmarks' and checks' last JSON line.

Outputs in --out: <id>_<name>.json and .md per step; summary.json and summary.md (figures,
targets, verdicts, machine, versions), rewritten after every step; logs/ (each step's stdout and
stderr, capped); artifacts/ (a compressed profiler trace and memory snapshot when small). Every
file stays under 16 MB. The summary markdown is printed; the last stdout line is the summary JSON.

Verdicts: PASS; FAIL; unresolved (the paired noise range straddles the target and is wider than
it, or the target's condition was not measurable in the time); SKIPPED (with the reason);
REPORTED (a figure the issue asks for, with no target). A check whose step failed, timed out or
never started carries FAILED, TIMEOUT or NOT RUN.

Exit status: 0 when the proof ran to its end and wrote its files, whatever the verdicts (read
summary.json); 1 when the harness itself broke; 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import datetime
import fractions
import gzip
import json
import math
import os
import pathlib
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from typing import Any, Callable

REPO = pathlib.Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
sys.path.insert(0, str(BENCH))  # bench/ is not a package: `common`, `overhead` import from here

FILE_LIMIT = 16 * 2**20  # no file under --out may reach this
LOG_LIMIT = 2 * 2**20  # each step's captured stdout / stderr: head + tail beyond this
ARTIFACT_LIMIT = 6 * 2**20  # compressed traces / snapshots are kept only below this
TAIL_CHARS = 4000  # output tail kept in each step's JSON and markdown
GPU_DEADLINE_S = 470.0  # the whole proof stays under 8 minutes: 460 s of steps, 10 s for the summary
DRY_DEADLINE_S = 1200.0
SUMMARY_RESERVE_S = 10.0  # of the deadline, kept for writing the summary

# ---------------------------------------------------------------------------------------------
# Targets: one table. cuda_only targets come out SKIPPED (figure kept) in --dry-run.
# ---------------------------------------------------------------------------------------------

MIN_SYNC_STEPS = 50
BF16_DROP = 0.98  # mean loss of the last k steps <= this x the mean of the first k
OVERHEAD_REFERENCE_PCT = 1.0
OVERHEAD_LAUNCH_BOUND_PCT = 5.0
EVAL_PROBES_PCT = 2.0
PROFILE_RANGES = ("data", "forward", "backward", "optimizer", "telemetry/grad_norms", "telemetry/record",
                  "telemetry/flush", "telemetry/probe", "eval", "sample", "checkpoint")
REPORTED_TARGET = "reported (no target)"


@dataclasses.dataclass(frozen=True)
class Target:
    claim: str
    target: str
    source: str
    cuda_only: bool


TARGETS: dict[str, Target] = {
    "install": Target("the project installs against the preinstalled torch",
                      "`pip install --no-build-isolation --no-deps -e .` exits 0", "issue", True),
    "native_ext": Target("csrc/ built against this torch", "bdh_fast.ops.HAS_NATIVE is True", "issue", False),
    "versions": Target("machine and versions", REPORTED_TARGET, "issue", False),
    "wandb": Target("the W&B backend writes an offline run",
                    "an offline-run directory; SKIPPED, saying so, when wandb is not installed", "issue", False),
    "cuda_tests": Target("the project's CUDA tests", "every selected test passes, none skipped", "issue", True),
    "sync_free": Target("no host sync between flushes (DESIGN.md invariant 1)",
                        f"0 syncs under set_sync_debug_mode('error') over >= {MIN_SYNC_STEPS} compiled steps, "
                        "eval, samples, probes and checkpoints each run >= 2 times", "issue", True),
    "sync_points": Target("the allowed sync points, named", REPORTED_TARGET, "issue", False),
    "bf16_training": Target("bf16 training", f"--dtype bfloat16, every loss finite, mean of the last k steps "
                            f"<= {BF16_DROP} x the first k", "issue", False),
    "memory_snapshot": Target("--memory_snapshot on CUDA", "memory_snapshot.pickle written and loadable, "
                              "with allocator segments", "issue", True),
    "tensor_stats_sweep": Target("Triton tensor_stats equals the float64 reference",
                                 "counts, extremes, histogram exact; sums within 1e-9 x sum|x|; fp32/bf16/fp16/fp64, "
                                 "sizes 0 to 2**24+3, bins 64 and 3000; the Triton kernels in use", "issue", True),
    "tensor_stats_2e31": Target("tensor_stats on more than 2**31 elements",
                                "equals the exact analytic statistics of a patterned bf16 tensor of 2**31 + 4099 "
                                "elements (NaN, Inf, new extremes past index 2**31)", "issue", True),
    "tokens_per_s": Target("training tokens/s, compiled, reference preset", REPORTED_TARGET, "issue", False),
    "mfu": Target("MFU (the GPU's dense bf16 peak)", REPORTED_TARGET, "issue", False),
    "compile_s": Target("compile time (first compiled step)", REPORTED_TARGET, "issue", False),
    "compiled_vs_eager": Target("compiled vs eager tokens/s", REPORTED_TARGET, "README (target set for CPU)", False),
    "overhead_reference": Target("full telemetry cost, reference preset",
                                 f"<= {OVERHEAD_REFERENCE_PCT:g}% vs the bare loop", "issue goal", True),
    "naive_reference": Target("naive seed-style logger cost, reference preset", REPORTED_TARGET, "issue", False),
    "overhead_launch_bound": Target("full telemetry cost, launch-bound preset (small)",
                                    f"<= {OVERHEAD_LAUNCH_BOUND_PCT:g}% vs the bare loop", "design card", True),
    "naive_launch_bound": Target("naive seed-style logger cost, launch-bound preset", REPORTED_TARGET, "issue", False),
    "eval_probes": Target("eval + samples + probes, end to end (same run on vs off)",
                          f"<= {EVAL_PROBES_PCT:g}% of run time at the preset's default cadences", "README", True),
    "stats_speedup": Target("fused tensor_stats vs unfused torch ops, CUDA, 10M fp32", REPORTED_TARGET,
                            "issue (the 2x target is set for CPU)", False),
    "stats_bandwidth": Target("fused tensor_stats GB/s vs the GPU's peak bandwidth", REPORTED_TARGET, "issue", False),
    "profile_run": Target("300-step reference run, default backends, --profile", "exit 0, every step in metrics.jsonl",
                          "issue", False),
    "profile_ranges": Target("the trace holds the loop's and the telemetry's ranges",
                             "every range of " + ", ".join(PROFILE_RANGES), "issue", False),
    "profile_kernels": Target("the trace holds CUDA kernels", "> 0 kernel events", "issue", True),
    "nvml_tensorboard": Target("NVML metrics reached TensorBoard", ">= 1 system/gpu0/* scalar tag with points",
                               "issue", True),
}

PASS, FAIL, UNRESOLVED, SKIPPED, REPORTED = "PASS", "FAIL", "unresolved", "SKIPPED", "REPORTED"
OK, FAILED, TIMEOUT, NOT_RUN = "OK", "FAILED", "TIMEOUT", "NOT RUN"


def at_most(value: float, limit: float, paired: list[float] | None = None) -> tuple[str, str]:
    """PASS / FAIL / unresolved for `value <= limit` given the paired per-round range: the range
    decides when it lies on one side of the limit; a range wider than the limit that straddles it
    is unresolved; a narrow straddling range leaves it to the median."""
    if paired:
        lo, hi = paired
        note = f"paired range {lo:+.2f}..{hi:+.2f}%"
        if hi <= limit:
            return PASS, note
        if lo > limit:
            return FAIL, note
        if hi - lo > limit:
            return UNRESOLVED, f"{note} straddles the {limit:g}% target and is wider than it"
        return (PASS if value <= limit else FAIL), f"{note}: the median decides"
    return (PASS if value <= limit else FAIL), "no paired range"


class Checks:
    """The checks of one step: figure, target (from TARGETS), verdict, note."""

    def __init__(self, dry: bool, status: str):
        self.dry, self.status, self.items = dry, status, []

    def add(self, key: str, figure: Any, verdict: str, note: str = "", value: Any = None) -> None:
        target = TARGETS[key]
        if self.dry and target.cuda_only and verdict in (PASS, FAIL, UNRESOLVED):
            note = f"dry run on CPU: a CUDA claim, not judged here ({verdict} on this CPU run); {note}".rstrip("; ")
            verdict = SKIPPED
        self.items.append({"check": key, "claim": target.claim, "figure": str(figure), "value": value,
                           "target": target.target, "source": target.source, "verdict": verdict, "note": note})

    def missing(self, key: str, why: str = "") -> None:
        """No figure: the step's status explains it (or the record lacks it: FAIL)."""
        verdict = FAIL if self.status == OK else self.status
        self.add(key, "-", verdict, why or ("the record has no figure for it" if self.status == OK
                                            else f"step {self.status}"))

    def reported(self, key: str, figure: Any, note: str = "", value: Any = None) -> None:
        self.add(key, figure, REPORTED, note, value)


def fmt(value: Any, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{format(value, spec)}{suffix}"


# ---------------------------------------------------------------------------------------------
# The steps: command, budget, judge
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
    """This file as a child: `--check NAME` runs one in-process check and ends with a JSON line."""
    argv = [sys.executable, str(pathlib.Path(__file__).resolve()), "--check", check, "--work", str(work),
            "--budget", f"{timeout:.0f}", "--artifacts", str(ctx.out / "artifacts"), *extra]
    return argv + (["--dry-run"] if ctx.dry else [])


def bench(script: str, gpu: list[str], dry: list[str]) -> Callable[[Ctx, pathlib.Path, float], list[str]]:
    return lambda ctx, work, timeout: [sys.executable, str(BENCH / script), *(dry if ctx.dry else gpu)]


# --- judges ------------------------------------------------------------------------------------


def judge_install(rec: dict, c: Checks) -> None:
    pip = rec.get("pip")
    if rec.get("pip_skipped"):
        c.add("install", "not run", SKIPPED, rec["pip_skipped"])
    elif pip is None:
        c.missing("install")
    else:
        tries = [pip] + ([rec["pip_retry"]] if rec.get("pip_retry") else [])
        last = tries[-1]
        figure = "; ".join(f"{t['how']}: exit {t['rc']} in {t['seconds']:.0f} s" for t in tries)
        note = "" if pip["rc"] == 0 else ("the first try failed: " + pip.get("error_line", ""))[:300]
        c.add("install", figure, PASS if pip["rc"] == 0 else FAIL, note)
        if pip["rc"] != 0 and last["rc"] == 0:
            c.items[-1]["note"] += f"; installed by the fallback ({last['how']})"
    env = rec.get("env")
    if not env:
        c.missing("native_ext")
        c.missing("versions")
        return
    native = env.get("has_native")
    c.add("native_ext", native, PASS if native else FAIL,
          "" if native else "tensor_stats runs its pure-PyTorch reference on CPU (CUDA uses Triton either way)")
    c.reported("versions", versions_line(env))


def versions_line(env: dict) -> str:
    gpu = env.get("gpu") or "no GPU"
    return (f"{gpu}; driver {env.get('driver') or '-'}; CUDA {env.get('cuda') or '-'}; torch {env.get('torch')}; "
            f"triton {env.get('triton') or 'missing'}; Python {env.get('python')}; "
            f"wandb {env.get('wandb') or 'missing'}; bdh_fast._C {'built' if env.get('has_native') else 'not built'}")


def judge_wandb(rec: dict, c: Checks) -> None:
    if "wandb" not in rec:
        return c.missing("wandb")
    if rec["wandb"] is None:
        return c.add("wandb", "wandb not installed", SKIPPED, "wandb is not importable here: the W&B part is skipped")
    ok = rec.get("rc") == 0 and rec.get("offline_runs", 0) > 0
    c.add("wandb", f"exit {rec.get('rc')}, {rec.get('offline_runs', 0)} offline run dir(s), "
          f"{rec.get('steps_logged', 0)} steps in metrics.jsonl", PASS if ok else FAIL, rec.get("note", ""))


def judge_cuda_tests(rec: dict, c: Checks) -> None:
    tests = rec.get("tests")
    if tests is None:
        return c.missing("cuda_tests", rec.get("error", ""))
    counts = collections.Counter(t["outcome"] for t in tests)
    figure = ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "no test selected"
    bad = [t for t in tests if t["outcome"] in ("failed", "error")]
    skipped = [t for t in tests if t["outcome"] == "skipped"]
    if bad:
        verdict, note = FAIL, "; ".join(f"{t['id']}: {t['message']}"[:200] for t in bad[:5])
    elif c.dry and skipped:
        reasons = sorted({t["message"] for t in skipped if t["message"]})
        verdict, note = SKIPPED, (f"dry run on CPU: {len(skipped)} skipped ({'; '.join(reasons)[:200]}); "
                                  f"{counts.get('passed', 0)} CPU-side tests passed")
    elif not tests or not counts.get("passed"):
        verdict, note = FAIL, "nothing passed"
    elif skipped:
        verdict, note = FAIL, "skipped on this machine: " + ", ".join(t["id"] for t in skipped[:8])
    else:
        verdict, note = PASS, ""
    c.add("cuda_tests", figure, verdict, note)


def judge_sync(rec: dict, c: Checks) -> None:
    if "steps_checked" not in rec:
        c.missing("sync_free", rec.get("error", ""))
    else:
        events = rec.get("events", {})
        short = [k for k in ("eval", "samples", "probe", "checkpoint") if len(events.get(k, [])) < 2]
        violations = rec.get("violations", [])
        kind = f"{'compiled' if rec.get('compile') else 'eager'} {rec.get('preset')} steps"
        figure = (f"{len(violations)} sync(s) outside the allowed points over {rec['steps_checked']} {kind}"
                  if rec.get("sync_debug") else f"{rec.get('steps')} {kind} run, no sync debug on CPU")
        if not rec.get("loop_done") and not violations:
            verdict = c.status if c.status != OK else FAIL
            note = f"the loop did not finish ({c.status}): no sync so far"
        elif violations:
            first = violations[0]
            verdict, note = FAIL, f"first at step {first['step']}: {first.get('where', '')}"[:400]
        elif rec["steps_checked"] < MIN_SYNC_STEPS or not rec.get("compile"):
            verdict, note = FAIL, f"needs >= {MIN_SYNC_STEPS} compiled steps"
        elif short:
            verdict, note = FAIL, "ran fewer than twice: " + ", ".join(short)
        else:
            verdict, note = PASS, ""
        if not rec.get("sync_debug"):
            verdict, note = SKIPPED, "set_sync_debug_mode needs CUDA; the same loop and wrappers ran on the CPU"
        note += ("; " if note else "") + "events at steps " + ", ".join(
            f"{k} {v}" for k, v in events.items() if v)
        c.add("sync_free", figure, verdict, note)
        syncs = rec.get("allowed_syncs", {})
        c.reported("sync_points", ", ".join(
            f"{k}: " + (f"{len(events[k])} call(s), " if k in events else "") + f"{syncs.get(k, 0)} sync(s)"
            for k in sorted(set(events) | set(syncs))) or "-",
                   "counted under set_sync_debug_mode('warn')" if rec.get("sync_debug") else "no sync debug on CPU")
    losses = rec.get("loss")
    if not losses:
        c.missing("bf16_training", rec.get("error", ""))
    else:
        first, last, k = losses["first_mean"], losses["last_mean"], losses["k"]
        ok = bool(losses["finite"] and rec.get("dtype") == "bfloat16" and last <= BF16_DROP * first)
        c.add("bf16_training", f"{rec.get('dtype')}: loss {fmt(first, '.3f')} (first {k}) -> "
              f"{fmt(last, '.3f')} (last {k}) over {losses['steps']} steps", PASS if ok else FAIL,
              "" if losses["finite"] else "non-finite loss", value=losses)
    snap = rec.get("memory_snapshot")
    if snap is None:
        c.missing("memory_snapshot", rec.get("error", ""))
    elif not snap.get("written"):
        verdict = SKIPPED if c.dry else FAIL
        c.add("memory_snapshot", "no snapshot", verdict, snap.get("note", ""))
    else:
        ok = snap.get("segments", 0) > 0
        c.add("memory_snapshot", f"{snap['bytes'] / 2**20:.1f} MiB, {snap.get('segments')} segments, "
              f"{snap.get('trace_entries')} trace entries", PASS if ok else FAIL, snap.get("note", ""))


def judge_tensor_stats(rec: dict, c: Checks) -> None:
    big = rec.get("big")
    if big is None:
        c.missing("tensor_stats_2e31", rec.get("error", ""))
    else:
        figure = (f"n = {big['n']:,} {big['dtype']}: {'matches' if big['ok'] else 'differs'}"
                  + (f"; {big['gb_per_s']:.0f} GB/s" if big.get("gb_per_s") else ""))
        verdict = PASS if big["ok"] and big["n"] > 2**31 else FAIL
        note = "; ".join(big.get("problems", []))[:400]
        if big["n"] <= 2**31:
            verdict = SKIPPED
            note = (f"needs CUDA (4 GiB); the analytic oracle ran on {big['n']:,} elements on {rec.get('device')}: "
                    f"{'agrees' if big['ok'] else 'DIFFERS: ' + note}")
        c.add("tensor_stats_2e31", figure, verdict, note)
    cases = rec.get("cases")
    if cases is None:
        return c.missing("tensor_stats_sweep", rec.get("error", ""))
    bad = [x for x in cases if not x["ok"]]
    figure = f"{len(cases) - len(bad)}/{len(cases)} cases match on {rec.get('device')} ({rec.get('kernel')})"
    off = rec.get("op_triton_off_reason")
    ok = bool(cases) and not bad and not off
    note = "; ".join(f"{x['dtype']} n={x['n']} bins={x['bins']}: {x['why']}" for x in bad[:4])[:400]
    if off:
        note = f"the op switched to the reference: {off}; " + note
    c.add("tensor_stats_sweep", figure, PASS if ok else FAIL, note)


def judge_throughput(rec: dict, c: Checks) -> None:
    if "compiled_tokens_per_s" not in rec:
        for key in ("tokens_per_s", "mfu", "compile_s", "compiled_vs_eager"):
            c.missing(key)
        return
    where = (f"{rec.get('preset')}, {rec.get('device')}, {rec.get('dtype')}, "
             f"B{rec.get('batch_size')} T{rec.get('block_size')}")
    c.reported("tokens_per_s", f"{rec['compiled_tokens_per_s']:,.0f} tok/s ({rec['compiled_ms']:.1f} ms/step; {where})",
               value=rec["compiled_tokens_per_s"])
    mfu = rec.get("mfu")
    c.reported("mfu", fmt(mfu * 100 if mfu is not None else None, ".1f", "%"),
               "" if mfu is not None else "no peak known for this device (CPU, or a GPU not in the table)", value=mfu)
    c.reported("compile_s", fmt(rec.get("compile_s"), ".1f", " s"), value=rec.get("compile_s"))
    c.reported("compiled_vs_eager", f"{rec['speedup']:.2f}x (eager {rec['eager_tokens_per_s']:,.0f} tok/s)",
               value=rec["speedup"])


def judge_overhead(key: str, naive_key: str, limit: float) -> Callable[[dict, Checks], None]:
    def judge(rec: dict, c: Checks) -> None:
        if "full_overhead_pct" not in rec:
            c.missing(key)
            c.missing(naive_key)
            return
        pct = rec["full_overhead_pct"]
        paired = (rec.get("paired_range_pct") or {}).get("full")
        verdict, note = at_most(pct, limit, paired)
        ranges = rec.get("telemetry_ranges_pct")
        where = f"{rec.get('preset')}, {rec.get('device')}, {'compiled' if rec.get('compile') else 'eager'}"
        c.add(key, f"full {pct:+.2f}% ({rec['full_ms']:.2f} vs bare {rec['bare_ms']:.2f} ms/step; {where})",
              verdict, note + (f"; telemetry's own ranges {ranges:.2f}% of a bare step" if ranges is not None else ""),
              value=pct)
        naive_paired = (rec.get("paired_range_pct") or {}).get("naive")
        c.reported(naive_key, f"naive {rec['naive_overhead_pct']:+.2f}% ({rec['naive_ms']:.2f} ms/step)",
                   f"paired range {naive_paired[0]:+.1f}..{naive_paired[1]:+.1f}%" if naive_paired else "",
                   value=rec["naive_overhead_pct"])
    return judge


def judge_eval_probes(rec: dict, c: Checks) -> None:
    if "overhead_pct" not in rec:
        return c.missing("eval_probes", rec.get("error", ""))
    every, default = rec["every"], rec["default_every"]
    pct, paired = rec["overhead_pct"], rec.get("paired_range_pct")
    verdict, note = at_most(pct, EVAL_PROBES_PCT, paired)
    if every > default and verdict == PASS:
        verdict, note = UNRESOLVED, f"measured at a sparser cadence ({every}) than the default ({default}); {note}"
    elif every < default and verdict != PASS:
        verdict = UNRESOLVED
        note = (f"measured at every {every} steps, {default / every:g}x denser than the default {default}, where it is "
                f"an upper bound; the default cadence itself was not measured; {note}")
    per_block = rec.get("event_seconds_per_block")
    figure = (f"{pct:+.2f}% with eval + samples + probes every {every} steps ({rec['rounds']} round(s) of "
              f"{every}-step blocks, {rec.get('preset')}, {rec.get('device')}); on - off = "
              f"{fmt(per_block, '.2f', ' s')} per block")
    c.add("eval_probes", figure, verdict, note + "; in-call wall time per event: " + ", ".join(
        f"{k} {v:.2f} s" for k, v in rec.get("event_call_s", {}).items()), value=pct)


def judge_stats(rec: dict, c: Checks) -> None:
    rows = [r for r in rec.get("per_size", []) if r.get("device") == ("cpu" if c.dry else "cuda")]
    if not rows:
        c.missing("stats_speedup")
        c.missing("stats_bandwidth")
        return
    head = next((r for r in rows if r["n"] == 10_000_000), rows[-1])
    c.reported("stats_speedup", f"{head['speedup']:.2f}x vs {head['best_baseline']} at {head['n']:,} fp32 "
               f"({head['device']}); " + ", ".join(f"{r['n']:.0e}: {r['speedup']:.2f}x" for r in rows),
               value=head["speedup"])
    peak = rec.get("peak_gb_per_s")
    big = rows[-1]
    frac = big.get("fraction_of_peak")
    c.reported("stats_bandwidth", f"{big['fused_gb_per_s']:.3g} GB/s of input at {big['n']:,} fp32"
               + (f" = {frac:.0%} of the {peak:.0f} GB/s peak (two passes over x: 50% is the ceiling)"
                  if frac is not None else " (no peak bandwidth known here)"), value=frac)


def judge_profiled(rec: dict, c: Checks) -> None:
    if "rc" not in rec:
        for key in ("profile_run", "profile_ranges", "profile_kernels", "nvml_tensorboard"):
            c.missing(key, rec.get("error", ""))
        return
    ok = rec["rc"] == 0 and rec.get("last_step") == rec.get("max_iters")
    c.add("profile_run", f"exit {rec['rc']}, {rec.get('last_step')}/{rec.get('max_iters')} steps logged, "
          f"{rec.get('seconds', 0):.0f} s; median {fmt(rec.get('step_ms'), '.1f', ' ms/step')}, "
          f"{fmt(rec.get('tokens_per_s'), ',.0f', ' tok/s')}, compile {fmt(rec.get('compile_s'), '.1f', ' s')}",
          PASS if ok else FAIL, rec.get("note", ""))
    missing = rec.get("ranges_missing")
    if missing is None:
        c.missing("profile_ranges", rec.get("trace_error", "no trace"))
    else:
        c.add("profile_ranges", f"{len(PROFILE_RANGES) - len(missing)}/{len(PROFILE_RANGES)} ranges in "
              f"{rec.get('trace_mb', 0):.1f} MB of trace", PASS if not missing else FAIL,
              ("missing: " + ", ".join(missing)) if missing else "")
    kernels = rec.get("kernel_events")
    if kernels is None:
        c.missing("profile_kernels", rec.get("trace_error", "no trace"))
    else:
        c.add("profile_kernels", f"{kernels} kernel events ({rec.get('triton_kernel_events', 0)} Triton)",
              PASS if kernels > 0 else FAIL, "" if kernels else "no CUDA activity in the trace")
    tags = rec.get("nvml_tags")
    if tags is None:
        c.missing("nvml_tensorboard", rec.get("tb_error", "no TensorBoard events"))
    else:
        c.add("nvml_tensorboard", f"{len(tags)} system/gpu0/* tags, {rec.get('nvml_points', 0)} points"
              + (f" ({', '.join(t.rsplit('/', 1)[-1] for t in tags[:6])})" if tags else ""),
              PASS if tags and rec.get("nvml_points", 0) > 0 else FAIL,
              "" if tags else "no system/gpu0/* scalar (NVML off on CPU)" if c.dry else "NVML metrics missing")


# --- the plan ----------------------------------------------------------------------------------

# Budgets (seconds, GPU): they add up to the deadline's 460 s of step time; a step may also use
# what earlier steps left unused, never what later steps are owed (step_timeout). Not measured on
# a GPU yet: sized from ~70 ms per reference step (25 TFLOP at ~35% of an H200's bf16 peak), a
# ~40-60 s cold torch.compile, then ~10-15 s from inductor's on-disk cache (1b compiles the
# reference graphs first and later steps reuse them), and ~0.5-1 s per Triton kernel variant (1c
# compiles them, 1a reuses them). The order is the priority: what matters most runs first.
STEPS: list[Step] = [
    Step("0a", "install", "install the project; versions", 55, 90, 20,
         lambda ctx, work, t: me("install", ctx, work, t), judge_install, needs_cuda=False),
    Step("1b", "sync_bf16", "zero host syncs over compiled bf16 steps; bf16 loss falls; memory snapshot", 85, 180, 45,
         lambda ctx, work, t: me("sync", ctx, work, t), judge_sync),
    Step("1c", "tensor_stats", "Triton tensor_stats vs the reference; one tensor over 2**31 elements", 40, 120, 15,
         lambda ctx, work, t: me("tensor_stats", ctx, work, t), judge_tensor_stats),
    Step("1a", "cuda_tests", "the project's CUDA tests (pytest -k cuda)", 30, 180, 15,
         lambda ctx, work, t: me("pytest", ctx, work, t), judge_cuda_tests),
    Step("2", "throughput", "bench/throughput.py, reference preset", 30, 240, 20,
         bench("throughput.py", ["--preset", "reference", "--device", "cuda", "--steps", "8", "--repeats", "3",
                                 "--warmup", "2"],
               ["--preset", "tiny", "--device", "cpu", "--steps", "2", "--repeats", "1", "--warmup", "1"]),
         judge_throughput),
    Step("3a", "overhead_reference", "bench/overhead.py, reference preset", 45, 180, 30,
         bench("overhead.py", ["--preset", "reference", "--device", "cuda", "--steps", "20", "--repeats", "3",
                               "--warmup", "3", "--log_freq", "20"],
               ["--preset", "tiny", "--device", "cpu", "--no_compile", "--log_train_freq", "2", "--log_freq", "4",
                "--steps", "4", "--repeats", "1", "--warmup", "1"]),
         judge_overhead("overhead_reference", "naive_reference", OVERHEAD_REFERENCE_PCT)),
    Step("6", "profiled_run", "300-step reference run with --profile: trace and NVML", 60, 180, 40,
         lambda ctx, work, t: me("profiled", ctx, work, t), judge_profiled),
    Step("4", "eval_probes", "eval + samples + probes end to end (on vs off)", 45, 180, 30,
         lambda ctx, work, t: me("eval_probes", ctx, work, t), judge_eval_probes),
    Step("5", "stats", "bench/stats.py on CUDA: fused vs torch ops, GB/s", 15, 120, 10,
         bench("stats.py", ["--device", "cuda", "--sizes", "1e6,1e7,1e8", "--repeats", "8", "--warmup", "2",
                            "--no-compile"],
               ["--device", "cpu", "--sizes", "1e4,1e5", "--repeats", "2", "--warmup", "1", "--no-compile"]),
         judge_stats),
    Step("3b", "overhead_launch_bound", "bench/overhead.py, small preset (launch-bound)", 45, 180, 30,
         bench("overhead.py", ["--preset", "small", "--device", "cuda", "--steps", "50", "--repeats", "4",
                               "--warmup", "3", "--log_freq", "50"],
               ["--preset", "tiny", "--device", "cpu", "--no_compile", "--log_train_freq", "2", "--log_freq", "4",
                "--steps", "4", "--repeats", "1", "--warmup", "1"]),
         judge_overhead("overhead_launch_bound", "naive_launch_bound", OVERHEAD_LAUNCH_BOUND_PCT)),
    Step("0b", "wandb", "the W&B backend, offline", 10, 120, 5,
         lambda ctx, work, t: me("wandb", ctx, work, t), judge_wandb, needs_cuda=False),
]


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


def last_json(text: str) -> dict | None:
    """The last stdout line that is a JSON object (children may emit partial records first)."""
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict):
                return value
    return None


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


def clean(value: Any) -> Any:
    """JSON-safe: non-finite floats become None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    return value


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


# ---------------------------------------------------------------------------------------------
# In-process checks (`--check NAME`): each prints progress, then one JSON line
# ---------------------------------------------------------------------------------------------


def emit(record: dict) -> None:
    sys.stdout.flush()
    print(json.dumps(clean(record), default=str), flush=True)


def check_env(a: argparse.Namespace) -> dict:
    """Versions, GPU, the extension, wandb, compilers: what the summary calls the machine."""
    import importlib.metadata
    import importlib.util
    import platform
    import sysconfig

    def version(dist: str) -> str | None:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    env: dict[str, Any] = {"python": platform.python_version(), "cpu_count": os.cpu_count(),
                           "platform": platform.platform(), "executable": sys.executable,
                           "triton_interpret_in_env": os.environ.get("TRITON_INTERPRET")}
    for dist in ("torch", "triton", "tensorboard", "nvidia-ml-py", "numpy", "tqdm", "pytest", "wandb",
                 "setuptools", "pip"):
        env[dist.replace("-", "_")] = version(dist)
    env["wandb"] = env["wandb"] if importlib.util.find_spec("wandb") else None
    env["c_compiler"] = shutil.which("cc") or shutil.which("gcc")
    env["cxx_compiler"] = shutil.which("c++") or shutil.which("g++")
    env["python_h"] = (pathlib.Path(sysconfig.get_paths()["include"]) / "Python.h").exists()
    from common import cpu_model

    env["cpu"] = cpu_model()
    import torch

    env["torch"] = torch.__version__
    env["cuda_available"] = torch.cuda.is_available()
    env["cuda"] = torch.version.cuda
    if env["cuda_available"]:
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=torch.cuda.get_device_name(0), gpu_count=torch.cuda.device_count(),
                   gpu_memory_gib=round(props.total_memory / 2**30, 1), capability=f"{props.major}.{props.minor}",
                   bf16_supported=torch.cuda.is_bf16_supported())
        with contextlib.suppress(Exception):
            import pynvml

            pynvml.nvmlInit()
            driver = pynvml.nvmlSystemGetDriverVersion()
            env["driver"] = driver.decode() if isinstance(driver, bytes) else driver
            pynvml.nvmlShutdown()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import bdh_fast
            from bdh_fast import ops
            from bdh_fast.telemetry.throughput import peak_tflops
    except Exception as e:  # noqa: BLE001 - the versions above still make the record
        env["bdh_fast_error"] = f"{type(e).__name__}: {e}"[:300]
        return env
    env["has_native"] = ops.HAS_NATIVE
    env["native_warning"] = next((str(w.message) for w in caught if "native extension" in str(w.message)), None)
    env["bdh_fast_path"] = str(pathlib.Path(bdh_fast.__file__).parent)
    if env["cuda_available"]:
        env["peak_tflops_bf16"] = peak_tflops(torch.device("cuda"), "bfloat16")
    return env


def check_install(a: argparse.Namespace) -> dict:
    rec: dict[str, Any] = {"check": "install"}
    probe_s = 10.0  # kept for the environment probe (imports torch and bdh_fast)
    end = time.monotonic() + a.budget - 2.0
    if a.dry_run or a.skip_pip:
        rec["pip_skipped"] = ("--dry-run: the project is already installed here" if a.dry_run
                              else "--no-install: the project is taken as installed")
    else:
        rec["pip"] = pip_install([], "pip install --no-build-isolation --no-deps --no-index -e .",
                                 end - probe_s - time.monotonic())
        out = rec["pip"].pop("output")
        if rec["pip"]["rc"] != 0 and end - probe_s - time.monotonic() > 10:
            # Without a compiler or Python headers the extension cannot build: install the package
            # without it (ops falls back to its reference on CPU; CUDA runs Triton either way).
            # A system Python that refuses pip (PEP 668) gets --break-system-packages: it adds
            # bdh_fast only (--no-deps), nothing preinstalled changes.
            extra = ["--break-system-packages"] if "externally-managed" in out else []
            env = {"BDH_FAST_NO_EXT": "1"} if not extra else {}
            how = "retry with " + (" ".join(extra) if extra else "BDH_FAST_NO_EXT=1 (no extension)")
            rec["pip_retry"] = pip_install(extra, how, end - probe_s - time.monotonic(), env)
            rec["pip_retry"].pop("output")
    emit({**rec, "partial": True})
    # A fresh interpreter: the extension (if built just now) is imported after the install.
    try:
        probe = subprocess.run([sys.executable, __file__, "--check", "env", "--work", a.work, "--budget", "30"],
                               cwd=REPO, capture_output=True, text=True, timeout=max(5.0, end - time.monotonic()))
    except subprocess.TimeoutExpired:
        rec["env_error"] = "the environment probe timed out"
        return rec
    sys.stderr.write(probe.stderr[-4000:])
    rec["env"] = last_json(probe.stdout)
    return rec


def pip_install(extra: list[str], how: str, timeout: float, env: dict[str, str] | None = None) -> dict:
    cmd = [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index", *extra, "-e", "."]
    print(f"$ {' '.join(cmd[2:])} (timeout {timeout:.0f} s)", flush=True)
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **(env or {})})
        rc, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        rc, out = None, f"timed out after {timeout:.0f} s\n" + str(e.stdout or "")[-2000:]
    sys.stderr.write(out[-6000:])
    lines = out.strip().splitlines()
    errors = [ln for ln in lines if "error" in ln.lower()]
    error_line = (errors[-1] if errors else lines[-1] if lines else "")[:300] if rc != 0 else ""
    return {"how": how, "rc": rc, "seconds": time.monotonic() - t0, "output": out, "error_line": error_line}


def check_wandb(a: argparse.Namespace) -> dict:
    import importlib.metadata
    import importlib.util

    if importlib.util.find_spec("wandb") is None:
        return {"check": "wandb", "wandb": None}
    work = pathlib.Path(a.work)
    cmd = [sys.executable, "-m", "bdh_fast.train", "--preset", "tiny", "--no-compile", "--device", "cpu",
           "--max_iters", "4", "--log_freq", "2", "--log_backend", "wandb,jsonl", "--wandb_mode", "offline",
           "--eval_freq", "0", "--generate_freq", "0", "--probe_freq", "0", "--nvml_interval", "0",
           "--out_dir", str(work / "runs"), "--run_name", "wandb", "--no_progress"]
    env = {**os.environ, "WANDB_DIR": str(work), "WANDB_SILENT": "true", "WANDB_MODE": "offline"}
    try:
        proc = subprocess.run(cmd, cwd=REPO, stdout=sys.stderr, stderr=subprocess.PIPE, text=True,
                              timeout=max(5.0, a.budget - 5), env=env)
    except subprocess.TimeoutExpired:
        return {"check": "wandb", "wandb": importlib.metadata.version("wandb"), "rc": None,
                "note": f"the tiny W&B run took over {a.budget - 5:.0f} s"}
    sys.stderr.write(proc.stderr[-4000:])
    offline = [p for p in work.rglob("offline-run-*") if p.is_dir()]
    jsonl = work / "runs" / "wandb" / "metrics.jsonl"
    logged = sum('"train/loss"' in ln for ln in jsonl.read_text().splitlines()) if jsonl.exists() else 0
    could_not = [ln for ln in proc.stderr.splitlines() if "could not start" in ln]
    return {"check": "wandb", "wandb": importlib.metadata.version("wandb"), "rc": proc.returncode,
            "offline_runs": len(offline), "steps_logged": logged, "note": could_not[0][:300] if could_not else ""}


PYTEST_FILES = ("tests/test_ops.py", "tests/test_data.py", "tests/test_telemetry.py", "tests/test_profiling.py",
                "tests/test_system.py")


def check_pytest(a: argparse.Namespace) -> dict:
    """The CUDA tests by name (-k cuda also selects the `cuda` marker): some are marked, some only
    named; files that no longer exist are left out rather than failing the whole selection."""
    import xml.etree.ElementTree as ET

    junit = pathlib.Path(a.work) / "junit.xml"
    files = [f for f in PYTEST_FILES if (REPO / f).exists()]
    cmd = [sys.executable, "-m", "pytest", *files, "-k", "cuda", "-p", "no:cacheprovider", "-v", "-rA",
           "--continue-on-collection-errors", f"--junitxml={junit}", "-o", "junit_family=xunit2"]
    print("$ " + shell(cmd), flush=True)
    try:
        proc = subprocess.run(cmd, cwd=REPO, stdout=sys.stderr, stderr=subprocess.STDOUT,
                              timeout=max(5.0, a.budget - 5))
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        rc = None
    rec: dict[str, Any] = {"check": "pytest", "rc": rc, "files": files}
    if not junit.exists():
        rec["error"] = f"pytest wrote no report (exit {rc})"
        return rec
    tests = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed"}.get(child.tag, child.tag)
                message = (child.get("message") or (child.text or "").strip())[:300]
        tests.append({"id": f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}", "outcome": outcome,
                      "message": message, "seconds": float(case.get("time") or 0)})
    rec["tests"] = tests
    return rec


SYNC_MESSAGE = "synchronizing CUDA operation"


class SyncWatch:
    """The training loop under CUDA sync debug mode: "error" everywhere except the allowed sync
    points (DESIGN.md invariant 1: flush, eval, samples, probes, checkpoint; plus the memory
    snapshot's dump), which run under "warn" with their syncs counted. After a first violation the
    loop goes on under "warn" and records where each further sync comes from (a diagnosis in one
    run, rather than one error per run)."""

    ALLOWED = {"flush": "flush", "evaluate": "eval", "log_samples": "samples", "probe": "probe",
               "save_checkpoint": "checkpoint"}

    def __init__(self, trainer, cuda: bool):
        import torch

        self.torch, self.cuda, self.step = torch, cuda, 0
        self.events: dict[str, list[int]] = collections.defaultdict(list)
        self.syncs: collections.Counter = collections.Counter()
        self.sites: collections.Counter = collections.Counter()
        for attr, phase in self.ALLOWED.items():
            setattr(trainer, attr, self.allowed(phase, getattr(trainer, attr)))
        if trainer.probes is not None:  # gradient statistics inside the probe step's train_step
            trainer.probes.before_update = self.allowed("probe", trainer.probes.before_update, record=False)
        trainer.memory_snapshot.step = self.allowed("memory snapshot", trainer.memory_snapshot.step, record=False)

    def allowed(self, phase: str, fn: Callable, record: bool = True) -> Callable:
        def wrapped(*args, **kwargs):
            if record:
                self.events[phase].append(self.step)
            if not self.cuda:
                return fn(*args, **kwargs)
            previous = self.torch.cuda.get_sync_debug_mode()
            self.torch.cuda.set_sync_debug_mode("warn")
            caught: list = []
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    return fn(*args, **kwargs)
            finally:
                self.syncs[phase] += sum(SYNC_MESSAGE in str(w.message) for w in caught)
                for w in caught:  # other warnings (a part switching itself off, ...) stay visible
                    if SYNC_MESSAGE not in str(w.message):
                        print(f"warning ({phase}): {w.category.__name__}: {w.message}", file=sys.stderr)
                self.torch.cuda.set_sync_debug_mode(previous)
        return wrapped

    @contextlib.contextmanager
    def locate_syncs(self):
        """Under "warn": each sync warning's innermost project frames, counted by site."""
        with warnings.catch_warnings():
            warnings.simplefilter("always")

            def show(message, category, filename, lineno, file=None, line=None):
                if SYNC_MESSAGE in str(message):
                    self.sites[where_in_project(traceback.extract_stack()[:-1])] += 1
                else:
                    print(f"warning: {category.__name__}: {message}", file=sys.stderr)

            warnings.showwarning = show
            yield


def where_in_project(frames) -> str:
    """Innermost first: the frame that synchronised (often inside torch), then the innermost
    frames of the project's own code that led there."""
    frames = [f for f in frames if not f.filename.endswith(("warnings.py", "gpu_proof.py"))]
    ours = [f for f in frames if "/bdh_fast/" in f.filename or "/bench/" in f.filename]
    picked = ours[-3:]
    if frames and (not picked or frames[-1] is not picked[-1]):
        picked.append(frames[-1])
    return " <- ".join(f"{pathlib.Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(picked))


def jsonl_losses(run_dir: pathlib.Path) -> list[tuple[int, float | None]]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            r = json.loads(line)
            if "event" not in r and "train/loss" in r:
                rows.append((r["step"], r["train/loss"]))
    return rows


def check_sync(a: argparse.Namespace) -> dict:
    import gc

    import torch
    from common import bench_config

    from bdh_fast.train import Trainer

    cuda = not a.dry_run
    # Reference preset, compiled, bf16 on the GPU; eval, samples, probes and checkpoints every
    # `every` steps (and eval/samples/probes at the last step). The first `warm` steps (compile,
    # lazy init) run without sync debug: DESIGN.md's invariant is about the steady loop.
    total, every, warm = (MIN_SYNC_STEPS + 4, 18, 2) if cuda else (12, 4, 2)
    work = pathlib.Path(a.work)
    small = {} if cuda else {"eval_iters": 2, "sample_tokens": 8}  # the dry run: the loop, not the sizes
    config = bench_config("reference" if cuda else "tiny", "cuda" if cuda else "cpu", dtype="bfloat16",
                          compile=cuda, out_dir=str(work / "runs"), run_name="sync", progress=False,
                          max_iters=total, eval_freq=every, generate_freq=every, probe_freq=every, ckpt_freq=every,
                          **small)
    rec: dict[str, Any] = {"check": "sync", "preset": config.preset, "device": "cuda" if cuda else "cpu",
                           "compile": config.compile, "dtype": config.dtype, "sync_debug": cuda, "steps": total,
                           "warmup_steps": warm, "every": every}
    trainer = Trainer(config, None)
    watch = SyncWatch(trainer, cuda)
    violations: list[dict] = []
    checked = 0

    def progress() -> dict:
        return {**rec, "steps_checked": checked, "violations": violations, "events": dict(watch.events),
                "allowed_syncs": dict(watch.syncs), "later_sync_sites": dict(watch.sites.most_common(20))}

    try:
        for step in range(1, total + 1):
            watch.step = step
            strict = cuda and step > warm and not violations
            if cuda:
                torch.cuda.set_sync_debug_mode("error" if strict else "warn" if step > warm else 0)
            try:
                with watch.locate_syncs() if (cuda and violations) else contextlib.nullcontext():
                    trainer.run_step(step)
                checked += strict
            except RuntimeError as e:
                if SYNC_MESSAGE not in str(e):
                    raise
                frames = traceback.extract_tb(e.__traceback__)
                violations.append({"step": step, "where": where_in_project(frames),
                                   "traceback": traceback.format_exc()[-2500:]})
            finally:
                if cuda:
                    torch.cuda.set_sync_debug_mode(0)
            if step % every == 0:  # a step that runs out of time still says how far it got
                emit({**progress(), "partial": True})
        rec["compile_s"] = trainer.compile_s
    finally:
        if cuda:
            torch.cuda.set_sync_debug_mode(0)
        trainer.close()
    rec = {**progress(), "loop_done": True}
    values = [v for _, v in jsonl_losses(trainer.run_dir)]
    if values:
        k = max(3, len(values) // 5)
        first = [v for v in values[:k] if v is not None and math.isfinite(v)]
        last = [v for v in values[-k:] if v is not None and math.isfinite(v)]
        rec["loss"] = {"steps": len(values), "k": k, "finite": all(v is not None and math.isfinite(v) for v in values),
                       "first_mean": statistics.fmean(first) if first else math.nan,
                       "last_mean": statistics.fmean(last) if last else math.nan}
    emit({**rec, "partial": True})

    # The memory snapshot: its own short run through the CLI (tiny, eager), so its allocator
    # history stays small and a slow dump cannot eat the sync check's time.
    del trainer
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    try:
        rec["memory_snapshot"] = memory_snapshot_run(work, cuda, pathlib.Path(a.artifacts))
    except Exception as e:  # noqa: BLE001 - its own verdict, not the whole step's
        traceback.print_exc()
        rec["memory_snapshot"] = {"written": False, "note": f"{type(e).__name__}: {e}"[:300]}
    return rec


def memory_snapshot_run(work: pathlib.Path, cuda: bool, artifacts: pathlib.Path) -> dict:
    import io
    import pickle

    from bdh_fast import train

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = train.main(["--preset", "tiny", "--no-compile", "--device", "cuda" if cuda else "cpu", "--max_iters", "3",
                         "--memory_snapshot", "2", "--out_dir", str(work / "runs"), "--run_name", "snapshot",
                         "--no_progress", "--nvml_interval", "0", "--eval_freq", "0", "--generate_freq", "0",
                         "--probe_freq", "0", "--ckpt_freq", "0", "--log_backend", "jsonl"])
    path = work / "runs" / "snapshot" / "memory_snapshot.pickle"
    lines = [ln for ln in out.getvalue().splitlines() if "snapshot" in ln]
    result: dict[str, Any] = {"rc": rc, "written": path.exists(), "note": lines[-1][:300] if lines else ""}
    if path.exists():
        with open(path, "rb") as f:
            snapshot = pickle.load(f)  # our own file, just written
        result.update(bytes=path.stat().st_size, segments=len(snapshot.get("segments", [])),
                      trace_entries=sum(len(t) for t in snapshot.get("device_traces", [])),
                      artifact=keep_artifact(path, artifacts, "memory_snapshot.pickle.gz"))
    return result


def patterned_case(n: int, device, kernel: Callable, period: int = 64) -> dict:
    """tensor_stats of x[i] = i % period in bf16 (exact), with NaN, +-Inf and new extremes written
    at the end and on both sides of index 2**31 (when n > 2**31), against statistics computed
    exactly in Python: counts, extremes, sums (exact in float64 for these values) and buckets with
    the op's own float64 bucket arithmetic. No float64 copy of a 4 GiB tensor needed."""
    import torch

    from bdh_fast import ops

    x = torch.arange(period, dtype=torch.bfloat16, device=device).repeat(n // period + 1)[:n]  # (n,)
    overrides = {n - 1: math.nan, n - 2: math.inf, n - 3: -math.inf, n - 4: 1000.0, n - 5: -7.0}
    middle = 2**31 if n > 2**31 else n // 2
    overrides.update({middle - 1: 0.5, middle: -0.25})
    for pos, value in overrides.items():
        x[pos] = value
    bins = 64
    full_periods, rem = divmod(n, period)
    finite = collections.Counter({fractions.Fraction(v): full_periods + (v < rem) for v in range(period)})
    nan = inf = 0
    for pos, value in overrides.items():
        finite[fractions.Fraction(pos % period)] -= 1
        if math.isnan(value):
            nan += 1
        elif math.isinf(value):
            inf += 1
        else:
            finite[fractions.Fraction(value)] += 1
    finite = collections.Counter({v: c for v, c in finite.items() if c})
    lo, hi = float(min(finite)), float(max(finite))
    scale = bins / (hi - lo)  # float64, as the kernels: bins / (max - min), correctly rounded
    hist = [0] * bins
    for v, count in finite.items():
        pos = (float(v) - lo) * scale
        hist[int(pos if pos < bins - 1 else bins - 1)] += count
    expected = {"count": n, "sum": float(sum(v * c for v, c in finite.items())),
                "sum_sq": float(sum(v * v * c for v, c in finite.items())), "min": lo, "max": hi,
                "nonzero": n - finite[fractions.Fraction(0)], "absmax": max(-lo, hi), "nan_count": nan,
                "inf_count": inf}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for _ in range(4):
        sync()
        t0 = time.perf_counter()
        stats, got_hist = kernel(x, bins)
        sync()
        times.append(time.perf_counter() - t0)
    got = ops.stats_to_dict(stats)
    problems = [f"{k}: got {got[k]!r}, expected {v!r}" for k, v in expected.items()
                if not (got[k] == v or abs(got[k] - v) <= 1e-12 * abs(v))]
    got_hist = got_hist.cpu().tolist()
    if got_hist != hist:
        diff = [i for i in range(bins) if got_hist[i] != hist[i]]
        problems.append(f"histogram differs in {len(diff)} bucket(s), first {diff[:5]}")
    seconds = statistics.median(times[1:])  # the first call may JIT the kernels
    return {"n": n, "dtype": "bfloat16", "ok": not problems, "problems": problems, "seconds": seconds,
            "gb_per_s": n * 2 / seconds / 1e9 if device.type == "cuda" else None}


def specials_tensor(n: int, dtype, seed: int):
    """randn with NaN, +Inf, -Inf and zeros sprinkled (as tests/test_ops.py's inputs)."""
    import torch

    x = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    if n > 10:
        x[:: max(1, n // 5)] = math.nan
        x[1 :: max(1, n // 3)] = math.inf
        x[2 :: max(1, n // 4)] = -math.inf
        x[3 :: max(1, n // 6)] = 0.0
    return x.to(dtype)


def compare_to_reference(x, bins: int, kernel: Callable) -> str:
    """'' when the op equals the float64 reference: counts, extremes and buckets exactly, sums to
    1e-9 of sum|x| (each implementation sums in float64, in its own order)."""
    import torch

    from bdh_fast import ops

    stats, hist = kernel(x, bins)
    ref_stats, ref_hist = ops.tensor_stats_reference(x, bins)
    got, want = ops.stats_to_dict(stats), ops.stats_to_dict(ref_stats)
    problems = []
    for field in ("count", "min", "max", "nonzero", "absmax", "nan_count", "inf_count"):
        if not (got[field] == want[field] or (math.isnan(got[field]) and math.isnan(want[field]))):
            problems.append(f"{field} {got[field]!r} != {want[field]!r}")
    values = x.detach().double().reshape(-1)
    l1 = values[values.isfinite()].abs().sum().item()
    for field, tol in (("sum", 1e-9 * l1), ("sum_sq", 1e-9 * abs(want["sum_sq"]))):
        if not (got[field] == want[field] or abs(got[field] - want[field]) <= tol + 1e-12):
            problems.append(f"{field} {got[field]!r} != {want[field]!r}")
    if not torch.equal(hist.cpu(), ref_hist.cpu()):
        problems.append(f"histogram differs in {int((hist.cpu() != ref_hist.cpu()).sum())} bucket(s)")
    return "; ".join(problems)


def check_tensor_stats(a: argparse.Namespace) -> dict:
    import torch

    from bdh_fast import ops

    cuda = not a.dry_run
    device = torch.device("cuda" if cuda else "cpu")
    rec: dict[str, Any] = {"check": "tensor_stats", "device": device.type}
    # On CUDA the Triton kernel itself, not the op: the op falls back to the reference (with one
    # warning) when a kernel fails its self-check, and would then agree with it trivially. Whether
    # the op still serves Triton at the end is checked apart (triton_off_reason).
    if cuda:
        from bdh_fast.triton_stats import triton_tensor_stats as kernel

        rec["kernel"] = "triton"
    else:
        kernel = ops.tensor_stats
        rec["kernel"] = "native C++" if ops.HAS_NATIVE else "reference"
    # The one large tensor first: the claim least covered elsewhere.
    n_big = 2**31 + 4099 if cuda else 10_007
    try:
        rec["big"] = patterned_case(n_big, device, kernel)
    except Exception as e:  # noqa: BLE001 - reported; the sweep still runs
        traceback.print_exc()
        rec["big"] = {"n": n_big, "dtype": "bfloat16", "ok": False, "problems": [f"{type(e).__name__}: {e}"[:300]]}
    if cuda:
        torch.cuda.empty_cache()
    emit({**rec, "partial": True})
    sizes = [0, 1, 1000, 1_000_003, 2**24 + 3] if cuda else [0, 1, 1000, 100_003]
    cases = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        for n in sizes:
            x = specials_tensor(n, dtype, seed=n).to(device)
            for bins in (64, 3000):
                try:
                    why = compare_to_reference(x, bins, kernel)
                except Exception as e:  # noqa: BLE001 - a case that raises is a case that fails
                    why = f"{type(e).__name__}: {e}"[:300]
                cases.append({"dtype": str(dtype).removeprefix("torch."), "n": n, "bins": bins, "ok": not why,
                              "why": why})
    rec["cases"] = cases
    if cuda:  # the op itself on each dtype: does it serve the Triton kernels (its gate still on)?
        for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            for bins in (64, 3000):
                ops.tensor_stats(specials_tensor(1000, dtype, seed=1).to(device), bins)
        rec["op_triton_off_reason"] = ops.triton_off_reason()
    return rec


def check_eval_probes(a: argparse.Namespace) -> dict:
    """The same training run with evaluation, samples and probes on vs off: two Trainers, same
    config but for those cadences, in interleaved blocks of `every` steps (off, on, off, on, ...).
    Each "on" block holds exactly one evaluation, one round of samples and one probe; both hold
    the same flushes and console lines. The cost is measured, not a per-call time x a cadence."""
    import torch
    from common import bench_config, interleaved, median
    from overhead import Full

    started = time.monotonic()
    cuda = not a.dry_run
    every, rounds = (100, 2) if cuda else (10, 1)
    work = pathlib.Path(a.work)
    preset, device = ("reference", "cuda") if cuda else ("tiny", "cpu")
    defaults = bench_config(preset, device)
    base = dict(compile=cuda, out_dir=str(work / "runs"), progress=False, max_iters=10**6, ckpt_freq=0,
                log_freq=every, **({} if cuda else {"eval_iters": 2, "sample_tokens": 8}))
    off = Full(bench_config(preset, device, run_name="off", eval_freq=0, generate_freq=0, probe_freq=0, **base))
    on = Full(bench_config(preset, device, run_name="on", eval_freq=every, generate_freq=every, probe_freq=every,
                           **base))
    ltf = on.trainer.config.log_train_freq
    rec: dict[str, Any] = {"check": "eval_probes", "preset": preset, "device": device, "every": every,
                           "default_every": min(defaults.eval_freq, defaults.generate_freq, defaults.probe_freq),
                           "default_cadences": {"eval": defaults.eval_freq, "samples": defaults.generate_freq,
                                                "probe": defaults.probe_freq},
                           "eval_iters": on.trainer.config.eval_iters,
                           "sample_tokens": on.trainer.config.sample_tokens,
                           "log_train_freq": ltf}
    calls: dict[str, list[float]] = collections.defaultdict(list)

    def timed(name: str, fn: Callable) -> Callable:
        def wrapped(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                calls[name].append(time.perf_counter() - t0)
        return wrapped

    try:
        # Warm-up, untimed: compilation, the first flushes, the eval graph, the sampling path.
        # Both then stand on a window boundary, so every block of `every` steps holds the same
        # flushes and one console line; each "on" block one eval, one samples round, one probe.
        for variant in (off, on):
            variant.steps(ltf)
        on.trainer.evaluate()
        on.trainer.log_samples()
        if on.trainer.probes is not None:  # the probe's own first-call costs (neuron statistics)
            on.trainer.probes.before_update()
            on.trainer.probe()
        for name, attr in (("eval", "evaluate"), ("samples", "log_samples"), ("probe", "probe")):
            setattr(on.trainer, attr, timed(name, getattr(on.trainer, attr)))
        block_s: dict[str, list[float]] = {"off": [], "on": []}
        t_start = time.monotonic()
        for r in range(rounds):
            now = time.monotonic()
            if r and now - started + (now - t_start) / r > a.budget - 10:
                rec["rounds_cut"] = f"stopped after {r} round(s): the next would not fit the budget"
                break
            blocks = {"off": lambda: off.steps(every), "on": lambda: on.steps(every)}
            if r % 2:  # off, on; then on, off: a drift over the run hits both alike
                blocks = dict(reversed(blocks.items()))
            times = interleaved(blocks, repeats=1, warmup=0, device=torch.device(device),
                                settle={"off": off.settle, "on": on.settle})
            for name in block_s:
                block_s[name] += times[name]
            emit({**rec, "partial": True, "block_s": block_s})
    finally:
        off.close()
        on.close()
    paired = [(b / a_ - 1) * 100 for a_, b in zip(block_s["off"], block_s["on"])]
    rec.update(rounds=len(block_s["on"]), block_s=block_s, off_step_ms=median(block_s["off"]) / every * 1e3,
               overhead_pct=(median(block_s["on"]) / median(block_s["off"]) - 1) * 100,
               paired_range_pct=[min(paired), max(paired)],
               event_seconds_per_block=median(block_s["on"]) - median(block_s["off"]),
               event_calls={k: len(v) for k, v in calls.items()},
               event_call_s={k: median(v) for k, v in calls.items()})
    return rec


def check_profiled(a: argparse.Namespace) -> dict:
    """python -m bdh_fast.train with --profile and the default backends; the profiler's active
    window covers the step where eval, samples, probes and a checkpoint all happen (`every`)."""
    cuda = not a.dry_run
    steps, every = (300, 100) if cuda else (12, 6)
    work = pathlib.Path(a.work)
    run_dir = work / "runs" / "profiled"
    cmd = [sys.executable, "-m", "bdh_fast.train", "--preset", "reference" if cuda else "tiny",
           "--device", "cuda" if cuda else "cpu", "--max_iters", str(steps), "--profile",
           # profiler steps: wait every-4, warm-up 2, active 3 = training steps every-1, every, every+1
           "--profile_wait", str(every - 4), "--profile_warmup", "2", "--profile_active", "3",
           "--profile_repeat", "1", "--eval_freq", str(every), "--generate_freq", str(every),
           "--probe_freq", str(every), "--ckpt_freq", str(every), "--out_dir", str(work / "runs"),
           # 16 sampled bytes per prompt, not 100: the samples' eager decode inside the window
           # would otherwise make most of the trace (and its export time)
           "--sample_tokens", "16", "--run_name", "profiled", "--no_progress"]
    if not cuda:
        cmd += ["--no-compile", "--log_train_freq", "2"]  # a flush at `every`, inside the window
    print("$ " + shell(cmd), flush=True)
    rec: dict[str, Any] = {"check": "profiled", "max_iters": steps, "every": every}
    t0 = time.monotonic()
    log = work / "train.log"
    with open(log, "w") as out:
        try:
            proc = subprocess.run(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                  timeout=max(10.0, a.budget - 10))
            rec["rc"] = proc.returncode
        except subprocess.TimeoutExpired:
            rec["rc"], rec["note"] = None, f"the run timed out after {a.budget - 10:.0f} s"
    rec["seconds"] = time.monotonic() - t0
    output = log.read_text(errors="replace")
    sys.stderr.write(output[-6000:])
    for line in output.splitlines():
        if line.startswith("compile: "):
            with contextlib.suppress(ValueError):
                rec["compile_s"] = float(line.split()[1])
    losses = jsonl_losses(run_dir)
    rec["last_step"] = losses[-1][0] if losses else None
    perf = []
    with contextlib.suppress(OSError):
        for line in (run_dir / "metrics.jsonl").read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                r = json.loads(line)
                if "perf/step_ms" in r and r.get("step", 0) > 10:
                    perf.append((r["perf/step_ms"], r.get("perf/tokens_per_sec")))
    if perf:
        rec["step_ms"] = statistics.median(p[0] for p in perf)
        rec["tokens_per_s"] = statistics.median(p[1] for p in perf if p[1] is not None)
    emit({**rec, "partial": True})
    try:
        rec.update(trace_summary(run_dir, pathlib.Path(a.artifacts)))
    except Exception as e:  # noqa: BLE001 - an unreadable trace is reported as such
        rec["trace_error"] = f"{type(e).__name__}: {e}"[:300]
    rec.update(tensorboard_summary(run_dir))
    return rec


def trace_summary(run_dir: pathlib.Path, artifacts: pathlib.Path) -> dict:
    traces = sorted(run_dir.glob("*.pt.trace.json*"))
    if not traces:
        return {"traces": 0}
    names: set[str] = set()
    kernels = triton = 0
    size = 0
    for path in traces:
        size += path.stat().st_size
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt") as f:
            events = json.load(f).get("traceEvents", [])
        for e in events:
            names.add(e.get("name"))
            if str(e.get("cat", "")).lower() == "kernel":
                kernels += 1
                triton += str(e.get("name", "")).startswith("triton")
    kept = keep_artifact(traces[0], artifacts, "profiled_run.pt.trace.json.gz")
    return {"traces": len(traces), "trace_mb": size / 2**20,
            "ranges_found": sorted(n for n in PROFILE_RANGES if n in names),
            "ranges_missing": [n for n in PROFILE_RANGES if n not in names], "kernel_events": kernels,
            "triton_kernel_events": triton, "trace_artifact": kept}


def keep_artifact(path: pathlib.Path, artifacts: pathlib.Path, name: str) -> str | None:
    """A gzip copy under --out/artifacts when it stays under ARTIFACT_LIMIT; else None."""
    artifacts.mkdir(parents=True, exist_ok=True)
    target = artifacts / name
    with open(path, "rb") as src, gzip.open(target, "wb", compresslevel=3) as dst:
        shutil.copyfileobj(src, dst)
    if target.stat().st_size >= ARTIFACT_LIMIT:
        target.unlink()
        return None
    return str(target.name)


def tensorboard_summary(run_dir: pathlib.Path) -> dict:
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
        acc.Reload()
        tags = acc.Tags().get("scalars", [])
    except Exception as e:  # noqa: BLE001 - reported as the check's note
        return {"tb_error": f"{type(e).__name__}: {e}"[:300]}
    nvml = sorted(t for t in tags if t.startswith("system/gpu0/"))
    return {"scalar_tags": len(tags), "nvml_tags": nvml, "nvml_points": sum(len(acc.Scalars(t)) for t in nvml),
            "memory_tags": sorted(t for t in tags if t.startswith("system/mem_"))}


CHECKS: dict[str, Callable[[argparse.Namespace], dict]] = {
    "env": check_env, "install": check_install, "wandb": check_wandb, "pytest": check_pytest,
    "sync": check_sync, "tensor_stats": check_tensor_stats, "eval_probes": check_eval_probes,
    "profiled": check_profiled,
}


def run_check(a: argparse.Namespace) -> int:
    """A child: run one check, end stdout with its JSON record (an error is part of the record)."""
    pathlib.Path(a.work).mkdir(parents=True, exist_ok=True)
    try:
        record = CHECKS[a.check](a)
    except Exception as e:  # noqa: BLE001 - the harness reports it with the traceback
        traceback.print_exc()
        emit({"check": a.check, "partial": True, "error": f"{type(e).__name__}: {e}"[:500]})
        return 1
    emit(record)
    return 0


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="directory for the step files and the summary (created)")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, no pip: checks the harness")
    p.add_argument("--no-install", action="store_true", help="skip pip: the project is installed already")
    p.add_argument("--only", default=None, help="comma list of step ids or names, e.g. 1b,2 or sync_bf16,throughput")
    p.add_argument("--budget-scale", type=float, default=1.0, help="multiply every step's time budget")
    p.add_argument("--deadline", type=float, default=None,
                   help=f"seconds for the whole proof (default {GPU_DEADLINE_S:g}; {DRY_DEADLINE_S:g} with --dry-run)")
    p.add_argument("--work", default=None, help="scratch directory for runs (default: a temp dir, removed)")
    p.add_argument("--keep-work", action="store_true", help="keep the scratch directory")
    p.add_argument("--list", action="store_true", help="print the steps, budgets and targets, then exit")
    # internal: a child running one check
    p.add_argument("--check", choices=tuple(CHECKS), help=argparse.SUPPRESS)
    p.add_argument("--budget", type=float, default=60.0, help=argparse.SUPPRESS)
    p.add_argument("--artifacts", default=None, help=argparse.SUPPRESS)
    p.add_argument("--skip-pip", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.check is None and not a.list and not a.out:
        p.error("--out DIR is required")
    if a.budget_scale <= 0 or (a.deadline is not None and a.deadline <= 0):
        p.error("--budget-scale and --deadline must be > 0")
    a.plan = STEPS
    if a.only:
        wanted = [w.strip() for w in a.only.split(",") if w.strip()]
        known = {s.id: s for s in STEPS} | {s.name: s for s in STEPS} | {s.file_stem: s for s in STEPS}
        unknown = [w for w in wanted if w not in known]
        if unknown or not wanted:
            p.error(f"--only: unknown step(s) {', '.join(unknown) or '(none)'}; choose from "
                    + ", ".join(f"{s.id} ({s.name})" for s in STEPS))
        chosen = {known[w].id for w in wanted}
        a.plan = [s for s in STEPS if s.id in chosen]
    return a


def print_plan(dry: bool, scale: float) -> None:
    print("| order | step | budget s | min s | what |\n|---:|---|---:|---:|---|")
    for i, s in enumerate(STEPS, 1):
        print(f"| {i} | {s.id} {s.name} | {(s.dry_budget_s if dry else s.budget_s) * scale:.0f} | "
              f"{s.min_s * scale:.0f} | {s.title} |")
    print(f"\ntotal budget {sum((s.dry_budget_s if dry else s.budget_s) for s in STEPS) * scale:.0f} s; deadline "
          f"{DRY_DEADLINE_S if dry else GPU_DEADLINE_S:g} s\n")
    print("| check | target | source | CUDA only |\n|---|---|---|---|")
    for key, t in TARGETS.items():
        print(f"| {key}: {t.claim} | {t.target} | {t.source} | {'yes' if t.cuda_only else ''} |")


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.check:
        if a.artifacts is None:
            a.artifacts = str(pathlib.Path(a.work) / "artifacts")
        a.skip_pip = a.skip_pip or a.no_install
        return run_check(a)
    if a.list:
        print_plan(a.dry_run, a.budget_scale)
        return 0
    started = time.monotonic()
    out = pathlib.Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = pathlib.Path(a.work).resolve() if a.work else pathlib.Path(tempfile.mkdtemp(prefix="bdh-gpu-proof-"))
    work.mkdir(parents=True, exist_ok=True)
    deadline_s = a.deadline or (DRY_DEADLINE_S if a.dry_run else GPU_DEADLINE_S)
    ctx = Ctx(dry=a.dry_run, out=out, work=work, env=child_env(), scale=a.budget_scale,
              deadline=started + deadline_s - SUMMARY_RESERVE_S)
    raw_argv = sys.argv[1:] if argv is None else list(argv)
    print(f"gpu_proof{' --dry-run' if ctx.dry else ''}: {len(a.plan)} step(s), deadline {deadline_s:.0f} s, "
          f"files in {out}", flush=True)
    machine: dict = {}
    done: list[dict] = []  # results so far: the summary is rewritten after every step

    def after_each(result: dict) -> None:
        nonlocal machine
        done.append(result)
        if result["id"] == "0a":
            # the install step's environment record; if it ran out of time before it, a probe of its own
            machine = (result["record"] or {}).get("env") or probe_env(ctx)
            if not ctx.dry and not machine.get("cuda_available", False):
                ctx.stop_reason = "no CUDA GPU visible (torch.cuda.is_available() is False): run with --dry-run"
        write_summary(build_summary(done, ctx, machine, started, raw_argv, complete=False), ctx)

    complete = False
    try:
        plan = list(a.plan)
        if a.no_install:  # --no-install: the install step still probes the environment
            plan = [s if s.id != "0a" else dataclasses.replace(
                s, argv=lambda c, w, t: me("install", c, w, t, "--skip-pip")) for s in plan]
        if not any(s.id == "0a" for s in plan):
            machine = probe_env(ctx)
            if not ctx.dry and not machine.get("cuda_available", False):
                ctx.stop_reason = "no CUDA GPU visible (torch.cuda.is_available() is False): run with --dry-run"
        run_plan(plan, ctx, after_each)
        complete = True
    except KeyboardInterrupt:
        print("interrupted: writing what the proof has", file=sys.stderr)
    except Exception:  # noqa: BLE001 - the harness broke: say so, keep what was measured
        traceback.print_exc()
    summary = build_summary(done, ctx, machine, started, raw_argv, complete)
    text = write_summary(summary, ctx)
    fixed = enforce_file_limit(out)
    if fixed:
        print(f"cut to stay under 16 MB: {', '.join(fixed)}", file=sys.stderr)
    if not a.keep_work and not a.work:
        shutil.rmtree(work, ignore_errors=True)
    print()
    print(text)
    print(f"files: {out}")
    emit(summary)
    return 0 if complete else 1


def probe_env(ctx: Ctx, timeout: float = 40.0) -> dict:
    """The environment record (versions, GPU) when the install step does not provide it."""
    logs = ctx.out / "logs"
    run_process(me("env", ctx, ctx.work / "env", timeout), ctx.env, timeout, logs / "env.stdout.txt",
                logs / "env.stderr.txt")
    return last_json(read_text(logs / "env.stdout.txt")) or {}


if __name__ == "__main__":
    sys.exit(main())
