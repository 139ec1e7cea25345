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
REPORTED (a figure asked for, with no target). A check whose step failed, timed out or
never started carries FAILED, TIMEOUT or NOT RUN.

Exit status: 0 when the proof ran to its end and wrote its files, whatever the verdicts (read
summary.json); 1 when the harness itself broke; 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import shutil
import sys
import tempfile
import time
import traceback
from typing import Callable

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # bench/ is not a package: proof_*, common, overhead

# The code: this file holds the plan (the steps, their budgets, their judges), the dispatch of
# `--check NAME` in a child, and the command line. proof_verdicts.py: the targets table and the
# judges; proof_harness.py: running the steps, the files and the summary; proof_checks.py and
# proof_runs.py: the checks that run inside the step subprocesses.
from proof_checks import check_env, check_install, check_pytest, check_tensor_stats, check_wandb  # noqa: E402
from proof_harness import (SUMMARY_RESERVE_S, Ctx, Step, bench, build_summary, child_env,  # noqa: E402
                           emit, enforce_file_limit, me, probe_env, run_plan, write_summary)
from proof_runs import check_eval_probes, check_profiled, check_sync  # noqa: E402
from proof_verdicts import (OVERHEAD_LAUNCH_BOUND_PCT, OVERHEAD_REFERENCE_PCT, TARGETS,  # noqa: E402
                            judge_cuda_tests, judge_eval_probes, judge_install, judge_overhead, judge_profiled,
                            judge_stats, judge_sync, judge_tensor_stats, judge_throughput, judge_wandb)

GPU_DEADLINE_S = 470.0  # the whole proof stays under 8 minutes: 460 s of steps, 10 s for the summary
DRY_DEADLINE_S = 1200.0


# ---------------------------------------------------------------------------------------------
# The plan: the steps in priority order, each with its budgets and its judge
# ---------------------------------------------------------------------------------------------

# Budgets (seconds, GPU): they add up to the deadline's 460 s of step time; a step may also use
# what earlier steps left unused, never what later steps are owed (step_timeout). Not measured on
# a GPU yet: sized from ~70 ms per reference step (25 TFLOP at ~35% of an H200's bf16 peak), a
# ~40-60 s cold torch.compile, then ~10-15 s from inductor's on-disk cache (1b compiles the
# reference graphs first and later steps reuse them), and ~0.5-1 s per Triton kernel variant (1c
# compiles them, 1a reuses them). The order is the priority: what matters most runs first.
def overhead_step(step_id: str, name: str, preset: str, steps: int, repeats: int, naive_key: str,
                  limit: float) -> Step:
    """bench/overhead.py at a preset (bare vs full vs naive; the launch-bound rows are left out, as
    their time is not budgeted), judged against `limit`; the dry run is tiny and eager."""
    gpu = ["--preset", preset, "--device", "cuda", "--steps", str(steps), "--repeats", str(repeats), "--warmup", "3",
           "--log_freq", str(steps), "--no_launch_rows"]
    dry = ["--preset", "tiny", "--device", "cpu", "--no-compile", "--log_train_freq", "2", "--log_freq", "4",
           "--steps", "4", "--repeats", "1", "--warmup", "1", "--no_launch_rows"]
    return Step(step_id, name, f"bench/overhead.py, {preset} preset" + (" (launch-bound)" if preset == "small" else ""),
                45, 180, 30, bench("overhead.py", gpu, dry), judge_overhead(name, naive_key, limit))


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
    overhead_step("3a", "overhead_reference", "reference", 20, 3, "naive_reference", OVERHEAD_REFERENCE_PCT),
    Step("6", "profiled_run", "300-step reference run with --profile: trace and NVML", 60, 180, 40,
         lambda ctx, work, t: me("profiled", ctx, work, t), judge_profiled),
    Step("4", "eval_probes", "eval + samples + probes end to end (on vs off)", 45, 180, 30,
         lambda ctx, work, t: me("eval_probes", ctx, work, t), judge_eval_probes),
    Step("5", "stats", "bench/stats.py on CUDA: fused vs torch ops, GB/s", 15, 120, 10,
         bench("stats.py", ["--device", "cuda", "--sizes", "1e6,1e7,1e8", "--repeats", "8", "--warmup", "2",
                            "--no-compile"],
               ["--device", "cpu", "--sizes", "1e4,1e5", "--repeats", "2", "--warmup", "1", "--no-compile"]),
         judge_stats),
    overhead_step("3b", "overhead_launch_bound", "small", 50, 4, "naive_launch_bound", OVERHEAD_LAUNCH_BOUND_PCT),
    Step("0b", "wandb", "the W&B backend, offline", 10, 120, 5,
         lambda ctx, work, t: me("wandb", ctx, work, t), judge_wandb, needs_cuda=False),
]


# ---------------------------------------------------------------------------------------------
# In a child: `--check NAME` runs one check (bench/proof_checks.py, bench/proof_runs.py)
# ---------------------------------------------------------------------------------------------


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


if __name__ == "__main__":
    sys.exit(main())
