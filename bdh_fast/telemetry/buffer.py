"""The on-device step buffer: every step's metrics stay on the accelerator until a flush.

`record` writes one row of a preallocated (window, metrics) float32 tensor with a device-to-device
copy: no host sync. `flush` moves the filled rows to pinned host memory with ONE non_blocking copy
and ONE wait, and returns every step with its own values (nothing averaged away). A step may bring
only the first columns (a loop that leaves out the optional trailing ones, such as BDH's neuron
statistics): its row then names only those.
"""

from __future__ import annotations

from typing import Callable

import torch


class StepBuffer:
    def __init__(self, names: list[str], window: int, device: torch.device):
        self.names = list(names)
        self.window = window
        self.device = device
        self.values = torch.zeros(window, len(names), dtype=torch.float32, device=device)  # (W, M)
        self.host = torch.zeros(window, len(names), dtype=torch.float32,
                                pin_memory=device.type == "cuda")  # (W, M)
        self.steps: list[int] = []
        self.widths: list[int] = []  # columns each step recorded
        self.host_values: list[dict[str, float]] = []  # values the host already knows (lr, ...)

    def __len__(self) -> int:
        return len(self.steps)

    @property
    def full(self) -> bool:
        return len(self.steps) == self.window

    def record(self, step: int, values: torch.Tensor, host_values: dict[str, float] | None = None) -> None:
        """Store one step. values: (M,) on the device in `names` order, or its first columns only.
        Never syncs."""
        if self.full:
            raise RuntimeError("StepBuffer is full: flush() before recording more steps")
        width = values.numel()
        if width > len(self.names):
            raise ValueError(f"a row of {width} values for a buffer of {len(self.names)} columns")
        self.values[len(self.steps), :width].copy_(values, non_blocking=True)
        self.steps.append(step)
        self.widths.append(width)
        self.host_values.append(host_values or {})

    def flush(self, reduce: Callable[[torch.Tensor], object] | None = None) -> list[tuple[int, dict[str, float]]]:
        """All buffered steps as (step, {name: value}), oldest first; empties the buffer.
        `reduce` (e.g. a mean over data-parallel ranks) is applied in place to the device window
        first: one collective for the whole window."""
        n = len(self.steps)
        if n == 0:
            return []
        if reduce is not None:
            reduce(self.values[:n])
        # SYNC POINT (flush): one device->host copy of the whole window, then one wait for it.
        self.host[:n].copy_(self.values[:n], non_blocking=True)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        rows = self.host[:n].tolist()  # host memory: no device access
        out = [(step, {**dict(zip(self.names[:width], row)), **extra})
               for step, row, width, extra in zip(self.steps, rows, self.widths, self.host_values)]
        self.steps, self.widths, self.host_values = [], [], []
        return out
