"""`metrics.jsonl`: the run's plain-text log, one JSON object per step and per event; what a resume
truncates to its checkpoint, and what W&B backfills from."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
from typing import Any

from bdh_fast.checkpoint import atomic_write_bytes
from bdh_fast.telemetry.backends.base import Backend, Histogram


def _finite_or_none(value: Any) -> Any:
    """NaN/Infinity are not valid JSON: JSONL stores them as null (the key stays, so the step is kept)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_finite_or_none(v) for v in value]
    return value


class JsonlBackend(Backend):
    """`<run_dir>/metrics.jsonl`: one JSON object per line, valid JSON (non-finite floats as null).

    Records: `{"step": s, "<metric>": value, ...}` per log_metrics call, and events
    `{"step": s, "event": "text"|"table"|"histogram", "name": ..., ...}`.
    """

    name = "jsonl"

    def __init__(self, run_dir: str, resume_step: int | None = None):
        os.makedirs(run_dir, exist_ok=True)
        self.path = os.path.join(run_dir, "metrics.jsonl")
        if resume_step is not None and os.path.exists(self.path):
            self._truncate_from(resume_step)
        # line buffering: each record goes out in one write and is on disk (in the OS) at once
        self._file = open(self.path, "a", buffering=1, encoding="utf-8")
        if self._file.tell() > 0 and not self._ends_with_newline():
            self._file.write("\n")  # a crash cut the last line: start ours on a fresh one

    def _truncate_from(self, step: int) -> None:
        """Drop records at steps >= `step` and any half-written line a crash left; atomically."""
        kept = []
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] >= step:
                    continue
                kept.append(line if line.endswith("\n") else line + "\n")
        atomic_write_bytes(pathlib.Path(self.path), lambda tmp: tmp.write_text("".join(kept), encoding="utf-8"))

    def _ends_with_newline(self) -> bool:
        with open(self.path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"\n"

    def _write(self, record: dict) -> None:
        record = {k: _finite_or_none(v) for k, v in record.items()}
        self._file.write(json.dumps(record, allow_nan=False) + "\n")

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._write({"step": step, **{k: float(v) for k, v in metrics.items()}})

    def log_text(self, name: str, text: str, step: int) -> None:
        self._write({"step": step, "event": "text", "name": name, "text": text})

    def log_alert(self, title: str, text: str, step: int) -> None:
        self._write({"step": step, "event": "alert", "title": title, "text": text})

    def log_table(self, name: str, columns: list[str], rows: list[list], step: int) -> None:
        self._write({"step": step, "event": "table", "name": name, "columns": columns, "rows": rows})

    def log_histogram(self, name: str, hist: Histogram, step: int) -> None:
        self._write({"step": step, "event": "histogram", "name": name, **dataclasses.asdict(hist)})

    def sync(self) -> None:
        # Line buffering hands each record to the OS at once; only fsync puts it on the disk, so a
        # power loss after the checkpoint cannot take back steps the checkpoint counts as logged.
        self._file.flush()
        os.fsync(self._file.fileno())

    def finish(self) -> None:
        self._file.close()

