"""Stop requests: a preemption signal (SIGTERM) or Ctrl-C (SIGINT) becomes a flag the training loop
honours at its next step boundary, so the run ends with a consistent checkpoint rather than a crash."""

from __future__ import annotations

import signal
from typing import Any


class StopRequest:
    """SIGTERM and SIGINT (what a scheduler sends before preemption, and Ctrl-C) only set this flag.

    The loop honours it at the next step boundary, after everything due at that step (flush,
    evaluation, samples, checkpoint), so the checkpoint it then writes holds one consistent step:
    weights, optimizer, data stream and RNG all after update s, and every record up to s. Under
    torchrun the ranks agree on the stop through the flush's one all_reduce. A second Ctrl-C stops
    at once, as a crash would: the last checkpoint stands.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __call__(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def install(self) -> StopRequest:
        for signum in self.SIGNALS:
            self._previous[signum] = signal.signal(signum, self)
        return self

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}
