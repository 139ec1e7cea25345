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

from bdh_fast.errors import warn_part_off

SNAPSHOT_NAME = "memory_snapshot.pickle"


class Profiler:
    """A torch.profiler session over the loop, stepped once per training step; inert when off.

    A profiler that fails (to start, at a step, or writing its trace) warns once and is off: the
    trace is optional, the run is not (DESIGN.md invariant 9)."""

    def __init__(self, run_dir: pathlib.Path, device: torch.device, *, enabled: bool, wait: int,
                 warmup: int, active: int, repeat: int):
        self.session = None
        if not enabled:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        try:
            self.session = torch.profiler.profile(
                activities=activities,
                schedule=torch.profiler.schedule(wait=wait, warmup=warmup, active=active, repeat=repeat),
                on_trace_ready=torch.profiler.tensorboard_trace_handler(str(run_dir)),
                record_shapes=True,
            )
            self.session.start()
        except Exception as e:
            self._failed(e)

    def step(self) -> None:
        if self.session is not None:
            try:
                self.session.step()
            except Exception as e:
                self._failed(e)

    def close(self) -> None:
        if self.session is not None:
            try:
                self.session.stop()
            except Exception as e:
                self._failed(e)
            self.session = None

    def _failed(self, error: Exception) -> None:
        session, self.session = self.session, None
        warn_part_off("the profiler (--profile)", error, "no further trace is written")
        if session is not None:
            try:
                session.stop()
            except Exception:  # already broken; the warning above named the first failure
                pass


class MemorySnapshot:
    """Allocator history from the first step on; dumped after `steps` steps (CUDA only). A failure
    to record or dump warns once and turns the snapshot off; training goes on."""

    def __init__(self, run_dir: pathlib.Path, device: torch.device, steps: int, console):
        self.path = run_dir / SNAPSHOT_NAME
        self.steps = steps if device.type == "cuda" else 0
        self.console = console
        self.taken = 0
        if steps and device.type != "cuda":
            console("--memory_snapshot needs CUDA (it records the CUDA caching allocator); skipped")
        if self.steps:
            try:
                torch.cuda.memory._record_memory_history(max_entries=200_000)
            except Exception as e:
                self._failed(e)

    def step(self) -> None:
        if not self.steps or self.taken >= self.steps:
            return
        self.taken += 1
        if self.taken == self.steps:
            try:
                torch.cuda.memory._dump_snapshot(str(self.path))
                torch.cuda.memory._record_memory_history(enabled=None)
            except Exception as e:
                self._failed(e)
                return
            self.console(f"memory snapshot: {self.path} (open it at pytorch.org/memory_viz)")

    def _failed(self, error: Exception) -> None:
        self.steps = 0
        warn_part_off("the memory snapshot (--memory_snapshot)", error, "no snapshot is written")
        try:
            torch.cuda.memory._record_memory_history(enabled=None)  # stop recording, if it started
        except Exception:
            pass
