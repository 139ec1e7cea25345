"""Fused `bdh_fast::tensor_stats` vs the unfused torch ops it replaces.

The unfused baselines compute the same numbers one op at a time: torch.aminmax, sum, sum of
squares, torch.count_nonzero and torch.histc over the aminmax range (read to the host, which
histc needs):

    fused             torch.ops.bdh_fast.tensor_stats(x, bins): two passes, no host round trip
    unfused           sum of squares as x.square().sum() (the usual idiom)
    unfused-dot       sum of squares as torch.dot(x, x) (no temporary: the fastest eager form)
    unfused-compiled  torch.compile'd reductions (inductor fuses them) + eager torch.histc

The baselines do less than the op: they let NaN/Inf poison sums, min and max instead of counting
them apart. `speedup` is against the faster of the two eager baselines (the unfused ops the fused op
replaces); `speedup_vs_compiled` against the compiled one. Variants run interleaved (A, B, C, D, A,
B, ...) after warm-up; medians are reported, with the paired per-round speedups. Target
(bench/targets.py): fused >= 2x the unfused ops at 10M fp32 elements on CPU.

    python bench/stats.py                       # 1M, 10M, 100M fp32 on CPU (and CUDA if present)
    python bench/stats.py --sizes 1e6,3e7 --repeats 9
    python bench/stats.py --quick               # small sizes, few repeats: the harness works
    python bench/stats.py --save                # also file bench/results/<date>-<machine>-stats.md|json

The last stdout line is one JSON object: speedup_cpu and speedup_cpu_vs_compiled (at 10M, or the
largest size run below it), the same for CUDA when a GPU ran, and per-size figures. On CUDA each size
also gets fraction_of_peak: the fused op's input bytes per second over the GPU's peak memory
bandwidth (NVML: 2 x max memory clock x bus width, or --peak_gb_per_s). The op reads x twice (stats,
then histogram), so 50% is its ceiling on tensors larger than the L2 cache.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time
from typing import Any, Callable

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # bench/ is not a package

from common import (bench_parser, finish, interleaved, judge, machine_info, markdown_table,  # noqa: E402
                    median, paired_ratio, span)

from bdh_fast import ops  # noqa: E402

SPEEDUP_SIZE = 10_000_000


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = bench_parser(__doc__, "sizes 1e5,1e6, 3 repeats, no compile", preset=False, dtype=False, data=False,
                     device=("auto", "cpu", "cuda"))
    p.add_argument("--sizes", default="1e6,1e7,1e8", help="comma-separated element counts (default 1e6,1e7,1e8)")
    p.add_argument("--bins", type=int, default=64)
    p.add_argument("--repeats", type=int, default=15, help="timed rounds per variant and size")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds per size")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--peak_gb_per_s", type=float, default=None,
                   help="the GPU's peak memory bandwidth in GB/s (default: from NVML)")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.repeats, args.warmup, args.compile = "1e5,1e6", 3, 1, False
    try:
        args.sizes = [int(float(s)) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        p.error(f"--sizes must be comma-separated numbers, got {args.sizes!r}")
    if not args.sizes or min(args.sizes) < 1:
        p.error("--sizes must list positive element counts")
    if args.repeats < 1 or args.warmup < 0 or args.bins < 1 or (args.threads is not None and args.threads < 1):
        p.error("--repeats, --bins and --threads must be >= 1, --warmup >= 0")
    return args


# --- the variants -----------------------------------------------------------------------------


def fused(x: torch.Tensor, bins: int):
    return torch.ops.bdh_fast.tensor_stats(x, bins)


def unfused(x: torch.Tensor, bins: int, sum_sq: Callable[[torch.Tensor], torch.Tensor]):
    lo, hi = torch.aminmax(x)
    total, squares, nonzero = x.sum(), sum_sq(x), torch.count_nonzero(x)
    hist = torch.histc(x, bins, min=lo.item(), max=hi.item())  # histc takes a host range: a sync
    return lo, hi, total, squares, nonzero, hist


def reductions(x: torch.Tensor):
    lo, hi = torch.aminmax(x)
    return lo, hi, x.sum(), x.square().sum(), torch.count_nonzero(x)


def compiled_unfused(compiled_reductions: Callable, x: torch.Tensor, bins: int):
    lo, hi, total, squares, nonzero = compiled_reductions(x)
    hist = torch.histc(x, bins, min=lo.item(), max=hi.item())  # histc in a graph would break it
    return lo, hi, total, squares, nonzero, hist


def check_agreement(x: torch.Tensor, bins: int) -> None:
    """The fused op and the baseline describe the same tensor (same min/max/count, close sums)."""
    stats = ops.stats_to_dict(fused(x, bins)[0])
    lo, hi, total, squares, nonzero, hist = unfused(x, bins, lambda t: t.square().sum())
    assert stats["min"] == lo.item() and stats["max"] == hi.item(), (stats, lo, hi)
    assert stats["nonzero"] == nonzero.item()
    l1 = x.abs().sum(dtype=torch.float64).item()
    assert abs(stats["sum"] - total.item()) <= 1e-4 * l1 + 1e-6, (stats["sum"], total.item())
    assert abs(stats["sum_sq"] - squares.item()) <= 1e-4 * stats["sum_sq"] + 1e-6
    assert int(hist.sum().item()) == x.numel()


# --- timing -----------------------------------------------------------------------------------


def bench_size(n: int, device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=gen).to(device)  # (n,) fp32, like a flattened activation tensor
    check_agreement(x, args.bins)
    fns: dict[str, Callable[[], Any]] = {
        "fused": lambda: fused(x, args.bins),
        "unfused": lambda: unfused(x, args.bins, lambda t: t.square().sum()),
        "unfused-dot": lambda: unfused(x, args.bins, lambda t: torch.dot(t, t)),
    }
    compile_s = None
    if args.compile:
        torch._dynamo.reset()
        compiled_reductions = torch.compile(reductions, dynamic=False)
        t0 = time.perf_counter()
        compiled_unfused(compiled_reductions, x, args.bins)  # first call compiles
        compile_s = time.perf_counter() - t0
        fns["unfused-compiled"] = lambda: compiled_unfused(compiled_reductions, x, args.bins)
    times = interleaved(fns, args.repeats, args.warmup, device=device)
    medians = {name: median(samples) for name, samples in times.items()}
    eager = {name: medians[name] for name in ("unfused", "unfused-dot")}
    best = min(eager, key=eager.get)
    compiled = medians.get("unfused-compiled")
    return {
        "n": n,
        "device": device.type,
        "times": times,
        "median_ms": {name: t * 1e3 for name, t in medians.items()},
        "best_baseline": best,
        "speedup": eager[best] / medians["fused"],
        "paired_speedup_range": span(paired_ratio(times[best], times["fused"])),
        "speedup_vs_compiled": compiled / medians["fused"] if compiled else None,
        "fused_gb_per_s": n * x.element_size() / medians["fused"] / 1e9,
        "compile_s": compile_s,
    }


def gpu_peak_gb_per_s() -> float | None:
    """Peak memory bandwidth of cuda:0 from NVML: 2 transfers per clock (HBM and GDDR as NVML
    reports their clocks) x max memory clock x bus width. None when NVML cannot tell."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - no library or driver: no peak
        return None
    try:
        try:  # the NVML device behind cuda:0 (CUDA_VISIBLE_DEVICES may reorder them)
            handle = pynvml.nvmlDeviceGetHandleByUUID("GPU-" + str(torch.cuda.get_device_properties(0).uuid))
        except Exception:  # noqa: BLE001
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        clock_mhz = pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_MEM)
        bus_bits = pynvml.nvmlDeviceGetMemoryBusWidth(handle)
        return 2 * clock_mhz * 1e6 * bus_bits / 8 / 1e9
    except Exception:  # noqa: BLE001
        return None
    finally:
        pynvml.nvmlShutdown()


