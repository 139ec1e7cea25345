"""What evaluation, samples and probes cost, and on-device histograms vs TensorBoard's add_histogram.

    python bench/probes.py [--preset small|reference] [--device auto|cpu|cuda] [--quick] [--save]

1. Amortized cost: the real Trainer at the preset with the default cadences (--eval_freq,
   --eval_iters, --generate_freq, --probe_freq from RunConfig). Median time of a plain training step,
   of one evaluation, one round of samples and one probe (its extra work inside the step plus the
   collection), each measured interleaved; amortized cost = sum(cost / frequency) / step time.
   Target: <= 2% of run time on a GPU at the reference preset.
2. Histograms of every parameter at the reference preset (25.3M values, 5 tensors): the fused
   on-device `tensor_stats` op + add_histogram_raw vs SummaryWriter.add_histogram on the same
   tensors, interleaved. Target: >= 10x faster on CPU.

The last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is not a package

from common import (corpus_file, emit_json, interleaved, machine_info, machine_line,  # noqa: E402
                    markdown_table, median, save_result, timed_once)

from bdh_fast.config import RunConfig  # noqa: E402
from bdh_fast.model import BDH, BDHConfig  # noqa: E402
from bdh_fast.ops import STATS_SIZE, tensor_stats  # noqa: E402
from bdh_fast.telemetry.backends import Histogram  # noqa: E402
from bdh_fast.train import Trainer, pick_device  # noqa: E402

from common import bench_config  # noqa: E402


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
    table = markdown_table(["method", "median ms (5 tensors, 25.3M values)", "speedup"],
                           [["tensor_stats + add_histogram_raw", f"{a * 1e3:.1f}", f"{b / a:.1f}x"],
                            ["SummaryWriter.add_histogram", f"{b * 1e3:.1f}", "1.0x"]])
    return table, {"fused_ms": a * 1e3, "add_histogram_ms": b * 1e3, "histogram_speedup": b / a}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default=None, help="default: small on CPU, reference on CUDA")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no_compile", action="store_true")
    parser.add_argument("--quick", action="store_true", help="tiny preset, 2 repeats: the harness works")
    parser.add_argument("--save", action="store_true")
    args = parser.parse_args()
    preset, repeats = ("tiny", 2) if args.quick else (args.preset, args.repeats)
    info = machine_info()
    with tempfile.TemporaryDirectory(prefix="bdh-probes-") as tmp:
        workdir = Path(tmp)
        data, data_label = corpus_file("corpus", workdir)
        config = bench_config(preset, args.device, data=str(data), out_dir=str(workdir / "runs"),
                              run_name="amortized", progress=False, compile=not args.no_compile,
                              log_backend="tensorboard,jsonl", ckpt_freq=0, max_iters=10**6)
        device = pick_device(config)
        amortized_table, amortized_record = amortized(config, repeats)
        hist_table, hist_record = histograms(device, 2 if args.quick else repeats, workdir)
    text = (f"# Evaluation, samples and probes: cost\n\n{machine_line(info)}\n\n"
            f"## Amortized cost at the default cadences (preset {config.preset}, {data_label})\n\n"
            f"{amortized_table}\n\nTarget: <= 2% on a GPU at the reference preset.\n\n"
            f"## Histograms of every parameter at the reference size, on {device.type}\n\n{hist_table}\n\n"
            f"Target: >= 10x on CPU.\n")
    print(text)
    record = {"bench": "probes", "preset": config.preset, "device": device.type, **amortized_record,
              **hist_record, "machine": info}
    if args.save:
        save_result("probes", text, record)
    emit_json(record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
