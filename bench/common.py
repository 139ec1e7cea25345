"""The bench harness: what every benchmark shares. Interleaved A/B timing and paired ratios,
verdicts against the one table of targets (bench/targets.py), tables, machine info, the JSON line,
dated result files, the shared flags, and the training step with no telemetry at all.

STYLE.md habit 10, honest benchmarks: warm up first; synchronise around every timer; run the
variants interleaved (A, B, C, A, B, C, ...) so drift and noisy neighbours hit all of them alike;
report medians, ratios and the paired per-round range (the noise); call a figure whose noise is
wider than its target "unresolved"; end stdout with one machine-readable JSON line; file results
with the hardware and the date.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from records import clean, emit as emit_json  # noqa: F401  (emit_json: the last stdout line)
from targets import judge  # noqa: F401  (the verdicts: the scripts import the whole harness from here)

from bdh_fast.config import PRESETS, RunConfig, resolve
from bdh_fast.data import DEFAULT_CORPUS, ByteDataset, resolve_data_path
from bdh_fast.model import BDH
from bdh_fast.optim import apply_update, lr_lambda, make_optimizer

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
CORPUS = DEFAULT_CORPUS  # tiny Shakespeare as the package ships it


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


def interleaved(
    fns: dict[str, Callable[[], Any]],
    repeats: int,
    warmup: int = 1,
    *,
    device: torch.device | None = None,
    settle: dict[str, Callable[[], Any]] | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of each fn, called round-robin: `warmup` untimed rounds, then `repeats`
    timed rounds of A, B, C, A, B, C, ...

    On CUDA (`device`, or any initialised CUDA context when None) the device is synchronised before
    and after each call, so a call is charged exactly its own kernels. `settle[name]`, if given,
    runs untimed right after that fn (e.g. draining a variant's background writer so its leftover
    work is not billed to the variant that runs next). gc.collect() runs untimed before each call,
    so one variant's garbage is not collected on another's clock.
    """
    if device is not None:
        sync = device.type == "cuda"
    else:
        sync = torch.cuda.is_available() and torch.cuda.is_initialized()
    settle = settle or {}
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_index in range(warmup + repeats):
        for name, fn in fns.items():
            gc.collect()
            if sync:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if sync:
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - t0
            if round_index >= warmup:
                times[name].append(elapsed)
            if name in settle:
                settle[name]()
    return times


def timed_once(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds for one call (e.g. the first compiled step: compilation included), synchronised."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def median(values: list[float]) -> float:
    return statistics.median(values)


def mean(values: list[float]) -> float:
    return statistics.fmean(values)


def paired_pct(variant: list[float], baseline: list[float]) -> list[float]:
    """Per-round overhead in %: each variant sample against the baseline sample of the same round."""
    return [(a / b - 1) * 100 for a, b in zip(variant, baseline)]


def paired_ratio(slow: list[float], fast: list[float]) -> list[float]:
    """Per-round speedup: each `slow` sample over the `fast` sample of the same round."""
    return [a / b for a, b in zip(slow, fast)]


def span(values: list[float]) -> list[float]:
    """[min, max]: the paired range."""
    return [min(values), max(values)]


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------


def markdown_table(columns: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---:" if i else "---" for i in range(len(columns))) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def ratio_table(
    step_s: dict[str, list[float]],
    baseline: str,
    tokens_per_step: int,
    extra: dict[str, dict[str, str]] | None = None,
) -> str:
    """One row per variant: median and mean ms/step, min-max, tokens/s (from the median), and the
    median step time relative to `baseline`; `extra[name][column]` adds columns."""
    extra = extra or {}
    extra_columns = list(dict.fromkeys(c for cols in extra.values() for c in cols))
    base = median(step_s[baseline])
    rows = []
    for name, samples in step_s.items():
        med = median(samples)
        rows.append([
            name, f"{med * 1e3:.2f}", f"{mean(samples) * 1e3:.2f}",
            f"{min(samples) * 1e3:.2f}-{max(samples) * 1e3:.2f}", f"{tokens_per_step / med:,.0f}",
            f"{med / base:.3f}x", *(extra.get(name, {}).get(c, "") for c in extra_columns),
        ])
    columns = ["variant", "median ms/step", "mean ms/step", "min-max ms/step", "tokens/s",
               f"time vs {baseline}", *extra_columns]
    return markdown_table(columns, rows)


def verdicts_table(verdicts: list[dict]) -> str:
    """One row per judged figure (targets.judge entries)."""
    return markdown_table(["claim", "figure", "target", "verdict", "note"],
                          [[v["claim"], v["figure"], v["target_text"], v["verdict"], v["note"] or "-"]
                           for v in verdicts])


# ---------------------------------------------------------------------------------------------
# Machine, JSON line, result files
# ---------------------------------------------------------------------------------------------


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def machine_info() -> dict[str, Any]:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count()
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu,
        "cuda": torch.version.cuda if gpu else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def machine_line(info: dict[str, Any]) -> str:
    where = f"GPU {info['gpu']} (CUDA {info['cuda']}), " if info["gpu"] else ""
    return (f"{where}CPU {info['cpu']}, {info['usable_cores']}/{info['cores']} cores usable, "
            f"{info['torch_threads']} torch threads; torch {info['torch']}, Python {info['python']}; "
            f"{info['date']}")


def machine_slug(info: dict[str, Any]) -> str:
    name = info["gpu"] or f"{info['cpu']} {info['usable_cores']}c"
    name = re.sub(r"\((r|tm)\)|\bcpu\b|@.*?ghz", " ", name, flags=re.IGNORECASE)
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:48] or "unknown"


