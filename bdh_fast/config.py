"""The run configuration: one typed dataclass, its command-line flags, presets, validation.

Every field's `help` doubles as the flag's help text. Flags are snake_case like the reference
train.py. Resolution order: dataclass defaults < preset < explicit flags (< a resumed checkpoint's
saved config, for fields not given explicitly). `RunConfig.__post_init__` validates every value;
`parse_args` turns each problem into argparse's one-line error and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import secrets
from dataclasses import dataclass, field
from typing import Any, Sequence

from bdh_fast.errors import UserError
from bdh_fast.model import BDHConfig

# Model fields: a resumed run must match these exactly.
MODEL_FIELDS = ("n_layer", "n_embd", "n_head", "mlp_mult", "dropout", "vocab_size")

PRESETS: dict[str, dict[str, Any]] = {
    # A few seconds on a CPU: tests and smoke runs.
    "tiny": dict(n_layer=2, n_embd=64, n_head=2, mlp_mult=8, dropout=0.0, batch_size=8,
                 block_size=64, max_iters=50, log_freq=10),
    # The CPU default: about five minutes on 2 cores, reaches train loss ~2.1 by step 150.
    # No dropout: a run this short does not overfit, and dropout's RNG costs ~20% of a CPU step.
    "small": dict(n_layer=4, n_embd=128, n_head=4, mlp_mult=16, dropout=0.0, batch_size=16,
                  block_size=128, max_iters=600, log_freq=50, eval_freq=100, probe_freq=100,
                  generate_freq=300),
    # The reference train.py recipe (BDH.md), the CUDA default.
    "reference": dict(n_layer=6, n_embd=256, n_head=4, mlp_mult=128, dropout=0.1, batch_size=32,
                      block_size=512, max_iters=3000, log_freq=100),
}


def _f(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class RunConfig:
    # --- data and run directory
    data: str | None = _f(None, "text file read as raw bytes (default: tiny Shakespeare, shipped with the package)")
    val_fraction: float = _f(0.1, "last fraction of the file used as the validation split")
    out_dir: str = _f("runs", "directory holding one sub-directory per run")
    run_name: str | None = _f(None, "run sub-directory name (default: date-time + short id)")
    resume: str | None = _f(None, "continue a run: its directory or a checkpoint file")
    # --- model (BDHConfig)
    preset: str | None = _f(None, "size and recipe preset (default: reference on CUDA, small on CPU)", choices=tuple(PRESETS))
    n_layer: int = _f(6, "layer applications (weights shared)")
    n_embd: int = _f(256, "width D of the dense stream")
    n_head: int = _f(4, "heads nh")
    mlp_mult: int = _f(128, "neurons per head N = mlp_mult * n_embd / n_head")
    dropout: float = _f(0.1, "dropout on x_s * y_s")
    vocab_size: int = _f(256, "vocabulary size (bytes)", cli=False)
    # --- optimisation
    batch_size: int = _f(32, "sequences per step (B)")
    block_size: int = _f(512, "tokens per sequence (T)")
    max_iters: int = _f(3000, "training steps")
    lr: float = _f(1e-3, "peak learning rate (AdamW)")
    min_lr: float = _f(1e-4, "final learning rate of the cosine and linear schedules")
    warmup_iters: int = _f(0, "linear warmup steps")
    lr_schedule: str = _f("constant", "learning-rate schedule after warmup", choices=("constant", "cosine", "linear"))
    weight_decay: float = _f(0.1, "AdamW weight decay")
    grad_clip: float = _f(0.0, "clip the global gradient norm to this value (0 = off)")
    seed: int = _f(1337, "seed for init, batches and dropout")
    # --- execution
    device: str = _f("auto", "where to train", choices=("auto", "cpu", "cuda"))
    dtype: str = _f("auto", "autocast dtype (auto: bfloat16 on CUDA when supported, else float32)", choices=("auto", "float32", "bfloat16", "float16"))
    compile: bool = _f(True, "train the torch.compile'd model")
    # --- logging and checkpoints
    log_freq: int = _f(100, "console line every N steps (mean train loss since the previous line)")
    ckpt_freq: int = _f(500, "write ckpt.pt every N steps (0 = only at the end)")
    # --- telemetry
    log_train_freq: int = _f(10, "steps buffered on the device between flushes to the host")
    log_backend: str = _f("tensorboard,jsonl", "comma list of tensorboard, wandb, jsonl, or none")
    wandb_project: str = _f("bdh-training", "W&B project")
    wandb_entity: str | None = _f(None, "W&B entity (team or user)")
    wandb_mode: str = _f("auto", "W&B mode (auto: online with an API key, else offline)", choices=("auto", "online", "offline", "disabled"))
    wandb_log_checkpoints: bool = _f(False, "upload checkpoints to W&B as artifacts")
    on_nonfinite: str = _f("stop", "what a non-finite loss or gradient norm does", choices=("stop", "skip", "warn"))
    peak_tflops: float | None = _f(None, "peak TFLOP/s for MFU (default: looked up by GPU name and dtype; none on CPU)")
    nvml_interval: float = _f(2.0, "seconds between NVML GPU samples (0 = off)")
    progress: bool = _f(True, "hide the tqdm progress bar (shown only in an interactive terminal, never in a pipe)", flag="--no_progress")
    # --- evaluation, samples, probes
    eval_freq: int = _f(500, "evaluate every N steps and at the end (0 = off)")
    eval_iters: int = _f(10, "batches per split per evaluation")
    generate_freq: int = _f(500, "sample from the prompts every N steps and at the end (0 = off)")
    prompts: tuple[str, ...] = _f(("To be or not to be", "Once upon a time", "In a galaxy far, far away"),
                                  "prompts for the periodic samples", nargs="+")
    sample_tokens: int = _f(100, "bytes generated per sample")
    temperature: float = _f(1.0, "sampling temperature (> 0)")
    top_k: int | None = _f(3, "sample among the k most likely bytes (0 = all)")
    probe_freq: int = _f(500, "parameter norms, update ratios, histograms, neuron sparsity every N steps and at the end (0 = off)")
    hist_bins: int = _f(64, "buckets of the weight and gradient histograms")
    # --- profiling
    profile: bool = _f(False, "record torch.profiler traces into the run directory (TensorBoard profiler view, Perfetto)")
    profile_wait: int = _f(5, "profiler schedule: steps skipped before each cycle")
    profile_warmup: int = _f(2, "profiler schedule: warm-up steps (traced, discarded)")
    profile_active: int = _f(3, "profiler schedule: steps recorded per cycle")
    profile_repeat: int = _f(1, "profiler schedule: cycles (0 = until the end)")
    memory_snapshot: int = _f(0, "record the CUDA allocator for N steps and dump a snapshot for pytorch.org/memory_viz (0 = off)")

    def __post_init__(self) -> None:
        problems = []
        positive = ("n_layer", "n_embd", "n_head", "mlp_mult", "vocab_size", "batch_size",
                    "block_size", "max_iters", "log_freq", "log_train_freq", "eval_iters",
                    "sample_tokens", "hist_bins", "profile_active")
        problems += [f"--{n} must be >= 1 (got {getattr(self, n)})" for n in positive if getattr(self, n) < 1]
        non_negative = ("warmup_iters", "ckpt_freq", "weight_decay", "grad_clip", "min_lr",
                        "nvml_interval", "eval_freq", "generate_freq", "top_k", "probe_freq",
                        "profile_wait", "profile_warmup", "profile_repeat", "memory_snapshot")
        problems += [f"--{n} must be >= 0 (got {getattr(self, n)})" for n in non_negative if not getattr(self, n) >= 0]
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            problems.append(f"--peak_tflops must be > 0 (got {self.peak_tflops})")
        if not self.temperature > 0:
            problems.append(f"--temperature must be > 0 (got {self.temperature})")
        self.prompts = tuple(self.prompts)
        if not self.prompts or any(not p for p in self.prompts):
            problems.append("--prompts must be one or more non-empty strings")
        if not self.lr > 0:
            problems.append(f"--lr must be > 0 (got {self.lr})")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"--dropout must be in [0, 1) (got {self.dropout})")
        if not 0.0 < self.val_fraction < 1.0:
            problems.append(f"--val_fraction must be in (0, 1) (got {self.val_fraction})")
        for name in ("preset", "lr_schedule", "device", "dtype", "wandb_mode", "on_nonfinite"):
            choices = field_choices(name)
            if getattr(self, name) is not None and getattr(self, name) not in choices:
                problems.append(f"--{name} must be one of {', '.join(choices)} (got {getattr(self, name)!r})")
        if not problems:
            try:
                self.model_config()
            except ValueError as e:
                problems.append(str(e).replace("mlp_internal_dim_multiplier", "mlp_mult"))
        if problems:
            raise UserError("; ".join(problems))

    def model_config(self) -> BDHConfig:
        return BDHConfig(n_layer=self.n_layer, n_embd=self.n_embd, n_head=self.n_head,
                         mlp_internal_dim_multiplier=self.mlp_mult, dropout=self.dropout,
                         vocab_size=self.vocab_size)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def field_choices(name: str) -> tuple[str, ...]:
    return next(f.metadata.get("choices", ()) for f in dataclasses.fields(RunConfig) if f.name == name)


def default_run_name() -> str:
    return datetime.datetime.now().strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


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


def resolve(explicit: dict[str, Any], *, cuda_available: bool, base: dict[str, Any] | None = None) -> RunConfig:
    """Build the RunConfig: defaults, then the preset, then `base` (a resumed run's saved config),
    then the explicitly given flags. Raises UserError on any invalid value."""
    values: dict[str, Any] = {}
    if base is not None:
        known = {f.name for f in dataclasses.fields(RunConfig)}
        values.update({k: v for k, v in base.items() if k in known})
    else:
        device = explicit.get("device", "auto")
        on_cuda = device == "cuda" or (device == "auto" and cuda_available)
        preset = explicit.get("preset") or ("reference" if on_cuda else "small")
        values["preset"] = preset
        values.update(PRESETS[preset])
    values.update(explicit)
    if values.get("run_name") is None:
        values["run_name"] = default_run_name()
    return RunConfig(**values)


def parse_flags(argv: Sequence[str] | None) -> tuple[argparse.ArgumentParser, dict[str, Any]]:
    """Parse the command line; returns the parser (for `parser.error`) and the explicit flags."""
    parser = build_parser()
    return parser, vars(parser.parse_args(argv))
