"""Training-step throughput, torch.compile'd vs eager, on the same config.

Two BareLoops (bench/common.py: the Trainer's math, no telemetry) with identical init, each with its
own fused AdamW and its own copy of the same batch stream; one trains `torch.compile(model,
dynamic=False)`. The first compiled step (compilation included) is timed apart and reported as
compile_s; then both warm up and run interleaved blocks of --steps steps. tokens/s = B*T / median
step time; MFU = FLOPs/token (BDH.md) * tokens/s / peak, when a peak is known (GPU table or
--peak_tflops). Target (bench/targets.py): on CPU at the small preset, compiled >= 1.3x eager, judged
with the paired per-round speedups (unresolved when they spread wider than the 0.3 margin).

    python bench/throughput.py                  # small on CPU, reference on CUDA
    python bench/throughput.py --preset tiny --repeats 3 --steps 3
    python bench/throughput.py --quick          # tiny, 1 repeat of 2 steps: the harness works
    python bench/throughput.py --save           # also file bench/results/<date>-<machine>-throughput.md|json

The last stdout line is one JSON object (see `record` below).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # bench/ is not a package

from common import (  # noqa: E402
    BareLoop, bench_config, bench_parser, configure_device, corpus_file, finish, interleaved, judge, machine_info,
    median, paired_ratio, ratio_table, span, timed_once,
)

from bdh_fast.errors import UserError  # noqa: E402
from bdh_fast.telemetry.throughput import flops_per_token, peak_tflops  # noqa: E402
from bdh_fast.train import pick_device, pick_dtype  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = bench_parser(__doc__, "tiny preset, 1 repeat of 2 steps", compile=False)
    p.add_argument("--steps", type=int, default=None, help="steps per timed block (default 5 on CPU, 20 on CUDA)")
    p.add_argument("--repeats", type=int, default=None, help="timed blocks per variant (default 5 on CPU, 10 on CUDA)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per variant after the first step")
    p.add_argument("--peak_tflops", type=float, default=None, help="peak TFLOP/s for MFU (default: GPU table; none on CPU)")
    args = p.parse_args(argv)
    if args.quick:
        args.preset, args.steps, args.repeats, args.warmup = "tiny", 2, 1, 1
    for name in ("steps", "repeats"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        data_path, data_label = corpus_file(args.data)
        config = bench_config(args.preset, args.device, dtype=args.dtype, peak_tflops=args.peak_tflops,
                              log_backend="none")
        device = pick_device(config)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dtype = pick_dtype(config, device)
    on_cuda = device.type == "cuda"
    steps = args.steps or (20 if on_cuda else 5)
    repeats = args.repeats or (10 if on_cuda else 5)
    configure_device(device)
    tokens_per_step = config.batch_size * config.block_size
    info = machine_info()

    print(f"throughput: preset {config.preset} (L{config.n_layer} D{config.n_embd} H{config.n_head} "
          f"m{config.mlp_mult}, B{config.batch_size} T{config.block_size}), {device.type}, {dtype}, "
          f"{data_label}; {repeats} x {steps} steps per variant, interleaved", flush=True)
    loops = {"eager": BareLoop(config, device, dtype, data_path, compile=False),
             "compiled": BareLoop(config, device, dtype, data_path, compile=True)}
    # The first step of each: compilation for the compiled one (timed apart, not in the medians).
    first_s = {name: timed_once(loop.step, device) for name, loop in loops.items()}
    print(f"first step: compiled {first_s['compiled']:.1f} s (compilation included), "
          f"eager {first_s['eager']:.2f} s", flush=True)
    for loop in loops.values():
        loop.steps(args.warmup)
    block_s = interleaved({name: (lambda loop=loop: loop.steps(steps)) for name, loop in loops.items()},
                          repeats, warmup=0, device=device)
    step_s = {name: [t / steps for t in times] for name, times in block_s.items()}

    eager_s, compiled_s = median(step_s["eager"]), median(step_s["compiled"])
    speedup = eager_s / compiled_s
    paired = span(paired_ratio(block_s["eager"], block_s["compiled"]))
    flops = flops_per_token(config.model_config(), config.block_size)
    peak = peak_tflops(device, dtype, config.peak_tflops)
    mfu = {name: flops * tokens_per_step / median(s) / (peak * 1e12) if peak else None for name, s in step_s.items()}
    verdicts = [judge("throughput", speedup, device=device.type, preset=config.preset, paired=paired,
                      quick=args.quick)]
    extra = {name: {"speedup vs eager": f"{eager_s / median(s):.2f}x",
                    "MFU": f"{mfu[name]:.1%}" if mfu[name] is not None else "n/a"} for name, s in step_s.items()}
    table = ratio_table(step_s, "eager", tokens_per_step, extra)
    notes = [
        f"compile: first compiled step {first_s['compiled']:.1f} s (eager first step {first_s['eager']:.2f} s); "
        "not in the medians",
        f"FLOPs/token {flops / 1e6:.1f} M (BDH.md, train step); peak "
        + (f"{peak} TFLOP/s" if peak else "unknown (no MFU; pass --peak_tflops)"),
        f"paired speedups (each round's eager block over its compiled block): {paired[0]:.2f}..{paired[1]:.2f}x",
    ]
    record = {
        "bench": "throughput", "preset": config.preset, "device": device.type, "dtype": dtype,
        "batch_size": config.batch_size, "block_size": config.block_size, "tokens_per_step": tokens_per_step,
        "steps": steps, "repeats": repeats, "data": data_label,
        "eager_ms": eager_s * 1e3, "compiled_ms": compiled_s * 1e3,
        "eager_tokens_per_s": tokens_per_step / eager_s, "compiled_tokens_per_s": tokens_per_step / compiled_s,
        "speedup": speedup, "paired_speedup_range": paired, "compile_s": first_s["compiled"], "mfu": mfu["compiled"],
        "mfu_eager": mfu["eager"], "verdict": verdicts[0]["verdict"], "verdicts": verdicts, "quick": args.quick,
        "machine": info,
    }
    title = f"throughput: compiled vs eager, preset {config.preset}, {device.type}, {dtype}"
    return finish(args, "throughput", title, table, notes, record, info)


if __name__ == "__main__":
    sys.exit(main())
