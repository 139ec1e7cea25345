"""The GPU proof's checks that train the model, each run in a child by `gpu_proof.py --check NAME`
and ending its stdout with one JSON record (partial records before it say how far it got):

- sync: compiled bf16 reference-preset steps under torch.cuda.set_sync_debug_mode("error"), the
  allowed sync points (flush, eval, samples, probes, checkpoint) under "warn" with their syncs
  counted (SyncWatch); the loss curve; then a short run that writes a memory snapshot;
- eval_probes: the same run with eval + samples + probes on vs off, in interleaved blocks;
- profiled: a `python -m bdh_fast.train --profile` run, its trace (ranges, kernels) and its
  TensorBoard scalars (NVML).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import gzip
import json
import math
import pathlib
import shutil
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from typing import Any, Callable

from proof_harness import ARTIFACT_LIMIT, REPO, emit, shell
from proof_verdicts import MIN_SYNC_STEPS, PROFILE_RANGES

# The proof's own files: skipped when naming where a sync came from.
PROOF_FILES = ("gpu_proof.py", "proof_harness.py", "proof_verdicts.py", "proof_checks.py", "proof_runs.py")
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
    frames = [f for f in frames if not f.filename.endswith(("warnings.py", *PROOF_FILES))]
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
                          metrics="full", **small)  # full: every observer, histograms included, is checked
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
