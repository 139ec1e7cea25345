"""The writer: the one background thread that hands every record to every backend, in order, so the
training thread never waits for TensorBoard, W&B or the disk.

A backend that raises is dropped with one warning; the others keep receiving every record. A backend
that stalls (a hung network, a full disk that blocks) is bounded instead: the queue holds at most
`max_queued_values` values, newer records are then dropped and counted (one warning when dropping
starts, the count at `finish`), and `finish` gives up on a backend after a timeout, naming it.
"""

from __future__ import annotations

import atexit
import queue
import sys
import threading
from typing import Any

from bdh_fast.telemetry.backends.base import Backend, Histogram

_STOP = object()

# What a stalled backend may keep in memory: about this many values (a metric, a histogram bucket, a
# table cell, 100 characters of text; each well under 100 bytes as Python objects) wait in the queue,
# then newer records are dropped. A step's metrics are ~20 values, so that is tens of thousands of
# steps, and at most ~100 MB, whatever the cadence or --hist_bins.
MAX_QUEUED_VALUES = 1_000_000
# How long finish() (and flush() without a timeout) waits for the backends: long enough for W&B to
# upload a run and its checkpoints, short enough that a hung backend cannot keep the process alive.
FINISH_TIMEOUT_S = 300.0


def _size(value: Any) -> int:
    """Roughly how many values a record keeps alive: the unit of the queue's bound."""
    if isinstance(value, Histogram):
        return 1 + 2 * len(value.bucket_counts)
    if isinstance(value, str):
        return 1 + len(value) // 100
    if isinstance(value, dict):
        return 1 + sum(_size(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return 1 + sum(_size(v) for v in value)
    return 1


class Writer:
    """Fans records out to backends on one background thread; the log methods only enqueue.

    Records are tuples (method name, args, size); a threading.Event in the queue marks a flush point.
    The log methods never block: when the backends fall `max_queued_values` behind, a new record is
    dropped and counted instead (`dropped`), with one warning when that first happens.
    """

    def __init__(self, backends: list[Backend], max_queued_values: int = MAX_QUEUED_VALUES,
                 finish_timeout_s: float = FINISH_TIMEOUT_S):
        self.backends = list(backends)
        self.failed: list[str] = []
        self.max_queued_values = max_queued_values
        self.finish_timeout_s = finish_timeout_s
        self.queued_values = 0  # sizes of the records enqueued and not yet written by every backend
        self.dropped = 0  # records refused because the queue was full
        self._dropped_steps: tuple[int, int] | None = None  # lowest and highest step dropped
        self._busy: tuple[str, str] | None = None  # (backend, method) the writer is inside, for warnings
        self._lock = threading.Lock()  # guards queued_values and the drop counters
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._finished = False
        self._finish_lock = threading.Lock()
        self._thread = None
        if self.backends:
            self._thread = threading.Thread(target=self._run, name="bdh-logger", daemon=True)
            self._thread.start()
            atexit.register(self.finish)  # last resort: the owner calls finish() itself

    def _put(self, method: str, *args) -> None:
        if self._thread is None or self._finished:
            return
        size = _size(args)
        with self._lock:
            # An empty queue takes any record, so a record larger than the whole bound still goes out.
            full = self.queued_values > 0 and self.queued_values + size > self.max_queued_values
            if not full:
                self.queued_values += size
                self._queue.put((method, args, size))
                return
            self.dropped += 1
            first = self.dropped == 1
            behind = self.queued_values
            step = args[-1]  # every record but an artifact ends with its step
            if isinstance(step, int):
                lo, hi = self._dropped_steps or (step, step)
                self._dropped_steps = (min(lo, step), max(hi, step))
        if first:
            print(f"warning: {self._busy_backend()} fell {behind:,} values behind; newer records are dropped "
                  f"until it catches up (counted at the end); training goes on", file=sys.stderr, flush=True)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._put("log_metrics", dict(metrics), step)  # a copy: the caller may reuse its dict

    def log_text(self, name: str, text: str, step: int) -> None:
        self._put("log_text", name, text, step)

    def log_table(self, name: str, columns: list[str], rows: list[list], step: int) -> None:
        self._put("log_table", name, list(columns), [list(r) for r in rows], step)

    def log_histogram(self, name: str, hist: Histogram, step: int) -> None:
        self._put("log_histogram", name, hist, step)

    def log_artifact(self, path: str, name: str, kind: str) -> None:
        self._put("log_artifact", path, name, kind)

    def log_alert(self, title: str, text: str, step: int) -> None:
        self._put("log_alert", title, text, step)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything enqueued so far is written and synced (`Backend.sync`); False if
        the timeout ran out first (default `finish_timeout_s`: a stalled backend never holds the
        caller forever)."""
        if self._thread is None or not self._thread.is_alive():
            return True
        done = threading.Event()
        self._queue.put(done)
        return done.wait(self.finish_timeout_s if timeout is None else timeout)

    def finish(self, timeout: float | None = None) -> bool:
        """Write everything enqueued, finish every backend, stop the writer. Safe to call twice.

        Waits at most `timeout` seconds (default `finish_timeout_s`). A backend still busy then is
        named in one warning and left to its daemon thread, which dies with the process; what it had
        not written is lost. Returns whether everything finished in time.
        """
        with self._finish_lock:
            if self._finished:
                return self._thread is None or not self._thread.is_alive()
            self._finished = True
        if self._thread is None:
            return True
        atexit.unregister(self.finish)
        timeout = self.finish_timeout_s if timeout is None else timeout
        self._queue.put(_STOP)
        self._thread.join(timeout)
        finished = not self._thread.is_alive()
        if not finished:
            print(f"warning: {self._busy_backend()} did not finish within {timeout:g} s; giving up on it: "
                  f"the records it had not written are lost", file=sys.stderr, flush=True)
        if self.dropped:
            steps = self._dropped_steps
            where = f" (steps {steps[0]} to {steps[1]})" if steps else ""
            print(f"warning: {self.dropped:,} logging records{where} were dropped because a backend fell "
                  f"more than {self.max_queued_values:,} values behind", file=sys.stderr, flush=True)
        return finished

    def _busy_backend(self) -> str:
        """Names the backend the writer is waiting on, for a warning: 'logging backend wandb (in finish)'."""
        busy = self._busy  # read once: the writer thread changes it
        return f"logging backend {busy[0]} (in {busy[1]})" if busy else "logging"

    def _call(self, backend: Backend, method: str, args: tuple) -> None:
        self._busy = (backend.name, method)
        try:
            getattr(backend, method)(*args)
        except Exception as e:
            self.backends.remove(backend)
            self.failed.append(backend.name)
            print(f"warning: logging backend {backend.name} failed in {method} and was dropped: "
                  f"{type(e).__name__}: {e}", file=sys.stderr, flush=True)
            if method != "finish":
                try:
                    backend.finish()  # release its files; errors here would only repeat the first
                except Exception:
                    pass
        finally:
            self._busy = None

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if isinstance(item, threading.Event):  # a flush() call: every record before it is durable
                for backend in list(self.backends):
                    self._call(backend, "sync", ())
                item.set()
                continue
            if item is _STOP:
                for backend in list(self.backends):
                    self._call(backend, "finish", ())
                return
            method, args, size = item
            for backend in list(self.backends):
                self._call(backend, method, args)
            with self._lock:
                self.queued_values -= size  # only now: until every backend has it, the record is alive
            if self._queue.empty():  # end of a batch: make what was logged survive a crash
                self._flush_backends()

    def _flush_backends(self) -> None:
        for backend in list(self.backends):
            self._call(backend, "flush", ())

