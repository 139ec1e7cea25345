"""What the telemetry costs: the same training loop bare, with bdh_fast's telemetry, and seed-style
(tracker issue 3, section 6; the design card's "overhead stays under 5%", our goal under 1%).

Three variants, same config and seed, each its own model instance, optimizer and copy of the same
batch stream. Each instance is torch.compile'd, but dynamo's guards do not key on the module
instance, so all three run ONE compiled graph (the same kernels) and the first variant's first
step carries the whole compilation; every first step is timed apart, outside the medians:

  bare   BareLoop (bench/common.py): the Trainer's math (fused AdamW, LR schedule, autocast), no
         telemetry, no host read.
  full   the real bdh_fast.train.Trainer at its telemetry defaults (on-device StepBuffer, fused grad
         norms, StepTimer, TensorBoard + JSONL through the background Logger, flush every
         --log_train_freq steps), driven step by step through Trainer.run_step, the body of Trainer.fit's loop.
  naive  what a typical research script does: loss.item() and p.grad.norm().item() per parameter
         every step, SummaryWriter.add_scalar per metric per step on the training thread, and
         add_histogram of every parameter (copied to the host) every --naive_hist_freq steps.

Blocks of --steps steps run interleaved (bare, full, naive, bare, ...); per-step time = block time /
steps; overhead % = (median_variant / median_bare - 1) * 100. Verdict per row: GOAL <= 1%,
PASS <= 5%, else FAIL. Targets for `full`: <= 3% on the 2-core CPU at the small preset, <= 1% on a
GPU at the reference preset.

    python bench/overhead.py                  # small on CPU, reference on CUDA
    python bench/overhead.py --quick          # tiny, one block: checks the harness, no gate
    python bench/overhead.py --save           # also file bench/results/<date>-<machine>-overhead.md|json

The last stdout line is one JSON object (see `record` below).

--matrix (tracker issue 6, section 2): what each telemetry setting costs. Rows over
--log_train_freq 1, 10, 100 (full telemetry at its defaults otherwise; log_freq rounded up to a
multiple of the row's log_train_freq, so console lines do not flush its window early), then one
feature at a time at --log_train_freq 10 on top of TensorBoard + JSONL with NVML off: backends none
(console only), jsonl, tensorboard, tensorboard,jsonl (the default), wandb (offline, under the temp
dir; skipped with the reason if it cannot start), grad_clip 1.0, probes (probe_freq = the row's
block length: one probe per timed block) and NVML (nvml_interval 2; n/a on CPU). Each row is a
`Full` variant (the real Trainer) timed against the same `bare` loop: by default every row and
bare round-robin in one `interleaved` call (--schedule all), or bare + one row at a time
(--schedule pairwise: one row's Trainer in memory at a time). Each row's block holds a whole number
of its flush windows (the log_train_freq 100 row runs blocks of 100 steps); per-step medians,
overhead % vs bare, verdict GOAL <= 1%, PASS <= 5%, else FAIL. The last stdout line is one JSON
object {"bench": "overhead_matrix", "rows": [...], ...}.

    python bench/overhead.py --matrix                 # small on CPU, reference on CUDA
    python bench/overhead.py --matrix --quick         # tiny, 10-step blocks, 1 repeat, no ranges: harness check
    python bench/overhead.py --matrix --preset reference --allow_slow   # reference on CPU: hours
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import pathlib
import re
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # bench/ is not a package

import torch  # noqa: E402
from common import (  # noqa: E402
    BareLoop, bench_config, command_line, configure_device, corpus_file, emit_json, interleaved,
    machine_info, machine_line, markdown_table, median, print_report, ratio_table, save_result, timed_once,
)

from bdh_fast.config import PRESETS, RunConfig  # noqa: E402
from bdh_fast.errors import UserError  # noqa: E402
from bdh_fast.train import Trainer, pick_device, pick_dtype  # noqa: E402

PASS_PCT, GOAL_PCT = 5.0, 1.0
TARGET_PCT = {("cpu", "small"): 3.0, ("cuda", "reference"): 1.0}  # `full`, per (device, preset)


@contextlib.contextmanager
def quiet():
    """The Trainer's console output (announce line, `Step: ...` lines) goes to /dev/null: printed,
    so its cost is kept, but not shown."""
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        yield


def verdict(pct: float) -> str:
    return "GOAL" if pct <= GOAL_PCT else "PASS" if pct <= PASS_PCT else "FAIL"


# ---------------------------------------------------------------------------------------------
# The variants: each has first_step() (compilation), steps(n), settle() (untimed), close()
# ---------------------------------------------------------------------------------------------


class Bare:
    def __init__(self, config: RunConfig, device: torch.device, dtype: str, data_path: pathlib.Path):
        self.loop = BareLoop(config, device, dtype, data_path, compile=config.compile)

    def first_step(self) -> None:
        self.loop.step()

    def steps(self, n: int) -> None:
        self.loop.steps(n)

    def settle(self) -> None:
        pass

    def close(self) -> None:
        pass


class Full:
    def __init__(self, config: RunConfig):
        with quiet():
            self.trainer = Trainer(config, None)
        self.step = self.trainer.start_step

    def first_step(self) -> None:
        self.steps(1)

    def steps(self, n: int) -> None:
        with quiet():
            for _ in range(n):
                self.step += 1
                self.trainer.run_step(self.step)

    def align(self) -> int:
        """Step on until the flush cadence is steady (past the first --log_freq console flush)
        and the next step flushes, so every timed block of k * log_train_freq steps holds exactly
        k flushes, each followed by its window's steps (over which the writer thread works, as in
        a real run). Returns the steps taken."""
        config, taken = self.trainer.config, 0
        if config.log_freq % config.log_train_freq:  # console flushes break the cadence: none is steady
            print(f"warning: log_freq {config.log_freq} is not a multiple of --log_train_freq "
                  f"{config.log_train_freq}: timed blocks will hold uneven numbers of flushes",
                  file=sys.stderr, flush=True)
            return 0
        while self.step < config.log_freq or len(self.trainer.telemetry.buffer) != config.log_train_freq - 1:
            self.steps(1)
            taken += 1
        return taken

    def settle(self) -> None:
        self.trainer.telemetry.logger.flush()  # normally already idle: the last flush of a block is a window ago

    def close(self) -> None:
        with quiet():
            self.trainer.close()


class Naive:
    """A seed-style loop: host reads and logging calls inside the step, on the training thread."""

    def __init__(self, config: RunConfig, device: torch.device, dtype: str, data_path: pathlib.Path,
                 log_dir: pathlib.Path, hist_freq: int):
        from torch.utils.tensorboard import SummaryWriter

        self.loop = BareLoop(config, device, dtype, data_path, compile=config.compile)
        self.config = config
        self.hist_freq = hist_freq
        self.tokens_per_step = config.batch_size * config.block_size
        self.writer = SummaryWriter(log_dir=str(log_dir))
        self.step = 0
        self.losses: list[float] = []

    def one_step(self) -> None:
        self.step += 1
        t0 = time.perf_counter()
        loss = self.loop.forward_backward()
        loss_value = loss.item()  # host sync
        grad_norms = {name: p.grad.norm().item()  # one host sync per parameter
                      for name, p in self.loop.model.named_parameters() if p.grad is not None}
        if self.config.grad_clip > 0:
            total = torch.nn.utils.clip_grad_norm_(self.loop.params, self.config.grad_clip).item()
        else:
            total = math.sqrt(sum(v * v for v in grad_norms.values()))
        lr = self.loop.optimizer.param_groups[0]["lr"]
        self.loop.update()
        step_s = time.perf_counter() - t0
        self.writer.add_scalar("train/loss", loss_value, self.step)
        self.writer.add_scalar("train/lr", lr, self.step)
        self.writer.add_scalar("train/grad_norm", total, self.step)
        for name, value in grad_norms.items():
            self.writer.add_scalar(f"train/grad_norm/{name}", value, self.step)
        self.writer.add_scalar("perf/step_ms", step_s * 1e3, self.step)
        self.writer.add_scalar("perf/tokens_per_sec", self.tokens_per_step / step_s, self.step)
        if self.step % self.hist_freq == 0:
            for name, p in self.loop.model.named_parameters():
                self.writer.add_histogram(f"params/{name}", p.detach().cpu(), self.step)
        self.losses.append(loss_value)
        if self.step % self.config.log_freq == 0:
            print(f"Step: {self.step}/{self.config.max_iters} loss {sum(self.losses) / len(self.losses):.3}")
            self.losses = []

    def first_step(self) -> None:
        self.steps(1)

    def steps(self, n: int) -> None:
        with quiet():
            for _ in range(n):
                self.one_step()

    def settle(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


# ---------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=tuple(PRESETS), default=None,
                   help="model and batch preset (default: small on CPU, reference on CUDA)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="autocast dtype (auto: bfloat16 on CUDA when supported, else float32)")
    p.add_argument("--log_train_freq", type=int, default=10, help="steps buffered on device between flushes (full)")
    p.add_argument("--steps", type=int, default=None,
                   help="steps per timed block, a multiple of --log_train_freq (default 2 windows)")
    p.add_argument("--repeats", type=int, default=None, help="timed blocks per variant (default 7 on CPU, 10 on CUDA)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per variant after the first step")
    p.add_argument("--log_freq", type=int, default=None,
                   help="console line (and its flush) every N steps, a multiple of --log_train_freq (default: the "
                        "preset's); full's warm-up runs to this step first (not --matrix)")
    p.add_argument("--naive_hist_freq", type=int, default=100, help="naive: host histograms every N steps")
    p.add_argument("--grad_clip", type=float, default=0.0, help="clip the global grad norm (0 = off, the default)")
    p.add_argument("--no_compile", action="store_true", help="train the eager model in every variant")
    p.add_argument("--data", choices=("corpus", "random"), default="corpus",
                   help="the packaged tiny Shakespeare, or random bytes")
    p.add_argument("--quick", action="store_true", help="tiny preset, one block of one window: checks the harness, no gate")
    p.add_argument("--save", action="store_true", help="file the table and JSON under bench/results/")
    p.add_argument("--matrix", action="store_true",
                   help="one row per telemetry setting (log_train_freq 1/10/100, each backend, grad clip, probes, "
                        "NVML), each timed against the same bare loop")
    p.add_argument("--schedule", choices=("all", "pairwise"), default="all",
                   help="--matrix: bare and every row round-robin in one interleaved call (all), or bare + one "
                        "row at a time (pairwise: less memory)")
    p.add_argument("--no_ranges", action="store_true",
                   help="--matrix: skip each row's profiled telemetry/* ranges (the direct measure)")
    p.add_argument("--allow_slow", action="store_true", help="--matrix: allow the reference preset on CPU")
    args = p.parse_args(argv)
    if args.quick:
        args.preset, args.steps, args.repeats, args.warmup = "tiny", args.log_train_freq, 1, 1
        args.no_ranges = args.no_ranges or args.matrix  # --matrix --quick: the harness only
    for name in ("log_train_freq", "repeats", "steps", "naive_hist_freq", "log_freq"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    args.steps = args.steps or 2 * args.log_train_freq
    if args.steps % args.log_train_freq:
        p.error(f"--steps ({args.steps}) must be a multiple of --log_train_freq ({args.log_train_freq}), "
                "so that every timed block holds the same number of flushes")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.matrix:
        return matrix_main(args)
    with tempfile.TemporaryDirectory(prefix="bdh-bench-") as tmp:
        workdir = pathlib.Path(tmp)
        data_path, data_label = corpus_file(args.data, workdir)
        try:
            config = bench_config(
                args.preset, args.device, dtype=args.dtype, data=str(data_path), compile=not args.no_compile,
                log_backend="tensorboard,jsonl", log_train_freq=args.log_train_freq, grad_clip=args.grad_clip,
                eval_freq=0, generate_freq=0, probe_freq=0, ckpt_freq=0, progress=False, max_iters=1_000_000,
                out_dir=str(workdir / "runs"), run_name="full",
                **({"log_freq": args.log_freq} if args.log_freq is not None else {}))
            device = pick_device(config)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return run(args, config, device, data_path, data_label, workdir)


def telemetry_ranges_ms(full: "Full", steps: int) -> dict[str, float]:
    """ms per step inside the Trainer's telemetry/* record_function ranges (grad norms, record,
    flush), from a torch.profiler window of `steps` steps of the full variant."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        full.steps(steps)
    full.settle()
    totals = {e.key: e.cpu_time_total for e in prof.key_averages() if e.key.startswith("telemetry/")}
    return {name: us / 1e3 / steps for name, us in sorted(totals.items())}


