"""The run configuration: one typed dataclass, its presets, its validation.

Every field's `help` doubles as its command-line flag's help text (bdh_fast/flags.py builds the
flags from the fields). Resolution order: dataclass defaults < preset < explicit flags (< a resumed
checkpoint's saved config, for fields not given explicitly). `RunConfig.__post_init__` validates
every value, whether it comes from the command line, a checkpoint or code.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import secrets
from dataclasses import dataclass, field
from typing import Any

from bdh_fast.errors import UserError
from bdh_fast.model import BDHConfig

# Model fields: a resumed run must match these exactly.
MODEL_FIELDS = ("n_layer", "n_embd", "n_head", "mlp_mult", "dropout", "vocab_size")

PRESETS: dict[str, dict[str, Any]] = {
    # A few seconds on a CPU: tests and smoke runs.
    "tiny": dict(n_layer=2, n_embd=64, n_head=2, mlp_mult=8, dropout=0.0, batch_size=8,
                 block_size=64, max_iters=50, log_freq=10),
    # The CPU default: about four and a half minutes on 2 cores, compile included, to val loss ~1.59
    # (bench/results/*-default-run.md). Measured on a 2-core Zen 4 in bf16: m8 costs half of m16 per
    # token, B8 gives B16's tokens/s with twice the updates, and L3 ends level with L4 in the same
    # time and compiles faster; a linear decay to zero ended lowest of the schedules tried. No
    # dropout: a run this short does not overfit, and dropout's RNG costs ~20% of a CPU step.
    "small": dict(n_layer=3, n_embd=128, n_head=4, mlp_mult=8, dropout=0.0, batch_size=8,
                  block_size=128, max_iters=3600, lr=3e-3, warmup_iters=100, lr_schedule="linear",
                  min_lr=0.0, log_freq=200, eval_freq=400, eval_iters=20, probe_freq=400,
                  generate_freq=1800),
    # The reference train.py recipe (BDH.md), the CUDA default.
    "reference": dict(n_layer=6, n_embd=256, n_head=4, mlp_mult=128, dropout=0.1, batch_size=32,
                      block_size=512, max_iters=3000, log_freq=100),
}


METRIC_LEVELS = ("basic", "standard", "full")  # --metrics, each level logs what the one before does and more
MAX_STEPS = 10**9  # step counts and cadences: far past any run, and short of a typo's extra zeros
MAX_NAME_BYTES = 255  # the longest file name Linux and macOS file systems take
# Below 0.1 s NVML has nothing new to say (it averages utilisation over longer periods) and the
# sampler thread would only burn a core: --nvml_interval is 0 or at least this.
NVML_MIN_INTERVAL_S = 0.1
WANDB_PROJECT_FORBIDDEN = "/\\#?%:"  # wandb.init refuses these (and more than 128 characters)


@dataclass(frozen=True)
class Range:
    """The values a numeric flag accepts: from `lo` to `hi` (None: unbounded), ends included unless open.

    The bounds keep every value inside what the run can do: an absurd one (a typo's extra zeros,
    NaN) is a one-line error before anything starts, not an out-of-memory kill an hour later.
    """

    lo: float
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def __contains__(self, value: float) -> bool:
        above = value > self.lo if self.lo_open else value >= self.lo
        below = self.hi is None or (value < self.hi if self.hi_open else value <= self.hi)
        return above and below

    def __str__(self) -> str:  # as messages and --help say it: "in [1, 4096]", "in (0, 1)", ">= 0"
        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {self.lo}"
        return f"in {'(' if self.lo_open else '['}{self.lo}, {self.hi}{')' if self.hi_open else ']'}"


STEPS = Range(0, MAX_STEPS)  # a count or cadence of steps that may be 0 (none, or off)
POSITIVE_STEPS = Range(1, MAX_STEPS)


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A field whose `help` is the flag's help; `allowed` (a Range), `choices`, `nargs`, `flag`
    and `cli` shape and check the flag."""
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class RunConfig:
    # --- data and run directory
    data: str | None = _f(None, "text file read as raw bytes (default: tiny Shakespeare, shipped with the package)")
    val_fraction: float = _f(0.1, "last fraction of the file used as the validation split",
                             allowed=Range(0, 1, lo_open=True, hi_open=True))
    out_dir: str = _f("runs", "directory holding one sub-directory per run")
    run_name: str | None = _f(None, "run sub-directory name: one directory name, no '/' "
                                    "(default: date-time + short id)")
    resume: str | None = _f(None, "continue a run: its directory or a checkpoint file")
    # --- model (BDHConfig)
    preset: str | None = _f(None, "size and recipe preset (default: reference on CUDA, small on CPU)", choices=tuple(PRESETS))
    n_layer: int = _f(6, "layer applications (weights shared)", allowed=Range(1, 1024))
    n_embd: int = _f(256, "width D of the dense stream", allowed=Range(1, 16384))
    n_head: int = _f(4, "heads nh", allowed=Range(1, 1024))
    mlp_mult: int = _f(128, "neurons per head N = mlp_mult * n_embd / n_head", allowed=Range(1, 4096))
    dropout: float = _f(0.1, "dropout on x_s * y_s", allowed=Range(0, 1, hi_open=True))
    vocab_size: int = _f(256, "vocabulary size (bytes)", cli=False, allowed=Range(256, 65536))
    # --- optimisation
    batch_size: int = _f(32, "sequences per step (B)", allowed=Range(1, 65536))
    block_size: int = _f(512, "tokens per sequence (T)", allowed=Range(1, 65536))
    max_iters: int = _f(3000, "training steps", allowed=POSITIVE_STEPS)
    lr: float = _f(1e-3, "peak learning rate (AdamW)", allowed=Range(0, 1, lo_open=True))
    min_lr: float = _f(1e-4, "final learning rate of the cosine and linear schedules (<= --lr)", allowed=Range(0, 1))
    warmup_iters: int = _f(0, "linear warmup steps", allowed=STEPS)
    lr_schedule: str = _f("constant", "learning-rate schedule after warmup", choices=("constant", "cosine", "linear"))
    weight_decay: float = _f(0.1, "AdamW weight decay", allowed=Range(0))
    grad_clip: float = _f(0.0, "clip the global gradient norm to this value (0 = off)", allowed=Range(0))
    seed: int = _f(1337, "seed for init, batches and dropout", allowed=Range(0, 2**32 - 1))
    # --- execution
    device: str = _f("auto", "where to train", choices=("auto", "cpu", "cuda"))
    dtype: str = _f("auto", "autocast dtype (auto: bfloat16 on a CUDA GPU or a CPU that computes it natively, else float32)", choices=("auto", "float32", "bfloat16", "float16"))
    compile: bool = _f(True, "train the torch.compile'd model")
    # --- logging and checkpoints
    log_freq: int = _f(100, "console line every N steps (mean train loss since the previous line)",
                       allowed=POSITIVE_STEPS)
    ckpt_freq: int = _f(500, "write ckpt.pt every N steps (0 = only at the end)", allowed=STEPS)
    # --- telemetry
    # The step buffer holds log_train_freq rows on the device: the bound keeps it a few MB.
    log_train_freq: int = _f(10, "steps buffered on the device between flushes to the host", allowed=Range(1, 100_000))
    log_backend: str = _f("tensorboard,jsonl", "comma list of tensorboard, wandb, jsonl, or none")
    log_writer: str = _f("process", "where the backends run: a writer process (never holds the training "
                         "thread's interpreter lock) or a thread of the training process", choices=("process", "thread"))
    metrics: str = _f("standard", "what is logged: basic (loss, LR, global grad norm, speed, eval, system, samples), "
                      "standard (+ per-group grad norms, every step's neuron sparsity per layer, the probes' norms and "
                      "neuron statistics, per-prompt sample figures), full (+ per-parameter grad norms every step, "
                      "weight and gradient histograms at probe steps)", choices=METRIC_LEVELS)
    wandb_project: str = _f("bdh-training", "W&B project (at most 128 characters, none of / \\ # ? %% :)")
    wandb_entity: str | None = _f(None, "W&B entity (team or user)")
    wandb_mode: str = _f("auto", "W&B mode (auto: online with an API key, else offline)", choices=("auto", "online", "offline", "disabled"))
    wandb_log_checkpoints: bool = _f(False, "upload checkpoints to W&B as artifacts")
    on_nonfinite: str = _f("stop", "what a non-finite loss or gradient norm does", choices=("stop", "skip", "warn"))
    on_spike: str = _f("warn", "what a loss or grad-norm spike (z-score over the last --spike_window steps, on the "
                       "device) does: off, warn (named at the flush), skip (its update left out, no sync)",
                       choices=("off", "warn", "skip"))
    spike_window: int = _f(128, "steps in the spike detector's window (it decides from a quarter of it on)",
                           allowed=Range(8, 100_000))
    spike_zscore: float = _f(6.0, "a step whose loss or grad norm is this many standard deviations above the "
                             "window's mean is a spike", allowed=Range(1))
    peak_tflops: float | None = _f(None, "peak TFLOP/s for MFU (default: looked up by GPU name and dtype; none on CPU)",
                                   allowed=Range(0, 1_000_000, lo_open=True))
    nvml_interval: float = _f(2.0, "seconds between NVML GPU samples (0 = off, else >= 0.1)", allowed=Range(0, 86_400))
    progress: bool = _f(True, "hide the tqdm progress bar (shown only in an interactive terminal, never in a pipe)", flag="--no_progress")
    # --- evaluation, samples, probes
    eval_freq: int = _f(500, "evaluate every N steps and at the end (0 = off)", allowed=STEPS)
    # The eval batches are drawn once and kept on the device: the bound keeps them in memory.
    eval_iters: int = _f(10, "batches per split per evaluation", allowed=Range(1, 1000))
    generate_freq: int = _f(500, "sample from the prompts every N steps and at the end (0 = off)", allowed=STEPS)
    prompts: tuple[str, ...] = _f(("To be or not to be", "Once upon a time", "In a galaxy far, far away"),
                                  "prompts for the periodic samples", nargs="+")
    sample_tokens: int = _f(100, "bytes generated per sample", allowed=Range(1, 65536))
    samples_per_prompt: int = _f(1, "samples drawn per prompt at each sampling step (how often they differ is logged)",
                                 allowed=Range(1, 64))
    temperature: float = _f(1.0, "sampling temperature", allowed=Range(0, lo_open=True))
    top_k: int | None = _f(3, "sample among the k most likely bytes (0 = all)", allowed=Range(0, 256))
    probe_freq: int = _f(500, "parameter norms, update ratios, neuron statistics on a fixed batch (and with --metrics full, "
                         "histograms) every N steps and at the end (0 = off; --metrics basic: off)",
                         allowed=STEPS)
    # Histograms are computed on the device for every parameter: each bucket costs memory there.
    hist_bins: int = _f(64, "buckets of the weight and gradient histograms", allowed=Range(1, 4096))
    # --- profiling (a trace holds every op of every traced step: a few steps are what it can show)
    profile: bool = _f(False, "record torch.profiler traces into the run directory (TensorBoard profiler view, Perfetto)")
    profile_wait: int = _f(5, "profiler schedule: steps skipped before each cycle", allowed=STEPS)
    profile_warmup: int = _f(2, "profiler schedule: warm-up steps (traced, discarded)", allowed=Range(0, 100))
    profile_active: int = _f(3, "profiler schedule: steps recorded per cycle", allowed=Range(1, 100))
    profile_repeat: int = _f(1, "profiler schedule: cycles (0 = until the end)", allowed=Range(0, 1000))
    memory_snapshot: int = _f(0, "record the CUDA allocator for N steps and dump a snapshot for pytorch.org/memory_viz (0 = off)",
                              allowed=Range(0, 1000))

    def __post_init__(self) -> None:
        self.prompts = tuple(self.prompts) if isinstance(self.prompts, (list, tuple)) else self.prompts
        problems = [p for f in dataclasses.fields(self) if (p := _field_problem(f, getattr(self, f.name)))]
        if not problems:  # the checks across fields assume each field is sound on its own
            problems += self._relation_problems()
        if not problems:
            try:
                self.model_config()
            except ValueError as e:
                problems.append(str(e).replace("mlp_internal_dim_multiplier", "mlp_mult"))
        if problems:
            raise UserError("; ".join(problems))

    def _relation_problems(self) -> list[str]:
        """Values that are wrong in combination, or in ways a range cannot say."""
        problems = []
        if self.run_name is not None and (problem := _run_name_problem(self.run_name)):
            problems.append(problem)
        if not self.out_dir.strip():
            problems.append("--out_dir is empty; pass a directory such as runs")
        prompts = self.prompts
        if not isinstance(prompts, tuple) or not prompts or any(not isinstance(p, str) or not p for p in prompts):
            problems.append("--prompts must be one or more non-empty strings")
        if self.on_spike == "skip" and self.dtype == "float16":
            problems.append("--on_spike skip cannot be used with --dtype float16 (the GradScaler decides which "
                            "updates to skip); use --on_spike warn, or --dtype bfloat16")
        if 0 < self.nvml_interval < NVML_MIN_INTERVAL_S:
            problems.append(f"--nvml_interval must be 0 (off) or at least {NVML_MIN_INTERVAL_S} s "
                            f"(got {self.nvml_interval})")
        if self.lr_schedule != "constant" and self.min_lr > self.lr:
            problems.append(f"--min_lr {self.min_lr:g} is above --lr {self.lr:g}: the {self.lr_schedule} schedule "
                            f"would raise the learning rate; pass --min_lr <= --lr")
        project = self.wandb_project
        if not project or len(project) > 128 or any(c in project for c in WANDB_PROJECT_FORBIDDEN):
            problems.append(f"--wandb_project {project!r} is not a W&B project name: 1 to 128 "
                            f"characters, none of {' '.join(WANDB_PROJECT_FORBIDDEN)}")
        if self.wandb_entity is not None and not self.wandb_entity.strip():
            problems.append("--wandb_entity is empty; pass a W&B team or user name, or leave the flag out")
        return problems

    def model_config(self) -> BDHConfig:
        return BDHConfig(n_layer=self.n_layer, n_embd=self.n_embd, n_head=self.n_head,
                         mlp_internal_dim_multiplier=self.mlp_mult, dropout=self.dropout,
                         vocab_size=self.vocab_size)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def field_choices(name: str) -> tuple[str, ...]:
    return next(f.metadata.get("choices", ()) for f in dataclasses.fields(RunConfig) if f.name == name)


