"""`python -m bdh_fast.compare`: which run is better, and why, in one command.

Reads each run's config.json and metrics.jsonl (see JsonlBackend in telemetry/backends.py) and
prints one row per run: the config fields that differ between the runs, then the numbers that say
how each run went. Runs still going, or cut off by a crash mid-line, read fine: a line that does
not parse is skipped. In metrics.jsonl a `null` value is a non-finite one (NaN/inf); it shows as
`nan`, and counts as missing for best values, medians and sorting.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from bdh_fast.errors import UserError

RUN_FILES = ("config.json", "metrics.jsonl")
# Config entries that name or place a run, or only change how it is watched: never "why it differs".
BOOKKEEPING = {"run_name", "out_dir", "resume", "data_path", "progress", "log_freq", "log_backend",
               "wandb_project", "wandb_entity", "wandb_mode", "wandb_log_checkpoints", "nvml_interval",
               "profile", "profile_wait", "profile_warmup", "profile_active", "profile_repeat",
               "memory_snapshot", "ckpt_freq"}
TIME_KEYS = ("time", "timestamp", "wall_time")  # a record's unix time, if a future writer adds one
CURVES = ("train/loss", "val/loss", "val/perplexity", "perf/tokens_per_sec", "perf/mfu", "samples/valid_word_rate")
SPARSITY_X = "model/sparsity/x"  # the curve holds the mean of model/sparsity/x/layer<i>

# Result columns: name (also the --sort key and the --json key) -> table format.
COLUMNS = {"steps": "{:d}", "best_val_loss": "{:.4f}", "final_val_loss": "{:.4f}", "val_ppl": "{:.3f}",
           "train_loss": "{:.4f}", "tok_per_s": "{:,.0f}", "mfu": "{:.1%}", "sparsity_x": "{:.3f}",
           "valid_words": "{:.3f}",
           "wall_s": "{:.1f}"}
DEFAULT_SORT = "best_val_loss"

EPILOG = """\
columns:
  steps           last step with train/loss
  best_val_loss   lowest val/loss of any evaluation; final_val_loss: the last one
  val_ppl         last val/perplexity          train_loss: last train/loss
  tok_per_s, mfu  medians of perf/tokens_per_sec and perf/mfu (blank when not logged)
  sparsity_x      last probe's model/sparsity/x, mean over layers
  valid_words     last samples/valid_word_rate (share of sampled words found in the training text)
  wall_s          seconds from the first to the last record; the records carry no timestamps, so
                  this is approximated by metrics.jsonl's mtime minus config.json's mtime (a resume
                  rewrites config.json: then it counts only the last segment)

examples:
  python -m bdh_fast.compare runs
  python -m bdh_fast.compare runs --filter preset=small --sort tok_per_s --reverse
  python -m bdh_fast.compare runs/a runs/b --plot curves.png
  python -m bdh_fast.compare runs --json | jq '.[0].run'