# --- report -----------------------------------------------------------------------------------


def size_table(result: dict[str, Any]) -> str:
    fused_ms = result["median_ms"]["fused"]
    title = (f"{result['device']}, n = {result['n']:,}"
             + (f" (inductor compile {result['compile_s']:.1f} s, not timed)" if result["compile_s"] else ""))
    rows = [[name, f"{result['median_ms'][name]:.2f}", f"{min(samples) * 1e3:.2f}-{max(samples) * 1e3:.2f}",
             f"{result['median_ms'][name] / fused_ms:.2f}x"] for name, samples in result["times"].items()]
    return f"{title}\n\n" + markdown_table(["variant", "median ms", "min-max ms", "vs fused"], rows)


def summary_table(results: list[dict[str, Any]]) -> str:
    rows = [[r["device"], f"{r['n']:,}", f"{r['median_ms']['fused']:.2f}", r["best_baseline"],
             f"{r['median_ms'][r['best_baseline']]:.2f}", f"{r['speedup']:.2f}x",
             f"{r['paired_speedup_range'][0]:.2f}..{r['paired_speedup_range'][1]:.2f}x",
             f"{r['speedup_vs_compiled']:.2f}x" if r["speedup_vs_compiled"] else "-", f"{r['fused_gb_per_s']:.1f}"]
            for r in results]
    return markdown_table(["device", "n", "fused ms", "best eager", "its ms", "speedup", "paired range",
                           "vs compiled", "fused GB/s"], rows)


