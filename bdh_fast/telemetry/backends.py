"""Logging backends (TensorBoard, W&B, JSONL) and the `Logger` that feeds them off the training thread.

The train loop calls `Logger.log_*`; each call only puts a record on a queue. One daemon writer thread
hands every record to every backend in order, so training never waits for TensorBoard, W&B or disk.
A backend that raises is dropped with one warning; the others keep receiving every record. A backend
that stalls (a hung network, a full disk that blocks) is bounded instead: the queue holds at most
`max_queued_values` values, newer records are then dropped and counted (one warning when dropping
starts, the count at `finish`), and `finish` gives up on a backend after a timeout, naming it.
tensorboard and wandb are imported inside the backends that need them, so an unused backend costs
nothing.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import math
import os
import pathlib
import queue
import secrets
import string
import sys
import threading
from dataclasses import dataclass
from typing import Any

from bdh_fast.checkpoint import atomic_write_bytes
from bdh_fast.errors import UserError

BACKEND_NAMES = ("tensorboard", "wandb", "jsonl", "none")


@dataclass
class Histogram:
    """A histogram in the form SummaryWriter.add_histogram_raw takes: buckets by their right edges."""

    min: float
    max: float
    num: float
    sum: float
    sum_squares: float
    bucket_limits: list[float]  # right edge of each bucket
    bucket_counts: list[float]

    @classmethod
    def from_counts(cls, lo, hi, counts, num, sum, sum_squares) -> Histogram:
        """Equal-width buckets over [lo, hi] (e.g. from torch.histc); `counts` may be a CPU tensor."""
        counts = [float(c) for c in (counts.tolist() if hasattr(counts, "tolist") else counts)]
        lo, hi = float(lo), float(hi)
        # all values equal: give the buckets a width so the edges still increase
        left, right = (lo, hi) if hi > lo else (lo - 0.5, lo + 0.5)
        width = (right - left) / len(counts)
        limits = [left + (i + 1) * width for i in range(len(counts))]
        limits[-1] = right  # no rounding drift on the last edge
        return cls(lo, hi, float(num), float(sum), float(sum_squares), limits, counts)

    def to_numpy_histogram(self, max_bins: int | None = None) -> tuple[list[float], list[float]]:
        """(counts, edges) with len(edges) == len(counts) + 1, as wandb.Histogram(np_histogram=...)
        takes; with `max_bins`, neighbouring buckets are merged until at most that many remain."""
        limits, counts = self.bucket_limits, self.bucket_counts
        if self.min < limits[0]:
            first = self.min
        else:  # the left edge of the first bucket is not recorded: mirror the next bucket's width
            first = limits[0] - ((limits[1] - limits[0]) if len(limits) > 1 else 1.0)
        if max_bins is not None and len(counts) > max_bins:
            group = -(-len(counts) // max_bins)
            counts = [sum(counts[i : i + group]) for i in range(0, len(counts), group)]
            limits = [limits[min(i + group, len(limits)) - 1] for i in range(0, len(limits), group)]
        return list(counts), [first, *limits]


def _finite_or_none(value: Any) -> Any:
    """NaN/Infinity are not valid JSON: JSONL stores them as null (the key stays, so the step is kept)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_finite_or_none(v) for v in value]
    return value


class Backend:
    """One place metrics go. Every method is called from the Logger's writer thread only."""

    name = "backend"

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def log_text(self, name: str, text: str, step: int) -> None:
        raise NotImplementedError

    def log_table(self, name: str, columns: list[str], rows: list[list], step: int) -> None:
        for row in rows:
            self.log_text(name, "\n".join(f"{c}: {v}" for c, v in zip(columns, row)), step)

    def log_histogram(self, name: str, hist: Histogram, step: int) -> None:
        raise NotImplementedError

    def log_artifact(self, path: str, name: str, kind: str) -> None:
        pass

    def flush(self) -> None:
        """Called whenever the Logger's queue runs empty: push buffered writes to disk."""

    def sync(self) -> None:
        """Called at `Logger.flush()`, before a checkpoint: make everything written so far durable
        (a checkpoint at step s claims every record up to s, DESIGN.md invariant 8)."""
        self.flush()

    def finish(self) -> None:
        pass


