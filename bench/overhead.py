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
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # bench/ is not a package

import torch  # noqa: E402
from common import (  # noqa: E402
    BareLoop, bench_config, command_line, configure_device, corpus_file, emit_json, interleaved,
    machine_info, machine_line, median, print_report, ratio_table, save_result, timed_once,
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
        while self.step < config.log_freq or len(self.trainer.buffer) != config.log_train_freq - 1:
            self.steps(1)
            taken += 1
        return taken

    def settle(self) -> None:
        self.trainer.logger.flush()  # normally already idle: the last flush of a block is a window ago

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
    p.add_argument("--naive_hist_freq", type=int, default=100, help="naive: host histograms every N steps")
    p.add_argument("--grad_clip", type=float, default=0.0, help="clip the global grad norm (0 = off, the default)")
    p.add_argument("--no_compile", action="store_true", help="train the eager model in every variant")
    p.add_argument("--data", choices=("corpus", "random"), default="corpus",
                   help="tiny Shakespeare from ../shared/data (random bytes if missing), or random bytes")
    p.add_argument("--quick", action="store_true", help="tiny preset, one block of one window: checks the harness, no gate")
    p.add_argument("--save", action="store_true", help="file the table and JSON under bench/results/")
    args = p.parse_args(argv)
    if args.quick:
        args.preset, args.steps, args.repeats, args.warmup = "tiny", args.log_train_freq, 1, 1
    for name in ("log_train_freq", "repeats", "steps", "naive_hist_freq"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    args.steps = args.steps or 2 * args.log_train_freq
    if args.steps % args.log_train_freq:
        p.error(f"--steps ({args.steps}) must be a multiple of --log_train_freq ({args.log_train_freq}), "
                "so that every timed block holds the same number of flushes")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bdh-bench-") as tmp:
        workdir = pathlib.Path(tmp)
        data_path, data_label = corpus_file(args.data, workdir)
        try:
            config = bench_config(
                args.preset, args.device, dtype=args.dtype, data=str(data_path), compile=not args.no_compile,
                log_backend="tensorboard,jsonl", log_train_freq=args.log_train_freq, grad_clip=args.grad_clip,
                eval_freq=0, generate_freq=0, probe_freq=0, ckpt_freq=0, progress=False, max_iters=1_000_000,
                out_dir=str(workdir / "runs"), run_name="full")
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


if __name__ == "__main__":
    sys.exit(main())
