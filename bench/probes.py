"""What evaluation, samples and probes cost, and on-device histograms vs TensorBoard's add_histogram.

    python bench/probes.py [--preset small|reference] [--device auto|cpu|cuda] [--no-compile] [--quick] [--save]

1. Amortized cost: the real Trainer at the preset with the default cadences (--eval_freq,
   --eval_iters, --generate_freq, --probe_freq from RunConfig). Median time of a plain training step,
   of one evaluation, one round of samples and one probe (its extra work inside the step plus the
   collection), each measured interleaved; amortized cost = sum(cost / frequency) / step time.
   Target: <= 2% of run time on a GPU at the reference preset (reported elsewhere).
2. Histograms of every parameter at the reference preset (25.3M values, 5 tensors): the fused
   on-device `tensor_stats` op + add_histogram_raw vs SummaryWriter.add_histogram on the same
   tensors, interleaved, with the paired per-round speedups. Target: >= 10x faster on CPU.

Targets and verdicts: bench/targets.py. The last line of stdout is one JSON object.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is not a package

from common import (bench_config, bench_parser, corpus_file, finish, interleaved, judge,  # noqa: E402
                    machine_info, markdown_table, median, paired_ratio, span, timed_once)

from bdh_fast.config import RunConfig  # noqa: E402
from bdh_fast.errors import UserError  # noqa: E402
from bdh_fast.model import BDH, BDHConfig  # noqa: E402
from bdh_fast.ops import STATS_SIZE, tensor_stats  # noqa: E402
from bdh_fast.telemetry.backends import Histogram  # noqa: E402
from bdh_fast.train import Trainer, pick_device  # noqa: E402


def amortized(config: RunConfig, repeats: int) -> tuple[str, dict]:
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        trainer = Trainer(config, None)
    device = trainer.device
    state = {"step": 0}

    def plain_step():
        state["step"] += 1
        step = state["step"] * config.probe_freq + 1  # never a probe step
        trainer.train_step(step)
        trainer.step = step
        if len(trainer.telemetry.buffer) == config.log_train_freq:
            trainer.flush()

    def probe_step():  # a step that is a probe step, then the probe's collection
        trainer.train_step(config.probe_freq)
        trainer.flush()
        trainer.probe()

    try:
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
            for fn in (plain_step, probe_step, trainer.evaluate, trainer.log_samples):
                timed_once(fn, device)  # compilation and first-call costs, not timed
            times = interleaved({"step": plain_step, "probe step": probe_step, "eval": trainer.evaluate,
                                 "samples": trainer.log_samples}, repeats=repeats, warmup=1, device=device)
    finally:
        trainer.close()
    step_s = median(times["step"])
    costs = {"eval": (median(times["eval"]), config.eval_freq),
             "samples": (median(times["samples"]), config.generate_freq),
             "probe": (median(times["probe step"]) - step_s, config.probe_freq)}
    rows = [["training step", f"{step_s * 1e3:.1f}", "every step", ""]]
    total_pct = 0.0
    for name, (seconds, freq) in costs.items():
        pct = 100.0 * seconds / freq / step_s
        total_pct += pct
        rows.append([name, f"{seconds * 1e3:.1f}", f"every {freq} steps", f"{pct:.3f}%"])
    rows.append(["**total**", "", "", f"**{total_pct:.3f}%**"])
    table = markdown_table(["work", "median ms", "cadence", "amortized share of step time"], rows)
    return table, {"step_ms": step_s * 1e3, "eval_ms": costs["eval"][0] * 1e3,
                   "samples_ms": costs["samples"][0] * 1e3, "probe_ms": costs["probe"][0] * 1e3,
                   "amortized_pct": total_pct}


def histograms(device: torch.device, repeats: int, workdir: Path, bins: int = 64) -> tuple[str, dict]:
    from torch.utils.tensorboard import SummaryWriter

    torch.manual_seed(0)
    with device:
        params = dict(BDH(BDHConfig()).named_parameters())  # the reference preset's 25.3M values
    ours = SummaryWriter(str(workdir / "ours"))
    theirs = SummaryWriter(str(workdir / "add_histogram"))
    step = {"n": 0}

    def fused():
        step["n"] += 1
        results = [(name, tensor_stats(p.detach(), bins)) for name, p in params.items()]
        flat = torch.cat([torch.cat([s, h.double()]) for _, (s, h) in results]).tolist()  # one read
        width = STATS_SIZE + bins
        for i, (name, _) in enumerate(results):
            row = flat[i * width:(i + 1) * width]
            h = Histogram.from_stats(row[:STATS_SIZE], row[STATS_SIZE:])
            ours.add_histogram_raw(name, h.min, h.max, h.num, h.sum, h.sum_squares, h.bucket_limits,
                                   h.bucket_counts, step["n"])

    def tensorboard():
        for name, p in params.items():
            theirs.add_histogram(name, p.detach(), step["n"])

    times = interleaved({"tensor_stats + add_histogram_raw": fused, "SummaryWriter.add_histogram": tensorboard},
                        repeats=repeats, warmup=1, device=device)
    ours.close()
    theirs.close()
    a, b = median(times["tensor_stats + add_histogram_raw"]), median(times["SummaryWriter.add_histogram"])
    paired = span(paired_ratio(times["SummaryWriter.add_histogram"], times["tensor_stats + add_histogram_raw"]))
    table = markdown_table(["method", "median ms (5 tensors, 25.3M values)", "speedup"],
                           [["tensor_stats + add_histogram_raw", f"{a * 1e3:.1f}", f"{b / a:.1f}x"],
                            ["SummaryWriter.add_histogram", f"{b * 1e3:.1f}", "1.0x"]])
    return table, {"fused_ms": a * 1e3, "add_histogram_ms": b * 1e3, "histogram_speedup": b / a,
                   "histogram_paired_speedup_range": paired}


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser(__doc__, "tiny preset, 2 repeats", dtype=False)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    preset, repeats = ("tiny", 2) if args.quick else (args.preset, args.repeats)
    info = machine_info()
    with tempfile.TemporaryDirectory(prefix="bdh-probes-") as tmp:
        workdir = Path(tmp)
        try:
            data, data_label = corpus_file(args.data)
            config = bench_config(preset, args.device, data=str(data), out_dir=str(workdir / "runs"),
                                  run_name="amortized", progress=False, compile=args.compile,
                                  log_backend="tensorboard,jsonl", ckpt_freq=0, max_iters=10**6)
            device = pick_device(config)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        amortized_table, amortized_record = amortized(config, repeats)
        hist_table, hist_record = histograms(device, 2 if args.quick else repeats, workdir)
    body = (f"## Amortized cost at the default cadences (preset {config.preset}, {data_label})\n\n"
            f"{amortized_table}\n\n## Histograms of every parameter at the reference size, on {device.type}\n\n"
            f"{hist_table}")
    verdicts = [
        judge("eval_probes", amortized_record["amortized_pct"], device=device.type, preset=config.preset,
              quick=args.quick, figure=f"{amortized_record['amortized_pct']:.3f}% of step time"),
        judge("histograms", hist_record["histogram_speedup"], device=device.type, preset=config.preset,
              paired=hist_record["histogram_paired_speedup_range"], quick=args.quick),
    ]
    notes = ["amortized: per-call medians x cadence, no paired range (each cost is its own interleaved median)",
             "histograms: paired range = each round's add_histogram time over the fused path's time"]
    record = {"bench": "probes", "preset": config.preset, "device": device.type, **amortized_record,
              **hist_record, "verdicts": verdicts, "quick": args.quick, "machine": info}
    return finish(args, "probes", "Evaluation, samples and probes: cost", body, notes, record, info)


if __name__ == "__main__":
    sys.exit(main())