def _field_problem(f: dataclasses.Field, value: Any) -> str | None:
    """What is wrong with one field's value on its own (type, finiteness, range, choices), or None.

    The flags parse to the right types, but a RunConfig also comes from a resumed checkpoint's
    saved config and from code, so the types are checked here too."""
    flag, kind = f"--{f.name}", str(f.type)
    if value is None:
        return None if kind.endswith("| None") else f"{flag} must be given"
    if kind.startswith("int"):
        if isinstance(value, bool) or not isinstance(value, int):
            return f"{flag} must be an integer (got {value!r})"
    elif kind.startswith("float"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"{flag} must be a number (got {value!r})"
        if not math.isfinite(value):
            return f"{flag} must be a finite number (got {value})"
    elif kind.startswith("bool"):
        if not isinstance(value, bool):
            return f"{flag} must be true or false (got {value!r})"
    elif kind.startswith("str"):
        if not isinstance(value, str):
            return f"{flag} must be text (got {value!r})"
        if "\0" in value:  # no path or name can hold one; the OS would raise mid-run
            return f"{flag} contains a NUL character; remove it"
    allowed = f.metadata.get("allowed")
    if allowed is not None and value not in allowed:
        return f"{flag} must be {allowed} (got {value})"
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        return f"{flag} must be one of {', '.join(choices)} (got {value!r})"
    return None


def _run_name_problem(name: str) -> str | None:
    """The run directory is out_dir/run_name: a name that is not exactly one directory name would
    write somewhere else (out_dir itself, its parent, a nested path) or fail half-way through."""
    fix = "pass one plain directory name such as lr3e-3"
    if not name.strip():
        return "--run_name is empty; pass a name such as lr3e-3, or leave the flag out for a date-time name"
    if name in (".", ".."):
        return f"--run_name {name!r} names --out_dir itself or its parent, not a run directory in it; {fix}"
    separator = next((s for s in ("/", os.sep, os.altsep) if s and s in name), None)
    if separator is not None:
        return f"--run_name {name!r} contains {separator!r}; {fix} (parent directories go in --out_dir)"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return f"--run_name {name!r} contains a control character; {fix}"
    if name != name.strip():
        return f"--run_name {name!r} starts or ends with white space; pass {name.strip()!r}"
    size = len(name.encode("utf-8", "surrogateescape"))
    if size > MAX_NAME_BYTES:
        return f"--run_name is {size} bytes long; a directory name holds at most {MAX_NAME_BYTES}: pass a shorter one"
    return None


def default_run_name() -> str:
    return datetime.datetime.now().strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


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