def _markdown_table(columns: list[str], rows: list[list]) -> str:
    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", "<br>")

    lines = ["| " + " | ".join(cell(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _scalar_hparams(config: dict, prefix: str = "") -> dict[str, int | float | str | bool]:
    """Flatten nested config into the scalar values the hparams plugin accepts; drop the rest."""
    out: dict[str, int | float | str | bool] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_scalar_hparams(value, f"{prefix}{key}."))
        elif isinstance(value, (bool, int, float, str)):
            out[f"{prefix}{key}"] = value
    return out


# Multiline chart tags are regular expressions: anchor them so train/loss does not also match
# train/loss_eval.
CUSTOM_SCALARS_LAYOUT = {
    "loss": {"loss": ["Multiline", ["^train/loss$", "^val/loss$", "^train/loss_eval$"]]},
    "perf": {
        "step time (ms)": ["Multiline", ["^perf/step_ms$"]],
        "tokens/s": ["Multiline", ["^perf/tokens_per_sec$"]],
        "MFU": ["Multiline", ["^perf/mfu$"]],
    },
}


class TensorBoardBackend(Backend):
    name = "tensorboard"

    def __init__(self, run_dir: str, config: dict, resume_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        # purge_step makes TensorBoard discard events at steps >= resume_step from earlier event
        # files, so the steps logged again after a resume appear once.
        self.writer = SummaryWriter(log_dir=run_dir, purge_step=resume_step)
        self.writer.add_text(
            "config", "```json\n" + json.dumps(config, indent=2, default=str) + "\n```", resume_step or 0
        )
        if resume_step is None:
            # add_hparams would write a separate sub-run; write its three summaries into this run
            # instead so the hparams table links to this run's scalars.
            metrics = {"train/loss": None, "val/loss": None, "val/perplexity": None}
            file_writer = self.writer._get_file_writer()
            for summary in hparams(_scalar_hparams(config), metrics):
                file_writer.add_summary(summary)
            self.writer.add_custom_scalars(CUSTOM_SCALARS_LAYOUT)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for tag, value in metrics.items():
            self.writer.add_scalar(tag, float(value), step)

    def log_text(self, name: str, text: str, step: int) -> None:
        self.writer.add_text(name, text, step)

    def log_table(self, name: str, columns: list[str], rows: list[list], step: int) -> None:
        self.writer.add_text(name, _markdown_table(columns, rows), step)

    def log_histogram(self, name: str, hist: Histogram, step: int) -> None:
        self.writer.add_histogram_raw(
            name, hist.min, hist.max, hist.num, hist.sum, hist.sum_squares,
            hist.bucket_limits, hist.bucket_counts, global_step=step,
        )

    def flush(self) -> None:
        self.writer.flush()  # otherwise events wait up to flush_secs (120 s) and a crash loses them

    def finish(self) -> None:
        self.writer.flush()
        self.writer.close()


def wandb_api_key_configured() -> bool:
    """Whether W&B credentials are configured, checked locally (environment, then netrc): no network."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    base_url = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    try:
        from wandb.sdk.lib.wbauth import wbnetrc  # what wandb.login itself reads

        return wbnetrc.read_netrc_auth(host=base_url) is not None
    except Exception:  # private module moved, or a malformed netrc: treat as not configured
        return False


class WandbBackend(Backend):
    """A W&B run. Every metric is plotted against the custom `step` metric rather than wandb's own
    `_step`: after a resume wandb ignores `step=` values below its last `_step`, which would drop the
    re-run steps; a custom axis keeps them.

    Resumed (`resume_step`: the first step this segment computes), it logs every step exactly once
    (bdh_fast.telemetry.wandb_history): what earlier segments already gave W&B is not logged again,
    and what they lost up to the checkpoint is backfilled from metrics.jsonl."""

    name = "wandb"
    STEP = "step"

    def __init__(
        self,
        run_dir: str,
        config: dict,
        project: str = "bdh-training",
        entity: str | None = None,
        run_name: str | None = None,
        mode: str = "auto",
        resume_step: int | None = None,
        log_checkpoints: bool = False,
    ):
        import wandb

        from bdh_fast.telemetry import wandb_history

        self._wandb = wandb
        self.log_checkpoints = log_checkpoints
        self._tables: dict[str, Any] = {}
        if mode == "auto":
            env_mode = os.environ.get("WANDB_MODE", "")
            if env_mode in ("online", "offline", "disabled"):
                mode = env_mode
            else:
                mode = "online" if wandb_api_key_configured() else "offline"
        if mode not in ("online", "offline", "disabled"):
            raise UserError(f"wandb mode {mode!r} is not one of auto, online, offline, disabled")
        os.makedirs(run_dir, exist_ok=True)
        id_path = os.path.join(run_dir, "wandb_id.txt")
        run_id = None
        resume = resume_step is not None
        if resume and os.path.exists(id_path):
            with open(id_path) as f:
                run_id = f.read().strip() or None
        # {step: names} W&B already holds from earlier segments; read before init starts a new one.
        self._held: dict[int, set[str]] = {}
        if run_id is not None:
            try:
                self._held = wandb_history.logged_keys(run_dir, run_id)
            except Exception as e:
                print(f"warning: wandb: could not read what the earlier segments of run {run_id} logged "
                      f"({type(e).__name__}: {e}); W&B may show their last steps twice", file=sys.stderr,
                      flush=True)
        if run_id is None:
            run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
            # durable: a resume after a power loss must find the id, or it starts a second W&B run
            atomic_write_bytes(pathlib.Path(id_path), lambda tmp: tmp.write_text(run_id + "\n"))
        self.run = wandb.init(
            project=project, entity=entity, name=run_name, config=config, dir=run_dir, mode=mode,
            id=run_id, resume="allow" if resume else None, reinit="create_new", save_code=False,
        )
        self.run.define_metric(self.STEP)
        self.run.define_metric("*", step_metric=self.STEP)
        if resume:
            # Steps up to the checkpoint are in metrics.jsonl (flushed to disk before it was written).
            wandb_history.backfill(run_dir, resume_step - 1, self._held,
                                   lambda method, args: getattr(self, method)(*args))
            self._held = {step: names for step, names in self._held.items() if step >= resume_step}
        if mode == "offline":
            print(f"wandb: logging offline (no API key configured, or mode offline); upload later with: "
                  f"wandb sync {self.run.settings.sync_dir}", file=sys.stderr, flush=True)

    def _held_at(self, step: int) -> set[str]:
        return self._held.get(step, set()) if self._held else set()

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        held = self._held_at(step)
        values = {k: float(v) for k, v in metrics.items() if k not in held}
        if values:
            self.run.log({**values, self.STEP: step})

    def log_text(self, name: str, text: str, step: int) -> None:
        self.log_table(name, ["step", "text"], [[step, text]], step)

    def log_table(self, name: str, columns: list[str], rows: list[list], step: int) -> None:
        if name in self._held_at(step):
            return
        # One table per name that grows across calls; INCREMENTAL uploads only the new rows each time.
        table = self._tables.get(name)
        if table is None or list(table.columns) != list(columns):
            table = self._tables[name] = self._wandb.Table(columns=list(columns), log_mode="INCREMENTAL")
        for row in rows:
            table.add_data(*row)
        self.run.log({name: table, self.STEP: step})

    def log_histogram(self, name: str, hist: Histogram, step: int) -> None:
        if name in self._held_at(step):
            return
        np_histogram = hist.to_numpy_histogram(max_bins=self._wandb.Histogram.MAX_LENGTH)  # wandb's limit
        self.run.log({name: self._wandb.Histogram(np_histogram=np_histogram), self.STEP: step})

    def log_artifact(self, path: str, name: str, kind: str) -> None:
        if not self.log_checkpoints:
            return
        safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in name)
        artifact = self._wandb.Artifact(safe, type=kind)
        artifact.add_file(path)  # copied to staging now, so a later overwrite of `path` is harmless
        self.run.log_artifact(artifact)

    def finish(self) -> None:
        self.run.finish()


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


class Logger:
    """Fans records out to backends on one background writer thread; the log methods only enqueue.

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
            atexit.register(self.finish)  # last resort: the train loop calls finish() itself

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


def parse_backends(spec: str) -> list[str]:
    """'tensorboard,jsonl' -> ['tensorboard', 'jsonl']: validated, deduplicated, order kept."""
    names = []
    for raw in spec.split(","):
        name = raw.strip().lower()
        if not name:
            continue
        if name not in BACKEND_NAMES:
            raise UserError(f"unknown logging backend {raw.strip()!r}; choose from {', '.join(BACKEND_NAMES)}")
        if name not in names:
            names.append(name)
    if not names:
        raise UserError(f"no logging backend given; choose from {', '.join(BACKEND_NAMES)} (comma-separated)")
    if "none" in names and len(names) > 1:
        raise UserError("logging backend 'none' cannot be combined with others; drop 'none' or the others")
    return names


def make_logger(
    names: list[str],
    run_dir: str,
    config: dict,
    resume_step: int | None = None,
    *,
    wandb_project: str = "bdh-training",
    wandb_entity: str | None = None,
    wandb_mode: str = "auto",
    run_name: str | None = None,
    wandb_log_checkpoints: bool = False,
) -> Logger:
    """Build the backends named in `names`. A backend that fails to start is left out with one
    warning (training goes on without it); an unknown name is a UserError."""
    for name in names:
        if name not in BACKEND_NAMES:
            raise UserError(f"unknown logging backend {name!r}; choose from {', '.join(BACKEND_NAMES)}")
    factories = {
        "tensorboard": lambda: TensorBoardBackend(run_dir, config, resume_step),
        "wandb": lambda: WandbBackend(
            run_dir, config, project=wandb_project, entity=wandb_entity, run_name=run_name,
            mode=wandb_mode, resume_step=resume_step, log_checkpoints=wandb_log_checkpoints,
        ),
        "jsonl": lambda: JsonlBackend(run_dir, resume_step),
    }
    backends, failed = [], []
    for name in dict.fromkeys(names):
        if name == "none":
            continue
        try:
            backends.append(factories[name]())
        except UserError:
            raise
        except Exception as e:
            failed.append(name)
            print(f"warning: logging backend {name} could not start and is off: {type(e).__name__}: {e}",
                  file=sys.stderr, flush=True)
    logger = Logger(backends)
    logger.failed.extend(failed)
    return logger