"""


@dataclass
class Run:
    name: str
    path: Path
    config: dict[str, Any]
    results: dict[str, float | int | None] = field(default_factory=dict)  # COLUMNS -> value
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # metric -> (step, value)


# ---------------------------------------------------------------------------------------------
# Finding and reading runs
# ---------------------------------------------------------------------------------------------


def is_run_dir(path: Path) -> bool:
    return any((path / name).is_file() for name in RUN_FILES)


def runs_in(arg: str) -> list[Path]:
    """The run an argument names (a run directory or one of its two files), or the runs directly
    inside it."""
    path = Path(arg)
    try:
        if path.is_file() and path.name in RUN_FILES:
            path = path.parent
        if not path.is_dir():
            what = "is not a directory" if path.exists() else "no such file or directory"
            raise UserError(f"{arg}: {what}; pass run directories or a directory of runs")
        if is_run_dir(path):
            return [path]
        return sorted(p for p in path.iterdir() if p.is_dir() and is_run_dir(p))
    except OSError as e:
        raise UserError(f"cannot read {arg}: {e.strerror or e}") from None


def find_runs(args: Sequence[str]) -> list[Path]:
    found: list[Path] = []
    for arg in args:
        runs = runs_in(arg)
        if not runs:
            raise UserError(f"no runs found in {arg}: a run directory holds config.json or metrics.jsonl")
        found += [r for r in runs if r.resolve() not in {f.resolve() for f in found}]
    return found


def run_names(paths: list[Path]) -> list[str]:
    """The directory name, as TensorBoard shows it; parent/name where two runs share a name."""
    names = [p.name for p in paths]
    return [f"{p.parent.name}/{p.name}" if names.count(p.name) > 1 else p.name for p in paths]


def read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None


def read_config(path: Path) -> dict[str, Any]:
    text = read_text(path / "config.json")
    if text is None:
        return {}
    try:
        config = json.loads(text)
    except ValueError:
        print(f"warning: {path / 'config.json'} is not valid JSON; its run is shown without config",
              file=sys.stderr)
        return {}
    return config if isinstance(config, dict) else {}


def read_records(path: Path) -> list[dict[str, Any]]:
    """Metric records in file order; events and unparseable lines (a half-written tail) skipped."""
    text = read_text(path / "metrics.jsonl") or ""
    records = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and "event" not in record:
            records.append(record)
    return records


def as_float(value: Any) -> float:
    """A metric value; null (non-finite when written) becomes NaN."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def load_run(path: Path, name: str) -> Run:
    run = Run(name, path, read_config(path))
    curves: dict[str, list[tuple[int, float]]] = {metric: [] for metric in (*CURVES, SPARSITY_X)}
    times: list[float] = []
    for r in read_records(path):
        for metric in CURVES:
            if metric in r:
                curves[metric].append((r["step"], as_float(r[metric])))
        layers = [as_float(v) for k, v in r.items() if k.startswith(SPARSITY_X + "/layer")]
        if layers:
            curves[SPARSITY_X].append((r["step"], statistics.fmean(layers)))
        stamp = next((r[k] for k in TIME_KEYS if isinstance(r.get(k), (int, float))), None)
        if stamp is not None:
            times.append(float(stamp))
    run.curves = curves

    def last(metric: str) -> float | None:
        return curves[metric][-1][1] if curves[metric] else None

    def finite(metric: str) -> list[float]:
        return [v for _, v in curves[metric] if math.isfinite(v)]

    def median(metric: str) -> float | None:
        return statistics.median(finite(metric)) if finite(metric) else None

    run.results = {
        "steps": max((s for s, _ in curves["train/loss"]), default=None),
        "best_val_loss": min(finite("val/loss"), default=None),
        "final_val_loss": last("val/loss"),
        "val_ppl": last("val/perplexity"),
        "train_loss": last("train/loss"),
        "tok_per_s": median("perf/tokens_per_sec"),
        "mfu": median("perf/mfu"),
        "sparsity_x": last(SPARSITY_X),
        "valid_words": last("samples/valid_word_rate"),
        "wall_s": wall_seconds(path, times),
    }
    return run


def wall_seconds(path: Path, times: list[float]) -> float | None:
    if len(times) >= 2:
        return max(times) - min(times)
    try:  # no timestamps in the records: the files' modification times bracket the run
        return max(0.0, (path / "metrics.jsonl").stat().st_mtime - (path / "config.json").stat().st_mtime)
    except OSError:
        return None


# ---------------------------------------------------------------------------------------------
# Selecting, sorting, showing
# ---------------------------------------------------------------------------------------------


def differing_fields(runs: list[Run]) -> list[str]:
    """Config fields whose values are not the same in every run (a field a run lacks counts)."""
    keys = dict.fromkeys(k for run in runs for k in run.config if k not in BOOKKEEPING)
    return [k for k in keys if len({json.dumps(run.config.get(k), sort_keys=True) for run in runs}) > 1]


def matches(value: Any, text: str) -> bool:
    if isinstance(value, bool):
        return text.lower() in (("true", "1", "yes", "on") if value else ("false", "0", "no", "off"))
    if isinstance(value, (int, float)):
        try:
            return float(text) == float(value)
        except ValueError:
            return False
    if value is None:
        return text.lower() in ("none", "null", "")
    if isinstance(value, (list, tuple)):
        return text in (",".join(map(str, value)), json.dumps(value))
    return str(value) == text


def apply_filters(runs: list[Run], exprs: list[str]) -> list[Run]:
    for expr in exprs:
        key, sep, text = expr.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"--filter {expr!r} is not FIELD=VALUE (e.g. --filter lr=0.001)")
        if not any(key in run.config for run in runs):
            raise UserError(f"--filter {expr!r}: no run has a config field {key!r}")
        runs = [run for run in runs if key in run.config and matches(run.config[key], text.strip())]
    return runs


