"""Step time without host syncs: CUDA events read at the flush, or perf_counter on CPU."""

from __future__ import annotations

import time

import torch


class StepTimer:
    """Wall time of each step. On CUDA, events recorded on the stream and read only at flush (after
    the flush's wait); on CPU, perf_counter (CPU work is synchronous). No host sync per step."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list[tuple[object, object]] = []
        self._start: object | None = None

    def _now(self) -> object:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def start(self) -> None:
        self._start = self._now()

    def stop(self) -> None:
        self.marks.append((self._start, self._now()))

    def read_ms(self) -> list[float]:
        """Milliseconds per stopped step since the last read. Call after the flush's wait."""
        if self.cuda:
            out = [start.elapsed_time(end) for start, end in self.marks]  # type: ignore[attr-defined]
        else:
            out = [(end - start) * 1e3 for start, end in self.marks]  # type: ignore[operator]
        self.marks = []
        return out