def headline(results: list[dict[str, Any]], device: str) -> dict[str, Any] | None:
    """The result at 10M elements, or at the largest size run below it (else the smallest)."""
    mine = sorted((r for r in results if r["device"] == device), key=lambda r: r["n"])
    if not mine:
        return None
    below = [r for r in mine if r["n"] <= SPEEDUP_SIZE]
    return below[-1] if below else mine[0]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    devices = [torch.device("cpu")] if args.device in ("auto", "cpu") else []
    if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            print("error: --device cuda but no CUDA GPU is visible; use --device cpu", file=sys.stderr)
            return 2
        devices.append(torch.device("cuda"))
    info = machine_info()
    gpu = info["gpu"]
    print(f"stats: fp32 input, bins={args.bins}, {args.repeats} interleaved rounds after {args.warmup} warm-up; "
          f"native extension: {ops.HAS_NATIVE}; speedup = the faster eager baseline median / fused median", flush=True)
    results = []
    for device in devices:
        for n in args.sizes:
            result = bench_size(n, device, args)
            results.append(result)
            print(f"{device.type}, n = {n:,}: done", flush=True)

    cpu, cuda = headline(results, "cpu"), headline(results, "cuda")
    peak = args.peak_gb_per_s if args.peak_gb_per_s else (gpu_peak_gb_per_s() if gpu else None)
    notes = []
    if peak:
        for r in results:
            if r["device"] == "cuda":
                r["fraction_of_peak"] = r["fused_gb_per_s"] / peak
                notes.append(f"cuda, n = {r['n']:,}: fused {r['fused_gb_per_s']:.0f} GB/s of input = "
                             f"{r['fraction_of_peak']:.1%} of the {peak:.0f} GB/s peak (two passes: 50% is the ceiling)")
    verdicts = []
    for head in (cpu, cuda):
        if head is not None:
            verdicts.append(judge("stats", head["speedup"], device=head["device"], paired=head["paired_speedup_range"],
                                  quick=args.quick))
            verdicts[-1]["claim"] += f" ({head['device']}, {head['n']:,} elements)"
    body = "\n\n".join([*(size_table(r) for r in results), "summary\n\n" + summary_table(results)])
    record = {
        "bench": "stats",
        "speedup_cpu": cpu["speedup"] if cpu else None,
        "speedup_cpu_vs_compiled": cpu["speedup_vs_compiled"] if cpu else None,
        "speedup_cpu_n": cpu["n"] if cpu else None,
        "per_size": [
            {"device": r["device"], "n": r["n"], "median_ms": r["median_ms"], "best_baseline": r["best_baseline"],
             "speedup": r["speedup"], "paired_speedup_range": r["paired_speedup_range"],
             "speedup_vs_compiled": r["speedup_vs_compiled"], "fused_gb_per_s": r["fused_gb_per_s"],
             "fraction_of_peak": r.get("fraction_of_peak"), "compile_s": r["compile_s"]}
            for r in results
        ],
        "peak_gb_per_s": peak,
        "peak_source": None if not peak else "--peak_gb_per_s" if args.peak_gb_per_s else "NVML",
        "bins": args.bins, "repeats": args.repeats, "threads": torch.get_num_threads(), "native": ops.HAS_NATIVE,
        "verdicts": verdicts, "quick": args.quick, "machine": info,
    }
    if cuda is not None:
        record["speedup_cuda"] = cuda["speedup"]
        record["speedup_cuda_vs_compiled"] = cuda["speedup_vs_compiled"]
        record["speedup_cuda_n"] = cuda["n"]
    return finish(args, "stats", "tensor_stats: fused vs unfused torch ops", body, notes, record, info)


if __name__ == "__main__":
    sys.exit(main())