def free_stem(out_dir: Path, stem: str) -> Path:
    """out_dir/stem, or stem-2, stem-3, ... when a .md or .json of that name is there already."""
    suffix, n = "", 1
    while (out_dir / f"{stem}{suffix}.md").exists() or (out_dir / f"{stem}{suffix}.json").exists():
        n += 1
        suffix = f"-{n}"
    return out_dir / f"{stem}{suffix}"


def save_result(name: str, text: str, record: dict[str, Any] | None = None) -> list[Path]:
    """Write bench/results/<YYYY-MM-DD>-<machine-slug>-<name>.md (and .json with `record`); a
    second result of the same day and machine gets -2, -3, ... instead of overwriting."""
    info = (record or {}).get("machine") or machine_info()
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stem = free_stem(RESULTS_DIR, f"{info['date'][:10]}-{machine_slug(info)}-{name}")  # the measurement's UTC date
    paths = [stem.with_name(stem.name + ".md")]
    paths[0].write_text(text.rstrip("\n") + "\n")
    if record is not None:
        paths.append(stem.with_name(stem.name + ".json"))
        paths[1].write_text(json.dumps(clean(record), indent=2, default=str) + "\n")
    return paths


def command_line() -> str:
    return "python " + " ".join([os.path.relpath(sys.argv[0]), *sys.argv[1:]])


def finish(args: argparse.Namespace, name: str, title: str, body: str, notes: list[str], record: dict[str, Any],
           info: dict[str, Any]) -> int:
    """The end of every benchmark: the report (body, its verdicts, notes, machine) printed; with
    --save filed as bench/results/<date>-<machine>-<name>.md|json; the JSON record as the last
    stdout line. Exit status 0: the verdicts are in the record (bench/run_all.py gates on them)."""
    verdicts = record.get("verdicts") or []
    if args.quick:
        notes = [*notes, "quick run: harness check only, no gate"]
    parts = [body, "", verdicts_table(verdicts)] if verdicts else [body]
    text = "\n".join([*parts, "", *(f"- {line}" for line in notes), f"- machine: {machine_line(info)}"])
    print()
    print(text)
    if args.save:
        for path in save_result(name, f"# {title}\n\n`{command_line()}`\n\n{text}", record):
            print(f"saved {path}")
    emit_json(record)
    return 0


# ---------------------------------------------------------------------------------------------
# The shared flags
# ---------------------------------------------------------------------------------------------


