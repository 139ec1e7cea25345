"""The launch-bound rows of bench/overhead.py: what the logging writer costs a thread that does
nothing but dispatch tiny torch ops, and how many kernel launches the telemetry adds per step.

At small presets a GPU step is bound by the Python thread that launches kernels; anything else
running in the interpreter (a writer thread building TensorBoard protobufs) competes with it for
the GIL. The writer row reproduces that side of a step on any machine: a main thread dispatching
`ops_per_step` tiny ops per step (~400: ~4,000 per 10-step window), with and without a public
`bdh_fast.logger.Logger` that receives each window's rows (~16 metrics per step), handed over at
the window's start as the telemetry's flush does, so the writer works while the window's ops
dispatch. The two run interleaved; the row is the main thread's slowdown in %, with its paired
per-round range. After each block, untimed, `Logger.flush()` waits until the writer has written
and synced everything (so no work leaks into the next block); how long it waited is reported as
the writer's backlog. `flush_each_window=True` instead flushes, timed, at every window's end: a
durable write per window, which the training loop does only before a checkpoint.

Only the Logger's public API is used (Logger(...), log_metrics, flush, finish), so the row
measures whichever writer the package has by default. When the Logger also takes
`writer="thread"`, the same row with the in-process writer thread is timed alongside, for
comparison (writer_thread_overhead_pct).
"""

from __future__ import annotations

import contextlib
import inspect
import io
import pathlib
import time
from typing import Any

import torch
from common import interleaved, median, paired_pct, span

METRICS_PER_STEP = 16
GROUPS = ("encoder", "decoder", "encoder_v", "embed", "lm_head")


def window_rows(first_step: int, steps: int) -> list[tuple[int, dict[str, float]]]:
    """A window's rows as the telemetry hands them to the Logger: 16 host numbers per step."""
    rows = []
    for step in range(first_step, first_step + steps):
        x = float(step)
        metrics = {"train/loss": 2.5 - 1e-4 * x, "train/lr": 1e-3, "train/grad_norm": 0.9 + 1e-5 * x,
                   **{f"train/grad_norm/{g}": 0.1 + 1e-6 * x * i for i, g in enumerate(GROUPS)},
                   "train/nonfinite": 0.0, "train/tokens": 2048.0 * x, "perf/step_ms": 20.0,
                   "perf/tokens_per_sec": 1.0e5, "perf/mfu": 0.3, "perf/data_ms": 0.5, "system/mem_gb": 1.0, "system/step_s": 0.02}
        assert len(metrics) == METRICS_PER_STEP
        rows.append((step, metrics))
    return rows


