"""The JSON line: every benchmark, and every GPU-proof step, ends its stdout with one JSON object
(`emit`); whoever runs it reads that line back (`last_json`). Pure Python, no torch."""

from __future__ import annotations

import json
import math
import sys
from typing import Any


def clean(value: Any) -> Any:
    """JSON-safe: non-finite floats become None (valid JSON), keys strings."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    return value


def emit(record: dict) -> None:
    """The record as one JSON line on stdout, after everything printed before it."""
    sys.stdout.flush()
    print(json.dumps(clean(record), default=str, allow_nan=False), flush=True)


def last_json(text: str) -> dict | None:
    """The last stdout line that is a JSON object (a child may emit partial records first)."""
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict):
                return value
    return None