def bench_parser(doc: str, quick: str, *, preset: bool = True, dtype: bool = True, compile: bool = True,
                 data: bool = True, device: tuple[str, ...] = ("auto", "cpu", "cuda")) -> argparse.ArgumentParser:
    """An ArgumentParser with the flags every benchmark spells the same way: --quick (what it
    shrinks to: `quick`), --save, --device, and as asked --preset, --dtype, --compile/--no-compile
    (as `python -m bdh_fast.train` spells it) and --data."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], epilog=doc.split("\n\n", 1)[-1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"{quick}: checks the harness, no gate")
    p.add_argument("--save", action="store_true", help="file the report and JSON under bench/results/")
    p.add_argument("--device", choices=device, default=device[0])
    if preset:
        p.add_argument("--preset", choices=tuple(PRESETS), default=None,
                       help="model and batch preset (default: small on CPU, reference on CUDA)")
    if dtype:
        dtype_field = RunConfig.__dataclass_fields__["dtype"]  # the train CLI's flag: same choices, same help
        p.add_argument("--dtype", choices=dtype_field.metadata["choices"], default="auto",
                       help=dtype_field.metadata["help"])
    if compile:
        p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                       help="train the torch.compile'd model (--no-compile: eager)")
    if data:
        p.add_argument("--data", default=None, help="corpus file (default: the packaged tiny Shakespeare)")
    return p


# ---------------------------------------------------------------------------------------------
# Run setup shared by the benchmarks
# ---------------------------------------------------------------------------------------------


def bench_config(preset: str | None, device: str, **fields: Any) -> RunConfig:
    """The same RunConfig `python -m bdh_fast.train --preset ...` would build (preset None: small
    on CPU, reference on CUDA), validated."""
    explicit = {"device": device, **fields}
    if preset is not None:
        explicit["preset"] = preset
    return resolve(explicit, cuda_available=torch.cuda.is_available())


def corpus_file(data: str | os.PathLike | None = None, workdir: Path | None = None) -> tuple[Path, str]:
    """(path, description) of the corpus a benchmark trains on: `data` checked to be a non-empty
    file, or (None, or "corpus") the packaged tiny Shakespeare. Every variant reads batches through
    bdh_fast.data.ByteDataset, as training does. `workdir` is unused (kept for callers)."""
    if data is None or str(data) == "corpus":
        return resolve_data_path(None), "corpus tiny Shakespeare (packaged)"
    path = resolve_data_path(data)
    return path, f"corpus {path}"


def configure_device(device: torch.device) -> None:
    """Global math settings the Trainer sets too (TF32 on CUDA), set once for every variant."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


AUTOCAST = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


class BareLoop:
    """The Trainer's training math with no telemetry and no host read: same model init (seed),
    same fused AdamW and parameter groups, same LR schedule, same autocast, same batch stream.

    `step()` = `forward_backward()` + `update()`; the naive variant puts its host reads between.
    """

    def __init__(self, config: RunConfig, device: torch.device, dtype: str, data_path: Path, compile: bool):
        self.config = config
        self.device = device
        self.data = ByteDataset(data_path, config.block_size, config.batch_size, config.val_fraction,
                                device, config.seed)
        torch.manual_seed(config.seed)  # as the Trainer: identical init in every variant
        self.model = BDH(config.model_config()).to(device)
        # Train the compiled module; `self.model` keeps the parameters and state_dict() names.
        self.train_model = torch.compile(self.model, dynamic=False) if compile else self.model
        self.optimizer = make_optimizer(self.model, config, device)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(config))
        self.autocast_dtype = AUTOCAST[dtype]
        self.scaler = torch.amp.GradScaler(device.type) if dtype == "float16" else None
        self.params = list(self.model.parameters())

    def forward_backward(self) -> torch.Tensor:
        x, y = self.data.get_batch("train")
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            _, loss = self.train_model(x, y)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        return loss

    def clip(self) -> torch.Tensor | None:
        """Clip like the Trainer when --grad_clip > 0; the returned norm stays on the device."""
        if self.config.grad_clip > 0:
            return torch.nn.utils.clip_grad_norm_(self.params, self.config.grad_clip, foreach=True)
        return None

    def update(self) -> None:
        apply_update(self.optimizer, self.scheduler, self.scaler)

    def step(self) -> None:
        self.forward_backward()
        self.clip()
        self.update()

    def steps(self, n: int) -> None:
        for _ in range(n):
            self.step()