class Launcher:
    """The launching thread: `ops_per_step` tiny ops per step on a 64-element tensor (two ops a
    round: a multiply and an add in place, each one dispatch, as a kernel launch is)."""

    def __init__(self, ops_per_step: int):
        self.x = torch.ones(64)
        self.rounds = max(1, ops_per_step // 2)

    def step(self) -> None:
        x = self.x
        for _ in range(self.rounds):
            x.mul_(0.999)
            x.add_(0.001)


class WriterVariant:
    """Launcher steps in windows; with a Logger, each window's rows are logged at its start (the
    writer works while the window's ops dispatch)."""

    def __init__(self, ops_per_step: int, window: int, log_dir: pathlib.Path | None, flush_each_window: bool,
                 **logger_options):
        self.launcher = Launcher(ops_per_step)
        self.window = window
        self.flush_each_window = flush_each_window
        self.step_no = 0
        self.backlog_s: list[float] = []
        self.logger = None
        if log_dir is not None:
            from bdh_fast.logger import Logger

            self.logger = Logger(backend="tensorboard,jsonl", project_name="bench-writer",
                                 config={"bench": "writer"}, log_dir=log_dir, **logger_options)

    def windows(self, n: int) -> None:
        for _ in range(n):
            if self.logger is not None:
                for step, metrics in window_rows(self.step_no + 1, self.window):
                    self.logger.log_metrics(metrics, step)
            for _ in range(self.window):
                self.launcher.step()
            self.step_no += self.window
            if self.logger is not None and self.flush_each_window:
                self.logger.flush()

    def settle(self) -> None:
        """Untimed, after a block: wait until the writer has written and synced everything."""
        if self.logger is not None:
            t0 = time.perf_counter()
            self.logger.flush()
            self.backlog_s.append(time.perf_counter() - t0)

    def close(self) -> None:
        if self.logger is not None:
            self.logger.finish()


def writer_row(workdir: pathlib.Path, *, windows: int, repeats: int, ops_per_step: int = 400,
               window: int = 10, flush_each_window: bool = False) -> dict[str, Any]:
    """The writer row: blocks of `windows` windows, no Logger vs Logger, interleaved."""
    from bdh_fast.logger import Logger

    variants = {"launch only": WriterVariant(ops_per_step, window, None, flush_each_window),
                "launch + Logger": WriterVariant(ops_per_step, window, workdir / "writer-row", flush_each_window)}
    if "writer" in inspect.signature(Logger).parameters:
        variants["launch + Logger (thread)"] = WriterVariant(ops_per_step, window, workdir / "writer-row-thread",
                                                             flush_each_window, writer="thread")
    try:
        for v in variants.values():
            v.windows(2)  # warm-up: the backends' first files, the allocator, the dispatcher caches
        for v in variants.values():
            v.settle()
            v.backlog_s.clear()
        block_s = interleaved({name: (lambda v=v: v.windows(windows)) for name, v in variants.items()},
                              repeats, warmup=1, device=torch.device("cpu"),
                              settle={name: v.settle for name, v in variants.items()})
        backlog = variants["launch + Logger"].backlog_s
    finally:
        for v in variants.values():
            v.close()
    base, logged = block_s["launch only"], block_s["launch + Logger"]
    paired = paired_pct(logged, base)
    steps = windows * window
    thread = block_s.get("launch + Logger (thread)")
    return {"writer_overhead_pct": (median(logged) / median(base) - 1) * 100,
            "writer_paired_range_pct": span(paired),
            "writer_launch_ms_per_step": median(base) / steps * 1e3,
            "writer_logged_ms_per_step": median(logged) / steps * 1e3,
            "writer_backlog_ms": median(backlog) * 1e3 if backlog else None,
            "writer_thread_overhead_pct": (median(thread) / median(base) - 1) * 100 if thread else None,
            "writer_thread_paired_range_pct": span(paired_pct(thread, base)) if thread else None,
            "writer_row": {"ops_per_step": ops_per_step, "ops_per_window": ops_per_step * window,
                           "metrics_per_step": METRICS_PER_STEP, "window_steps": window,
                           "windows_per_block": windows, "repeats": repeats, "backends": "tensorboard,jsonl",
                           "flush": ("Logger.flush() at each window's end, timed" if flush_each_window else
                                     "Logger.flush() after each block, untimed (its wait: writer_backlog_ms)")}}


def telemetry_launches() -> dict[str, Any]:
    """The telemetry's own kernel launches per step, counted by bdh_fast.telemetry.launches: the
    compiled row function, as the CLI runs it on CUDA (the figure the target is for), and the eager
    one, as a CPU run or a plain eager loop runs it."""
    from bdh_fast.telemetry.launches import telemetry_launches_per_step

    with contextlib.redirect_stdout(io.StringIO()):
        compiled = telemetry_launches_per_step(compile=True)
        eager = telemetry_launches_per_step(compile=False)
    return {"telemetry_launches_per_step": compiled["launches_per_step"],
            "telemetry_launches_eager_per_step": eager["launches_per_step"],
            "telemetry_launches": {"compiled": compiled, "eager": eager},
            "telemetry_launches_note": "bdh_fast.telemetry.launches: the compiled step-row function (the CLI "
                                       "on CUDA); eager: a CPU run, a plain eager loop"}


def neuron_stats_launches(config, device: str) -> dict[str, Any]:
    """What BDH's every-step neuron statistics add to the model's own kernels: launches of one
    training step's forward and backward at the benchmark's configuration, with and without the
    channel, counted (not timed) by bdh_fast.telemetry.launches."""
    from bdh_fast.telemetry.launches import model_launches_per_step

    with contextlib.redirect_stdout(io.StringIO()):
        counts = {on: model_launches_per_step(on, config, device, config.compile) for on in (False, True)}
    return {"neuron_stats_model_launches": {"without": counts[False], "with": counts[True]},
            "neuron_stats_extra_launches": counts[True] - counts[False]}

