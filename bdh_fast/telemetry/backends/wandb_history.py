"""What a W&B run already holds, read back from its own transaction logs, so a resumed run logs
every step to W&B exactly once, online or offline.

W&B's run rewind (`resume_from`) is in private preview and does not work with a custom step axis,
and W&B keeps every row a crashed segment logged. So the exactly-once guarantee is made here:

- A resumed run recomputes the steps after its checkpoint exactly (same weights, data, RNG). Keys
  the crashed segment already gave W&B for a step are therefore not logged again: the values would
  be the same, only doubled.
- Steps up to the checkpoint that W&B never wrote (the process died before wandb's service wrote
  them) are backfilled from `metrics.jsonl`, which is flushed to disk before every checkpoint.

Every segment of a run (same id) writes its own transaction log, `wandb/*-run-*-<id>/run-<id>.wandb`,
online and offline alike; `wandb sync` uploads each. They are read with wandb's own reader,
`wandb leet inspect --json` (wandb >= 0.24). Without it, the resume says so in one line and logs
as before (W&B may then show the crashed segment's last steps twice).
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
from collections import defaultdict
from typing import Any, Callable

from bdh_fast.telemetry.backends.base import Histogram

READ_TIMEOUT_S = 120.0
STEP_KEY = "step"  # the custom step axis every bdh_fast metric is plotted against


def transaction_logs(run_dir: str | pathlib.Path, run_id: str) -> list[pathlib.Path]:
    """Every segment's `.wandb` log of run `run_id` under `run_dir/wandb`, oldest first.

    A segment's directory is `<mode>-<start time>-<id>`; when two start in the same second, wandb
    names the later one `...-<id>-<n>`."""
    wandb_dir = pathlib.Path(run_dir) / "wandb"
    logs = [*wandb_dir.glob(f"*-{run_id}/run-{run_id}.wandb"), *wandb_dir.glob(f"*-{run_id}-[0-9]*/run-{run_id}.wandb")]

    def started(log: pathlib.Path) -> tuple[str, int]:
        head, _, suffix = log.parent.name.partition(f"-{run_id}")
        return head.rsplit("-", 1)[-1], int(suffix[1:] or 0)

    return sorted(logs, key=started)


def history_items(log: pathlib.Path) -> list[dict[str, Any]]:
    """The history rows of one transaction log, in order. A log cut short by a crash yields the
    rows before the cut. Raises RuntimeError when wandb's reader is missing or reads nothing."""
    proc = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(log)],
                          capture_output=True, text=True, timeout=READ_TIMEOUT_S)
    rows = []
    for line in proc.stdout.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("type") == "history":
            rows.append(record["history"].get("item", {}))
    if proc.returncode != 0 and not rows and "header" not in proc.stdout:
        reason = " ".join(proc.stderr.split())[-300:] or f"exit status {proc.returncode}"
        raise RuntimeError(f"wandb's reader could not read {log} ({reason})")
    return rows


def logged_keys(run_dir: str | pathlib.Path, run_id: str) -> dict[int, set[str]]:
    """{step: the metric, table and histogram names W&B holds at that step}, over every segment."""
    logged: dict[int, set[str]] = defaultdict(set)
    for log in transaction_logs(run_dir, run_id):
        for item in history_items(log):
            step = item.get(STEP_KEY)
            if isinstance(step, (int, float)):
                names = [k for k in item if k != STEP_KEY and not k.startswith("_")]
                # A table or histogram appears flattened ("samples.nrows", "samples.path", ...).
                logged[int(step)].update(names + [k.split(".", 1)[0] for k in names])
    return dict(logged)


def backfill(run_dir: str | pathlib.Path, upto_step: int, logged: dict[int, set[str]],
             log: Callable[[str, tuple], None]) -> int:
    """Re-log, from metrics.jsonl, every record up to `upto_step` that W&B does not hold. `log`
    takes a backend method name and its arguments. Returns the number of records re-logged."""
    path = pathlib.Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return 0
    count = 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a line cut by a crash: it was never claimed by a checkpoint
            continue
        step = record.get("step")
        if not isinstance(step, int) or step > upto_step:
            continue
        have = logged.get(step, set())
        event = record.get("event")
        if event is None:
            missing = {k: (float("nan") if v is None else v) for k, v in record.items()
                       if k != "step" and k not in have}
            if missing:
                log("log_metrics", (missing, step))
                count += 1
        elif record.get("name") not in have:
            if event == "table":
                log("log_table", (record["name"], record["columns"], record["rows"], step))
            elif event == "text":
                log("log_text", (record["name"], record["text"], step))
            elif event == "histogram":
                fields = {k: record[k] for k in Histogram.__dataclass_fields__}
                log("log_histogram", (record["name"], Histogram(**fields), step))
            else:
                continue
            count += 1
    return count
