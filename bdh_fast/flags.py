"""The command line of `python -m bdh_fast.train`: flags built from RunConfig's fields, --resume
resolution, and the choices that depend on the machine (device, dtype) with the run's first line.

Every problem with a flag becomes argparse's one-line error and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import time
from typing import Any, Sequence

import torch

from bdh_fast import checkpoint
from bdh_fast.config import RunConfig, resolve
from bdh_fast.errors import UserError


class _OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage dump), still with exit status 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="python -m bdh_fast.train",
        description="Train BDH (Dragon Hatchling) on a byte corpus with torch.compile and telemetry.",
        argument_default=argparse.SUPPRESS,  # only explicitly given flags appear in the namespace
    )
    for f in dataclasses.fields(RunConfig):
        if not f.metadata.get("cli", True):
            continue
        flag, help = f"--{f.name}", f.metadata["help"]
        if "allowed" in f.metadata:
            help += f"; {f.metadata['allowed']}"
        if "flag" in f.metadata:  # a negative switch such as --no_progress
            parser.add_argument(f.metadata["flag"], dest=f.name, action="store_false", help=help)
            continue
        if f.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=help)
            continue
        kind = {"int": int, "float": _finite_float}.get(str(f.type).removesuffix(" | None"), str)
        parser.add_argument(flag, type=kind, choices=f.metadata.get("choices"), help=help,
                            nargs=f.metadata.get("nargs"),
                            metavar=f.name.upper() if "choices" not in f.metadata else None)
    return parser


def _finite_float(text: str) -> float:
    value = float(text)
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"not a finite number: {text!r}")
    return value


def parse_flags(argv: Sequence[str] | None) -> tuple[argparse.ArgumentParser, dict[str, Any]]:
    """Parse the command line; returns the parser (for `parser.error`) and the explicit flags."""
    parser = build_parser()
    return parser, vars(parser.parse_args(argv))


# What a run leaves in its directory; a fresh run refuses a directory holding any of them.
RUN_FILES = ("ckpt.pt", "config.json", "metrics.jsonl", "wandb_id.txt", "events.out.tfevents.*", "*.pt.trace.json*")


def earlier_run_files(run_dir: pathlib.Path) -> list[str]:
    return sorted({p.name for pattern in RUN_FILES for p in run_dir.glob(pattern)})


def resolve_config(argv: Sequence[str] | None) -> tuple[RunConfig, dict[str, Any] | None]:
    """Flags -> RunConfig; with --resume, the checkpoint's config is the base.

    `--resume DIR` on a run directory that has no checkpoint yet (preempted before its first one, or
    before it even made the directory) starts that run over from step 0, in that directory, with
    its earlier logs removed: so a preemption script can always pass the same flags plus --resume.
    A fresh run refuses a directory with run files.
    """
    parser, explicit = parse_flags(argv)
    state = None
    base = None
    restart_dir = None
    if "resume" in explicit:
        resume = pathlib.Path(explicit["resume"]).expanduser()
        if resume.resolve().name in ("", ".", ".."):
            raise UserError(f"--resume: {resume} is not a run directory; pass runs/<run_name> or its ckpt.pt")
        never_saved = resume.is_dir() and not (resume / checkpoint.CKPT_NAME).exists()
        never_started = not resume.exists() and resume.suffix != ".pt"  # killed before it made its directory
        if never_saved or never_started:
            restart_dir = resume
            base = _saved_run_config(resume) or None  # the crashed segment's config, if it wrote one
            explicit = {**explicit, "out_dir": str(resume.parent), "run_name": resume.name}
        else:
            path = checkpoint.locate(explicit["resume"])
            state = checkpoint.load(path)
            checkpoint.check_model_flags(state["config"], explicit, path)
            # The run continues in the checkpoint's own directory, under its own name.
            base = {**state["config"], "out_dir": str(path.parent.parent), "run_name": path.parent.name}
            explicit = {k: v for k, v in explicit.items() if k not in ("out_dir", "run_name")}
    try:
        config = resolve(explicit, cuda_available=torch.cuda.is_available(), base=base)
    except UserError as e:
        parser.error(str(e))
    run_dir = pathlib.Path(config.out_dir) / config.run_name
    if restart_dir is not None and restart_dir.is_dir():
        print(f"--resume: {restart_dir} has no checkpoint yet; starting it over from step 0 "
              f"(its earlier logs are removed)", flush=True)
        _remove_run_files(restart_dir)
    elif restart_dir is not None:
        print(f"--resume: {restart_dir} does not exist yet (no run started there); starting it from step 0",
              flush=True)
    elif state is None and run_dir.is_dir() and earlier_run_files(run_dir):
        raise UserError(f"{run_dir} already holds a run ({', '.join(earlier_run_files(run_dir)[:4])}); pass "
                        f"--resume {run_dir} to continue it, or another --run_name")
    return config, state


def _saved_run_config(run_dir: pathlib.Path) -> dict[str, Any]:
    """The RunConfig fields of a run's config.json (none if it never wrote one, or it is unreadable)."""
    try:
        saved = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    fields = RunConfig.__dataclass_fields__
    return {k: v for k, v in saved.items() if k in fields} if isinstance(saved, dict) else {}


def _remove_run_files(run_dir: pathlib.Path) -> None:
    for pattern in RUN_FILES:
        for path in run_dir.glob(pattern):
            path.unlink()
    if (run_dir / "wandb").is_dir():  # the crashed segment's W&B run: kept aside, not synced with the new one
        (run_dir / "wandb").rename(run_dir / f"wandb.before-restart-{int(time.time())}")


def pick_device(config: RunConfig, local_rank: int = 0) -> torch.device:
    if config.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda, but no CUDA GPU is visible; use --device cpu")
    if config.device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 matrix products in hardware (AVX512-BF16 or AMX): there
    bf16 autocast halves a small BDH's step (measured on a 2-core Zen 4: 221 ms vs 436 ms); elsewhere
    it is emulated and slower than float32."""
    checks = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(check is not None and check() for check in checks)


def pick_dtype(config: RunConfig, device: torch.device) -> str:
    if config.dtype != "auto":
        return config.dtype
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bfloat16"
    if device.type == "cpu" and cpu_has_native_bf16():
        return "bfloat16"
    return "float32"


def announce(config: RunConfig, device: torch.device, dtype: str, resumed_step: int | None,
             world_size: int = 1) -> str:
    why = "" if config.device != "auto" else (" (CUDA GPU found)" if device.type == "cuda" else " (no CUDA GPU found)")
    preset = f"preset {config.preset}" if config.preset else "custom"
    line = (f"bdh_fast: {device.type}{why}, {preset}: L{config.n_layer} D{config.n_embd} "
            f"H{config.n_head} m{config.mlp_mult}, B{config.batch_size} T{config.block_size}, "
            f"{config.max_iters} iters, {dtype}, compile {'on' if config.compile else 'off'}")
    if world_size > 1:
        line += (f", {world_size} data-parallel ranks: effective batch {config.batch_size * world_size} "
                 f"x {config.block_size} tokens")
    if resumed_step is not None:
        line += f", resuming from step {resumed_step}"
    return line