def run(args, config: RunConfig, device: torch.device, data_path: pathlib.Path, data_label: str,
        workdir: pathlib.Path) -> int:
    dtype = pick_dtype(config, device)
    repeats = args.repeats or (10 if device.type == "cuda" else 7)
    tokens_per_step = config.batch_size * config.block_size
    configure_device(device)
    info = machine_info()
    print(f"overhead: preset {config.preset} (L{config.n_layer} D{config.n_embd} H{config.n_head} "
          f"m{config.mlp_mult}, B{config.batch_size} T{config.block_size}), {device.type}, {dtype}, "
          f"compile {'on' if config.compile else 'off'}, log_train_freq {config.log_train_freq}, {data_label}; "
          f"{repeats} x {args.steps} steps per variant, interleaved", flush=True)

    variants = {"bare": Bare(config, device, dtype, data_path), "full": Full(config),
                "naive": Naive(config, device, dtype, data_path, workdir / "naive", args.naive_hist_freq)}
    try:
        first_s = {name: timed_once(v.first_step, device) for name, v in variants.items()}
        print("first step (compilation included, not in the medians): "
              + ", ".join(f"{name} {s:.1f} s" for name, s in first_s.items()), flush=True)
        for v in variants.values():
            v.steps(args.warmup)
        aligned = variants["full"].align()
        block_s = interleaved({name: (lambda v=v: v.steps(args.steps)) for name, v in variants.items()},
                              repeats, warmup=0, device=device,
                              settle={name: v.settle for name, v in variants.items()})
        ranges_ms = telemetry_ranges_ms(variants["full"], args.steps)
    finally:
        for v in variants.values():
            v.close()
    # The full variant really logged: every step it ran reached metrics.jsonl through the Logger.
    jsonl = variants["full"].trainer.run_dir / "metrics.jsonl"
    logged = sum('"train/loss"' in line for line in jsonl.read_text().splitlines()) if jsonl.exists() else 0

    step_s = {name: [t / args.steps for t in times] for name, times in block_s.items()}
    ms = {name: median(s) * 1e3 for name, s in step_s.items()}
    pct = {name: (ms[name] / ms["bare"] - 1) * 100 for name in ms}
    paired = {name: [(a / b - 1) * 100 for a, b in zip(block_s[name], block_s["bare"])] for name in ms}
    target = TARGET_PCT.get((device.type, config.preset))
    extra = {name: {"overhead vs bare": "-" if name == "bare" else f"{pct[name]:+.2f}%",
                    "paired range": "-" if name == "bare" else f"{min(paired[name]):+.1f}..{max(paired[name]):+.1f}%",
                    "verdict": "-" if name == "bare" else verdict(pct[name])} for name in ms}
    table = ratio_table(step_s, "bare", tokens_per_step, extra)
    notes = [
        "first step, not in the medians: " + ", ".join(f"{name} {s:.2f} s" for name, s in first_s.items())
        + ("; the variants share one compiled graph, so bare's first step holds the compilation"
           if config.compile else ""),
        f"verdicts: GOAL <= {GOAL_PCT:g}%, PASS <= {PASS_PCT:g}%, else FAIL; targets for full: <= 3% on the "
        "2-core CPU at the small preset, <= 1% on a GPU at the reference preset"
        + (f"; this setup's target {target:g}%: {'MET' if pct['full'] <= target else 'MISSED'}" if target else ""),
        f"full: {variants['full'].step} steps in all, {aligned} of them to reach a steady flush cadence "
        f"(each timed block holds {args.steps // config.log_train_freq} flush(es)); the writer thread's work "
        "overlaps the block's steps, as in a real run, and is drained untimed after each block",
        f"full wrote {logged} of its {variants['full'].step} steps to metrics.jsonl (and TensorBoard)",
        f"naive: host histograms every {args.naive_hist_freq} steps ({variants['naive'].step} steps run): "
        "the median ignores those rare blocks, the mean shows them",
        "paired range: per-round overhead vs the bare block that ran in the same round (noise indicator)",
        "direct measure, robust to machine noise: the telemetry's own record_function ranges in a profiled "
        f"window of full take {sum(ranges_ms.values()):.3f} ms/step on the training thread ("
        + ", ".join(f"{k} {v:.3f}" for k, v in ranges_ms.items())
        + f") = {100 * sum(ranges_ms.values()) / ms['bare']:.2f}% of bare's median step",
    ]
    if args.quick:
        notes.append("quick run: harness check only, no gate")
    print_report(table, notes, info)

    record = {
        "bench": "overhead", "preset": config.preset, "device": device.type, "dtype": dtype,
        "compile": config.compile, "batch_size": config.batch_size, "block_size": config.block_size,
        "tokens_per_step": tokens_per_step, "steps": args.steps, "repeats": repeats,
        "log_train_freq": config.log_train_freq, "naive_hist_freq": args.naive_hist_freq, "data": data_label,
        "bare_ms": ms["bare"], "full_ms": ms["full"], "naive_ms": ms["naive"],
        "full_overhead_pct": pct["full"], "naive_overhead_pct": pct["naive"],
        "paired_range_pct": {name: [min(paired[name]), max(paired[name])] for name in ("full", "naive")},
        "log_freq": config.log_freq,
        "verdict_full": verdict(pct["full"]), "verdict_naive": verdict(pct["naive"]),
        "target_full_pct": target, "target_met": None if target is None else pct["full"] <= target,
        "compile_s": first_s["bare"] if config.compile else None, "first_step_s": first_s,
        "full_steps_logged": logged, "telemetry_ranges_ms": ranges_ms,
        "telemetry_ranges_pct": 100 * sum(ranges_ms.values()) / ms["bare"], "quick": args.quick, "machine": info,
    }
    if args.save:
        text = "\n".join([f"# overhead: bare vs full vs naive telemetry, preset {config.preset}, {device.type}, {dtype}",
                          "", f"`{command_line()}`", "", table, "", *(f"- {line}" for line in notes),
                          f"- machine: {machine_line(info)}"])
        for path in save_result("overhead", text, record):
            print(f"saved {path}")
    emit_json(record)
    return 0



