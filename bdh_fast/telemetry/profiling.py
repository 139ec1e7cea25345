"""torch.profiler traces for the TensorBoard profiler view, and CUDA allocator snapshots.

`--profile` records CPU (and CUDA) activity with shapes on a wait/warmup/active/repeat schedule and
writes `*.pt.trace.json` into the run directory through `tensorboard_trace_handler`, so the
TensorBoard profiler plugin (torch-tb-profiler, the `profile` extra) shows the trace next to the
run's scalars; the same files open in Perfetto (ui.perfetto.dev). The training loop marks its
phases and the telemetry's own work with `record_function` ranges (data, forward, backward,
optimizer, telemetry/record, telemetry/flush, telemetry/probe, eval, sample, checkpoint), so the
cost of instrumentation is visible in the trace.

`--memory_snapshot N` records the CUDA caching allocator's history for N steps and dumps a
snapshot for pytorch.org/memory_viz.
"""

from __future__ import annotations

import pathlib

import torch

SNAPSHOT_NAME = "memory_snapshot.pickle"


class Profiler:
    """A torch.profiler session over the loop, stepped once per training step; inert when off."""

    def __init__(self, run_dir: pathlib.Path, device: torch.device, *, enabled: bool, wait: int,
                 warmup: int, active: int, repeat: int):
        self.session = None
        if not enabled:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.session = torch.profiler.profile(
            activities=activities,
            schedule=torch.profiler.schedule(wait=wait, warmup=warmup, active=active, repeat=repeat),
            on_trace_ready=torch.profiler.tensorboard_trace_handler(str(run_dir)),
            record_shapes=True,
        )
        self.session.start()

    def step(self) -> None:
        if self.session is not None:
            self.session.step()

    def close(self) -> None:
        if self.session is not None:
            self.session.stop()
            self.session = None


class MemorySnapshot:
    """Allocator history from the first step on; dumped after `steps` steps (CUDA only)."""

    def __init__(self, run_dir: pathlib.Path, device: torch.device, steps: int, console):
        self.path = run_dir / SNAPSHOT_NAME
        self.steps = steps if device.type == "cuda" else 0
        self.console = console
        self.taken = 0
        if steps and device.type != "cuda":
            console("--memory_snapshot needs CUDA (it records the CUDA caching allocator); skipped")
        if self.steps:
            torch.cuda.memory._record_memory_history(max_entries=200_000)

    def step(self) -> None:
        if not self.steps or self.taken >= self.steps:
            return
        self.taken += 1
        if self.taken == self.steps:
            torch.cuda.memory._dump_snapshot(str(self.path))
            torch.cuda.memory._record_memory_history(enabled=None)
            self.console(f"memory snapshot: {self.path} (open it at pytorch.org/memory_viz)")
