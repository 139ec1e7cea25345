"""What the telemetry costs: the same training loop bare, with bdh_fast's telemetry, and seed-style
(the design card: "overhead stays under 5%", our goal under 1%); then the launch-bound rows.

Four variants, same config and seed, each its own model instance, optimizer and copy of the same
batch stream. Each instance is torch.compile'd, but dynamo's guards do not key on the module
instance, so the variants share compiled graphs (the same kernels: full's forward, which also yields
BDH's neuron statistics, is a second graph) and the first variant to run a graph carries its
compilation; every first step is timed apart, outside the medians:

  bare   BareLoop (bench/common.py): the Trainer's math (fused AdamW, LR schedule, autocast), no
         telemetry, no host read.
  full   the real bdh_fast.train.Trainer at its telemetry defaults (on-device StepBuffer, fused grad
         norms, StepTimer, TensorBoard + JSONL through the Logger's writer, flush every
         --log_train_freq steps; --metrics standard, its default), driven step by step through
         Trainer.run_step, the body of Trainer.fit's loop.
  full-neurons  full without every step's neuron statistics (the model's channel off, the loop's
         forward that of bare): full against it is the row neuron_stats_overhead_pct.
  naive  what a typical research script does: loss.item() and p.grad.norm().item() per parameter
         every step, SummaryWriter.add_scalar per metric per step on the training thread, and
         add_histogram of every parameter (copied to the host) every --naive_hist_freq steps.

Blocks of --steps steps run interleaved (bare, full, naive, bare, ...); per-step time = block time /
steps; overhead % = (median_variant / median_bare - 1) * 100, with the paired range (each round's
variant block against the bare block of the same round). Verdicts come from bench/targets.py:
a paired range wider than the target is "unresolved", whatever the median says.

Then the launch-bound rows (bench/launch_bound.py): writer_overhead_pct, what the Logger's writer
(TensorBoard + JSONL) costs a thread dispatching ~4,000 tiny ops per 10-step window, and
telemetry_launches_per_step, the kernel launches the telemetry adds per step, as
bdh_fast.telemetry.launches counts them (null when the package has no counter).

    python bench/overhead.py                  # small on CPU, reference on CUDA
    python bench/overhead.py --quick          # tiny, one block of one window: checks the harness, no gate
    python bench/overhead.py --writer_only    # only the launch-bound rows (seconds)
    python bench/overhead.py --save           # also file bench/results/<date>-<machine>-overhead.md|json
    python bench/overhead.py --matrix         # one row per telemetry setting (bench/overhead_matrix.py)

The last stdout line is one JSON object (see `record` below), with writer_overhead_pct and
telemetry_launches_per_step in every mode but --matrix.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # bench/ is not a package

import torch  # noqa: E402
from common import (  # noqa: E402
    BareLoop, bench_config, bench_parser, configure_device, corpus_file, finish, interleaved, judge,
    machine_info, median, paired_pct, ratio_table, span, timed_once,
)
from launch_bound import neuron_stats_launches, telemetry_launches, writer_row  # noqa: E402

from bdh_fast.config import RunConfig  # noqa: E402
from bdh_fast.errors import UserError  # noqa: E402
from bdh_fast.train import Trainer, pick_device, pick_dtype  # noqa: E402

# The target that judges `full` in each setup (bench/targets.py); elsewhere the design card's 5%.
FULL_TARGETS = {("cpu", "small"): "overhead_cpu", ("cuda", "reference"): "overhead_reference",
                ("cuda", "small"): "overhead_launch_bound"}


def full_target(device: str, preset: str) -> str:
    return FULL_TARGETS.get((device, preset), "overhead_full")


@contextlib.contextmanager
def quiet():
    """The Trainer's console output (announce line, `Step: ...` lines) goes to /dev/null: printed,
    so its cost is kept, but not shown."""
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        yield


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
    def __init__(self, config: RunConfig, neuron_stats: bool = True):
        with quiet():
            self.trainer = Trainer(config, None)
        self.trainer.telemetry.neuron_stats &= neuron_stats  # off: the loop's forward leaves the channel off
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
    p = bench_parser(__doc__, "tiny preset, one block of one window, a short writer row")
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
    p.add_argument("--writer_only", action="store_true",
                   help="only the launch-bound rows: the writer row and the counted launches (no model timing)")
    p.add_argument("--no_launch_rows", action="store_true",
                   help="skip the launch-bound rows (their JSON keys are null, with the reason)")
    p.add_argument("--writer_windows", type=int, default=10, help="writer row: 10-step windows per timed block")
    p.add_argument("--writer_repeats", type=int, default=15, help="writer row: timed blocks per variant")
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
        args.writer_windows, args.writer_repeats = 3, 3
        args.no_ranges = args.no_ranges or args.matrix  # --matrix --quick: the harness only
    for name in ("log_train_freq", "repeats", "steps", "naive_hist_freq", "log_freq", "writer_windows",
                 "writer_repeats"):
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
        from overhead_matrix import matrix_main

        return matrix_main(args)
    with tempfile.TemporaryDirectory(prefix="bdh-bench-") as tmp:
        workdir = pathlib.Path(tmp)
        try:
            data_path, data_label = corpus_file(args.data)
            if args.writer_only:
                return run_writer_only(args, workdir)
            config = bench_config(
                args.preset, args.device, dtype=args.dtype, data=str(data_path), compile=args.compile,
                log_backend="tensorboard,jsonl", log_train_freq=args.log_train_freq, grad_clip=args.grad_clip,
                eval_freq=0, generate_freq=0, probe_freq=0, ckpt_freq=0, progress=False, max_iters=1_000_000,
                out_dir=str(workdir / "runs"), run_name="full",
                **({"log_freq": args.log_freq} if args.log_freq is not None else {}))
            device = pick_device(config)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return run(args, config, device, data_path, data_label, workdir)


def launch_bound_rows(args: argparse.Namespace, workdir: pathlib.Path, device: str, preset: str | None
                      ) -> tuple[dict, list[dict], list[str]]:
    """The writer row and the counted launches: (record fields, verdicts, notes)."""
    if args.no_launch_rows:
        why = "not measured (--no_launch_rows)"
        return ({"writer_overhead_pct": None, "writer_paired_range_pct": None, "writer_note": why,
                 "telemetry_launches_per_step": None, "telemetry_launches_note": why}, [], [f"launch-bound rows: {why}"])
    print(f"writer row: {args.writer_repeats} x {args.writer_windows} windows per variant, interleaved", flush=True)
    row = writer_row(workdir, windows=args.writer_windows, repeats=args.writer_repeats)
    launches = telemetry_launches()
    verdicts = [
        judge("writer", row["writer_overhead_pct"], paired=row["writer_paired_range_pct"], quick=args.quick),
        judge("launches", launches["telemetry_launches_per_step"], device=device, preset=preset, quick=args.quick),
    ]
    spec = row["writer_row"]
    notes = [
        f"writer row: a thread dispatching {spec['ops_per_window']:,} tiny ops per {spec['window_steps']}-step window "
        f"({row['writer_launch_ms_per_step']:.2f} ms/step alone, {row['writer_logged_ms_per_step']:.2f} with the "
        f"Logger), {spec['metrics_per_step']} metrics per step handed to a bdh_fast.logger.Logger "
        f"({spec['backends']}) at each window's start; {spec['flush']}; median wait "
        + (f"{row['writer_backlog_ms']:.1f} ms" if row["writer_backlog_ms"] is not None else "n/a")
        + ("" if row["writer_thread_overhead_pct"] is None else
           f"; for comparison, Logger(writer='thread'): {row['writer_thread_overhead_pct']:+.1f}% (paired "
           f"{row['writer_thread_paired_range_pct'][0]:+.1f}..{row['writer_thread_paired_range_pct'][1]:+.1f}%)"),
        "telemetry launches per step: " + launches["telemetry_launches_note"],
    ]
    return {**row, **launches}, verdicts, notes


def run_writer_only(args: argparse.Namespace, workdir: pathlib.Path) -> int:
    info = machine_info()
    fields, verdicts, notes = launch_bound_rows(args, workdir, "cpu", None)
    record = {"bench": "overhead", "mode": "writer_only", **fields, "verdicts": verdicts, "quick": args.quick,
              "machine": info}
    return finish(args, "overhead-writer", "overhead: the launch-bound rows", "", notes, record, info)


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

    # The launch-bound rows first, before the three variants fill the process and the cores.
    launch_fields, launch_verdicts, launch_notes = launch_bound_rows(args, workdir, device.type, config.preset)
    variants = {"bare": Bare(config, device, dtype, data_path), "full": Full(config),
                "full-neurons": Full(dataclasses.replace(config, run_name="full-neurons"), neuron_stats=False),
                "naive": Naive(config, device, dtype, data_path, workdir / "naive", args.naive_hist_freq)}
    try:
        first_s = {name: timed_once(v.first_step, device) for name, v in variants.items()}
        print("first step (compilation included, not in the medians): "
              + ", ".join(f"{name} {s:.1f} s" for name, s in first_s.items()), flush=True)
        for v in variants.values():
            v.steps(args.warmup)
        aligned = variants["full"].align()
        variants["full-neurons"].align()
        block_s = interleaved({name: (lambda v=v: v.steps(args.steps)) for name, v in variants.items()},
                              repeats, warmup=0, device=device,
                              settle={name: v.settle for name, v in variants.items()})
        ranges_ms = telemetry_ranges_ms(variants["full"], args.steps)
    finally:
        for v in variants.values():
            v.close()
    neuron_launches = neuron_stats_launches(config, device.type)  # counted: robust to the machine's noise
    # The full variant really logged: every step it ran reached metrics.jsonl through the Logger.
    jsonl = variants["full"].trainer.run_dir / "metrics.jsonl"
    logged = sum('"train/loss"' in line for line in jsonl.read_text().splitlines()) if jsonl.exists() else 0

    step_s = {name: [t / args.steps for t in times] for name, times in block_s.items()}
    ms = {name: median(s) * 1e3 for name, s in step_s.items()}
    pct = {name: (ms[name] / ms["bare"] - 1) * 100 for name in ms}
    paired = {name: span(paired_pct(block_s[name], block_s["bare"])) for name in ("full", "full-neurons", "naive")}
    target = full_target(device.type, config.preset)
    verdicts = [judge(target, pct["full"], device=device.type, preset=config.preset, paired=paired["full"],
                      quick=args.quick)]
    # The neuron statistics' own row: full against full without them, paired per round.
    neuron_pct = (ms["full"] / ms["full-neurons"] - 1) * 100
    neuron_paired = span(paired_pct(block_s["full"], block_s["full-neurons"]))
    neuron_target = "neuron_stats_reference" if device.type == "cuda" else "neuron_stats"
    verdicts.append(judge(neuron_target, neuron_pct, device=device.type, preset=config.preset, paired=neuron_paired,
                          quick=args.quick))
    verdicts += launch_verdicts
    judged = {"full": verdicts[0],
              "full-neurons": judge("overhead_full", pct["full-neurons"], paired=paired["full-neurons"],
                                    quick=args.quick),
              "naive": judge("overhead_full", pct["naive"], paired=paired["naive"], quick=args.quick)}
    extra = {name: {"overhead vs bare": "-" if name == "bare" else judged[name]["figure"],
                    "paired range": "-" if name == "bare" else f"{paired[name][0]:+.1f}..{paired[name][1]:+.1f}%",
                    "verdict": "-" if name == "bare" else judged[name]["verdict"]} for name in ms}
    table = ratio_table(step_s, "bare", tokens_per_step, extra)
    notes = [
        "first step, not in the medians: " + ", ".join(f"{name} {s:.2f} s" for name, s in first_s.items())
        + ("; the variants share compiled graphs, so bare's first step holds the compilation of the plain "
           "step, full's that of the step with the neuron statistics" if config.compile else ""),
        "verdicts (bench/targets.py): full against " + verdicts[0]["target_text"] + "; naive against the design "
        "card's 5%; a paired range wider than the target is unresolved",
        f"full: {variants['full'].step} steps in all, {aligned} of them to reach a steady flush cadence "
        f"(each timed block holds {args.steps // config.log_train_freq} flush(es)); the writer's work "
        "overlaps the block's steps, as in a real run, and is drained untimed after each block",
        f"full wrote {logged} of its {variants['full'].step} steps to metrics.jsonl (and TensorBoard)",
        f"naive: host histograms every {args.naive_hist_freq} steps ({variants['naive'].step} steps run): "
        "the median ignores those rare blocks, the mean shows them",
        "paired range: per-round overhead vs the bare block that ran in the same round (the noise)",
        f"neuron statistics: full vs full-neurons {neuron_pct:+.2f}% (paired {neuron_paired[0]:+.1f}.."
        f"{neuron_paired[1]:+.1f}%), {len(variants['full'].trainer.telemetry.buffer.names)} columns per step "
        "with them; counted, the model's forward + backward launches {without:g} without and {with:g} with them ".format(
            **neuron_launches["neuron_stats_model_launches"])
        + ("(compiled: inductor kernels)" if config.compile else "(eager: aten ops)"),
        "direct measure, robust to machine noise: the telemetry's own record_function ranges in a profiled "
        f"window of full take {sum(ranges_ms.values()):.3f} ms/step on the training thread ("
        + ", ".join(f"{k} {v:.3f}" for k, v in ranges_ms.items())
        + f") = {100 * sum(ranges_ms.values()) / ms['bare']:.2f}% of bare's median step",
        *launch_notes,
    ]
    record = {
        "bench": "overhead", "preset": config.preset, "device": device.type, "dtype": dtype,
        "compile": config.compile, "batch_size": config.batch_size, "block_size": config.block_size,
        "tokens_per_step": tokens_per_step, "steps": args.steps, "repeats": repeats,
        "log_train_freq": config.log_train_freq, "naive_hist_freq": args.naive_hist_freq, "data": data_label,
        "bare_ms": ms["bare"], "full_ms": ms["full"], "naive_ms": ms["naive"],
        "full_overhead_pct": pct["full"], "naive_overhead_pct": pct["naive"], "paired_range_pct": paired,
        "full_neurons_ms": ms["full-neurons"], "neuron_stats_overhead_pct": neuron_pct,
        "neuron_stats_paired_range_pct": neuron_paired, **neuron_launches,
        "log_freq": config.log_freq, "verdict_full": judged["full"]["verdict"],
        "verdict_naive": judged["naive"]["verdict"],
        "compile_s": first_s["bare"] if config.compile else None, "first_step_s": first_s,
        "full_steps_logged": logged, "telemetry_ranges_ms": ranges_ms,
        "telemetry_ranges_pct": 100 * sum(ranges_ms.values()) / ms["bare"], **launch_fields, "verdicts": verdicts,
        "quick": args.quick, "machine": info,
    }
    title = f"overhead: bare vs full (with and without neuron statistics) vs naive telemetry, preset {config.preset}, {device.type}, {dtype}"
    return finish(args, "overhead", title, table, notes, record, info)


if __name__ == "__main__":
    sys.exit(main())