# ---------------------------------------------------------------------------------------------
# --matrix: one row per telemetry setting, each against the same bare loop
# ---------------------------------------------------------------------------------------------

MATRIX_LOG_TRAIN_FREQS = (1, 10, 100)
MATRIX_BACKENDS = ("none", "jsonl", "tensorboard", "tensorboard,jsonl", "wandb")
MATRIX_CLIP = 1.0
MATRIX_NVML_S = 2.0
DEFAULTS = {"log_backend": "tensorboard,jsonl", "grad_clip": 0.0, "probe_freq": 0, "nvml_interval": 2.0}


def matrix_rows(args: argparse.Namespace, preset_log_freq: int) -> list[dict]:
    """The rows: name, the RunConfig fields that make the row, and its block length (a whole number
    of its flush windows). Every row shares eval/samples/checkpoints off, like the default `full`."""
    rows = []

    def add(name: str, ltf: int, **fields) -> None:
        steps = -(-args.steps // ltf) * ltf  # args.steps rounded up to a multiple of ltf
        fields = {**DEFAULTS, "grad_clip": args.grad_clip, **fields, "log_train_freq": ltf,
                  "log_freq": -(-preset_log_freq // ltf) * ltf}
        if fields.pop("probe_per_block", False):
            fields["probe_freq"] = steps
        rows.append({"row": name, "fields": fields, "steps": steps})

    for ltf in MATRIX_LOG_TRAIN_FREQS:
        add(f"log_train_freq {ltf}", ltf)
    ltf = args.log_train_freq
    for backend in MATRIX_BACKENDS:
        add(f"backend {backend}" + (" (default)" if backend == DEFAULTS["log_backend"] else ""), ltf,
            log_backend=backend, nvml_interval=0.0)
    add(f"grad_clip {MATRIX_CLIP:g}", ltf, nvml_interval=0.0, grad_clip=MATRIX_CLIP)
    add("probes", ltf, nvml_interval=0.0, probe_per_block=True)
    add(f"nvml {MATRIX_NVML_S:g} s", ltf, nvml_interval=MATRIX_NVML_S)
    return rows


def settings_text(fields: dict, device: torch.device) -> str:
    nvml = fields["nvml_interval"]
    return (f"ltf {fields['log_train_freq']}, log_freq {fields['log_freq']}, {fields['log_backend']}, "
            f"clip {fields['grad_clip']:g}, probe_freq {fields['probe_freq'] or 'off'}, "
            f"nvml {f'{nvml:g} s' if nvml else 'off'}{' (inactive on CPU)' if nvml and device.type == 'cpu' else ''}")


def build_row(row: dict, base: dict, device: torch.device, workdir: pathlib.Path) -> "Full | None":
    """The row's Full variant, or None with row["status"] / row["reason"] set (skipped, n/a)."""
    fields = row["fields"]
    if row["row"].startswith("nvml") and device.type != "cuda":
        row.update(status="n/a", reason="n/a on CPU (NVML samples GPUs only)")
        return None
    if "wandb" in fields["log_backend"]:
        (workdir / "wandb").mkdir(exist_ok=True)
        os.environ["WANDB_DIR"] = str(workdir / "wandb")
        os.environ["WANDB_SILENT"] = "true"
        fields = {**fields, "wandb_mode": "offline"}
    err = io.StringIO()
    try:
        config = bench_config(**base, **fields, run_name=re.sub(r"[^a-z0-9]+", "-", row["row"].lower()).strip("-"))
        with contextlib.redirect_stderr(err):
            full = Full(config)
    except Exception as e:  # noqa: BLE001 - a row that cannot start is reported, not fatal
        row.update(status="skipped", reason=f"{type(e).__name__}: {e}".splitlines()[0][:200])
        return None
    failed = list(getattr(full.trainer.telemetry.logger, "failed", []))
    if failed:
        lines = [line for line in err.getvalue().splitlines() if "could not start" in line] or [f"{failed} failed"]
        full.close()
        row.update(status="skipped", reason=lines[0].removeprefix("warning: ")[:200])
        return None
    sys.stderr.write(err.getvalue())
    row["status"] = "ok"
    return full


def prepare_row(full: "Full", row: dict, warmup: int, device: torch.device) -> None:
    """First step (compilation, apart), warm-up, steady flush cadence, then one untimed block (a
    probe row's first probe, a backend's first write, land there, not in the medians)."""
    row["first_step_s"] = timed_once(full.first_step, device)
    full.steps(warmup)
    row["aligned_steps"] = full.align()
    full.steps(row["steps"])
    full.settle()


def matrix_main(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="bdh-bench-matrix-") as tmp:
        workdir = pathlib.Path(tmp)
        data_path, data_label = corpus_file(args.data, workdir)
        base = dict(preset=args.preset, device=args.device, dtype=args.dtype, data=str(data_path),
                    compile=not args.no_compile, eval_freq=0, generate_freq=0, ckpt_freq=0, progress=False,
                    max_iters=1_000_000, out_dir=str(workdir / "runs"))
        try:
            config = bench_config(**base, log_backend="none", run_name="bare")
            device = pick_device(config)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if config.preset == "reference" and device.type == "cpu" and not args.allow_slow:
            print("error: the reference preset is for GPUs (hours per matrix on a CPU); use --preset small or tiny, "
                  "or pass --allow_slow", file=sys.stderr)
            return 2
        return run_matrix(args, config, base, device, data_path, data_label, workdir)


def run_matrix(args, config: RunConfig, base: dict, device: torch.device, data_path: pathlib.Path,
               data_label: str, workdir: pathlib.Path) -> int:
    dtype = pick_dtype(config, device)
    repeats = args.repeats or (10 if device.type == "cuda" else 7)
    configure_device(device)
    info = machine_info()
    rows = matrix_rows(args, config.log_freq)
    schedule = ("bare and every row round-robin in one interleaved call" if args.schedule == "all"
                else "bare + one row at a time (one row's Trainer in memory at a time)")
    print(f"overhead matrix: preset {config.preset} (L{config.n_layer} D{config.n_embd} H{config.n_head} "
          f"m{config.mlp_mult}, B{config.batch_size} T{config.block_size}), {device.type}, {dtype}, "
          f"compile {'on' if config.compile else 'off'}, {data_label}; {len(rows)} rows, {repeats} repeats of "
          f"{args.steps}-step blocks (whole flush windows per row); schedule: {schedule}", flush=True)

    bare = Bare(config, device, dtype, data_path)
    bare_first_s = timed_once(bare.first_step, device)
    bare.steps(args.warmup)
    bare_fn = {"bare": lambda: bare.steps(args.steps)}
    bare_s: dict[str, list[float]] = {}  # row -> bare's per-step samples it is compared with
    row_s: dict[str, list[float]] = {}

    def measure(batch: list[tuple[dict, "Full"]]) -> None:
        fns = {**bare_fn, **{row["row"]: (lambda f=full, n=row["steps"]: f.steps(n)) for row, full in batch}}
        block_s = interleaved(fns, repeats, warmup=0, device=device,
                              settle={row["row"]: full.settle for row, full in batch})
        for row, full in batch:
            bare_s[row["row"]] = [t / args.steps for t in block_s["bare"]]
            row_s[row["row"]] = [t / row["steps"] for t in block_s[row["row"]]]
            if not args.no_ranges:
                ranges = telemetry_ranges_ms(full, row["steps"])
                row["telemetry_ranges_ms"] = ranges

    def finish(row: dict, full: "Full") -> None:
        row["steps_run"] = full.step
        jsonl = full.trainer.run_dir / "metrics.jsonl"
        full.close()
        row["steps_logged"] = (sum('"train/loss"' in line for line in jsonl.read_text().splitlines())
                               if jsonl.exists() else 0)

    try:
        if args.schedule == "all":
            batch = []
            try:
                for row in rows:
                    full = build_row(row, base, device, workdir)
                    if full is not None:
                        batch.append((row, full))
                        prepare_row(full, row, args.warmup, device)
                print("first step (compilation included, not in the medians): "
                      + ", ".join([f"bare {bare_first_s:.1f} s"]
                                  + [f"{r['row']} {r['first_step_s']:.1f} s" for r, _ in batch]), flush=True)
                measure(batch)
            finally:
                for row, full in batch:
                    finish(row, full)
        else:
            for row in rows:
                full = build_row(row, base, device, workdir)
                if full is None:
                    continue
                try:
                    prepare_row(full, row, args.warmup, device)
                    measure([(row, full)])
                finally:
                    finish(row, full)
                print(f"{row['row']}: done", flush=True)
    finally:
        bare.close()

    bare_ms_all = median([t for samples in bare_s.values() for t in samples]) * 1e3 if bare_s else float("nan")
    table_rows = [["bare", "no telemetry, no host read (BareLoop)", f"{bare_ms_all:.2f}", "-", "-", "-", "-"]]
    for row in rows:
        fields = row.pop("fields")
        row["settings"] = settings_text(fields, device)
        row["config"] = fields
        if row["status"] != "ok":
            row.update(median_ms=None, bare_ms=None, overhead_pct=None, verdict=row["status"].upper())
            table_rows.append([row["row"], row["settings"], "-", "-", row["verdict"], row["reason"], "-"])
            continue
        ms, bms = median(row_s[row["row"]]) * 1e3, median(bare_s[row["row"]]) * 1e3
        paired = [(a / b - 1) * 100 for a, b in zip(row_s[row["row"]], bare_s[row["row"]])]
        pct = (ms / bms - 1) * 100
        ranges = row.get("telemetry_ranges_ms")
        row.update(median_ms=ms, bare_ms=bms, overhead_pct=pct, verdict=verdict(pct),
                   paired_range_pct=[min(paired), max(paired)], samples_ms=[t * 1e3 for t in row_s[row["row"]]],
                   telemetry_ranges_pct=100 * sum(ranges.values()) / bms if ranges is not None else None)
        table_rows.append([row["row"], row["settings"], f"{ms:.2f}", f"{pct:+.2f}%", row["verdict"],
                           f"{min(paired):+.1f}..{max(paired):+.1f}%",
                           "-" if ranges is None else f"{sum(ranges.values()):.3f} ({row['telemetry_ranges_pct']:.2f}%)"])
    table = markdown_table(["row", "settings", "median ms/step", "overhead vs bare", "verdict", "paired range",
                            "telemetry/* ranges ms/step (% of bare)"], table_rows)
    ok = [r for r in rows if r["status"] == "ok"]
    worst = max(ok, key=lambda r: r["overhead_pct"]) if ok else None
    notes = [
        f"schedule: {schedule}" + ("; overhead is against the bare samples of the same interleaved call"
                                   if args.schedule == "pairwise" else ""),
        f"verdicts: GOAL <= {GOAL_PCT:g}%, PASS <= {PASS_PCT:g}% (the seed's bar), else FAIL; "
        f"{sum(r['verdict'] in ('GOAL', 'PASS') for r in ok)}/{len(ok)} timed rows pass"
        + (f"; worst {worst['row']} {worst['overhead_pct']:+.2f}%" if worst else ""),
        f"blocks: bare {args.steps} steps; each row a whole number of its flush windows "
        "(log_train_freq 100: 100 steps); per-step time = block time / steps; first steps and one untimed "
        "block per row are outside the medians",
        "feature rows: log_train_freq " f"{args.log_train_freq}" ", TensorBoard + JSONL, NVML off, one feature changed; "
        "log_train_freq rows: full telemetry at its defaults (NVML 2 s, active on CUDA only)",
        "paired range: per-round overhead vs the bare block of the same round (noise indicator)",
    ]
    if not args.no_ranges:
        notes.append("telemetry/* ranges: the Trainer's own record_function ranges in one profiled block per row "
                     "(the direct measure, robust to machine noise)")
    if args.quick:
        notes.append("quick run: harness check only, no gate")
    print_report(table, notes, info)

    record = {
        "bench": "overhead_matrix", "preset": config.preset, "device": device.type, "dtype": dtype,
        "compile": config.compile, "batch_size": config.batch_size, "block_size": config.block_size,
        "tokens_per_step": config.batch_size * config.block_size, "steps": args.steps, "repeats": repeats,
        "schedule": args.schedule, "data": data_label, "bare_ms": bare_ms_all, "bare_first_step_s": bare_first_s,
        "pass_pct": PASS_PCT, "goal_pct": GOAL_PCT, "rows": rows,
        "timed_rows": len(ok), "passing_rows": sum(r["verdict"] in ("GOAL", "PASS") for r in ok),
        "worst_row": worst["row"] if worst else None, "worst_overhead_pct": worst["overhead_pct"] if worst else None,
        "quick": args.quick, "machine": info,
    }
    if args.save:
        text = "\n".join([f"# overhead matrix: telemetry settings vs bare, preset {config.preset}, {device.type}, "
                          f"{dtype}", "", f"`{command_line()}`", "", table, "", *(f"- {line}" for line in notes),
                          f"- machine: {machine_line(info)}"])
        for path in save_result("overhead-matrix", text, record):
            print(f"saved {path}")
    emit_json(record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