def value_of(run: Run, key: str) -> Any:
    if key == "run":
        return run.name
    value = run.results[key] if key in COLUMNS else run.config.get(key)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def sort_runs(runs: list[Run], key: str, descending: bool = False) -> list[Run]:
    """By a column or config field. Missing values go last either way."""
    if key != "run" and key not in COLUMNS and not any(key in run.config for run in runs):
        raise UserError(f"--sort {key!r}: not a column ({', '.join(['run', *COLUMNS])}) nor a config field")
    present = [run for run in runs if value_of(run, key) is not None]
    missing = [run for run in runs if value_of(run, key) is None]
    numeric = all(isinstance(value_of(run, key), (int, float)) for run in present)
    present.sort(key=lambda run: value_of(run, key) if numeric else str(value_of(run, key)),
                 reverse=descending)
    return present + missing


def show(value: Any, fmt: str = "") -> str:
    if value is None:
        return ""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan"
    if fmt:
        return fmt.format(value)
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value)


def table(runs: list[Run]) -> str:
    fields = differing_fields(runs)
    header = ["run", *fields, *COLUMNS]
    rows = [[run.name, *(show(run.config.get(f)) for f in fields),
             *(show(run.results[c], fmt) for c, fmt in COLUMNS.items())] for run in runs]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    left = 1 + len(fields)  # names and config values read left to right; numbers align right

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < left else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(header), *map(line, rows)])


def as_json(runs: list[Run]) -> str:
    def clean(value: Any) -> Any:
        return None if isinstance(value, float) and not math.isfinite(value) else value

    fields = differing_fields(runs)
    out = [{"run": run.name, "path": str(run.path), **{k: clean(v) for k, v in run.results.items()},
            "differs": {f: run.config.get(f) for f in fields}, "config": run.config} for run in runs]
    return json.dumps(out, indent=2, default=str)


def plot(runs: list[Run], path: str) -> None:
    try:
        from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install matplotlib (or the package's `plot` extra)") from None
    fig = Figure(figsize=(13, 5), layout="constrained")
    loss_ax, sparsity_ax = fig.subplots(1, 2)
    for i, run in enumerate(runs):
        colour = f"C{i % 10}"
        train, val, sparsity = (run.curves[m] for m in ("train/loss", "val/loss", SPARSITY_X))
        if train:
            loss_ax.plot(*zip(*train), color=colour, lw=1, alpha=0.8, label=f"{run.name} train")
        if val:
            loss_ax.plot(*zip(*val), color=colour, ls="--", marker="o", ms=3, label=f"{run.name} val")
        if sparsity:
            sparsity_ax.plot(*zip(*sparsity), color=colour, marker="o", ms=3, label=run.name)
    loss_ax.set(title="loss (solid: train/loss, dashed: val/loss)", xlabel="step", ylabel="loss")
    sparsity_ax.set(title="model/sparsity/x (mean over layers)", xlabel="step", ylabel="fraction non-zero")
    for ax in (loss_ax, sparsity_ax):
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize="small")
    try:
        fig.savefig(path, dpi=100)
    except OSError as e:
        raise UserError(f"cannot write --plot {path}: {e.strerror or e}") from None


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m bdh_fast.compare", epilog=EPILOG,
                     formatter_class=argparse.RawDescriptionHelpFormatter,
                     description="Compare training runs: the config fields that differ, and how each run went.")
    parser.add_argument("paths", nargs="+", metavar="RUN_OR_RUNS_DIR",
                        help="a run directory (config.json and/or metrics.jsonl) or a directory of runs")
    parser.add_argument("--sort", default=DEFAULT_SORT, metavar="KEY",
                        help=f"a column or a config field (default {DEFAULT_SORT}; missing values last)")
    parser.add_argument("--reverse", action="store_true", help="sort descending (e.g. --sort tok_per_s --reverse)")
    parser.add_argument("--filter", action="append", default=[], metavar="FIELD=VALUE",
                        help="keep runs whose config FIELD equals VALUE (e.g. lr=0.001, preset=small); repeatable")
    parser.add_argument("--json", action="store_true", help="print a JSON list of dicts instead of the table")
    parser.add_argument("--plot", metavar="FILE.png",
                        help="also draw train/val loss and x-sparsity against step (needs matplotlib)")
    return parser


def run(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    paths = find_runs(args.paths)
    runs = [load_run(path, name) for path, name in zip(paths, run_names(paths))]
    runs = apply_filters(runs, args.filter)
    if not runs:
        raise UserError(f"no run matches --filter {' '.join(args.filter)}")
    runs = sort_runs(runs, args.sort, args.reverse)
    if args.plot:
        plot(runs, args.plot)
    print(as_json(runs) if args.json else table(runs))
    if args.plot and not args.json:
        print(f"plot: {args.plot}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return run(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `... | head`
        return 0


if __name__ == "__main__":
    sys.exit(main())
