"""Fused `bdh_fast::tensor_stats` vs the unfused torch ops it replaces (tracker issue 5).

The unfused baselines compute the same numbers one op at a time: torch.aminmax, sum, sum of
squares, torch.count_nonzero and torch.histc over the aminmax range (read to the host, which
histc needs):

    fused             torch.ops.bdh_fast.tensor_stats(x, bins): two passes, no host round trip
    unfused           sum of squares as x.square().sum() (the usual idiom)
    unfused-dot       sum of squares as torch.dot(x, x) (no temporary: the fastest eager form)
    unfused-compiled  torch.compile'd reductions (inductor fuses them) + eager torch.histc

The baselines do less than the op: they let NaN/Inf poison sums, min and max instead of counting
them apart. `speedup` is against the faster of the two eager baselines (the unfused ops the issue
names); `speedup_vs_compiled` against the compiled one. Variants run interleaved (A, B, C, D, A,
B, ...) after warm-up; medians are reported. Target, reported and not asserted: fused >= 2x the
unfused ops at 10M fp32 elements on CPU.

    python bench/stats.py                       # 1M, 10M, 100M fp32 on CPU (and CUDA if present)
    python bench/stats.py --sizes 1e6,3e7 --repeats 9
    python bench/stats.py --quick               # small sizes, few repeats: the harness works

The last stdout line is one JSON object: speedup_cpu and speedup_cpu_vs_compiled (at 10M, or the
largest size run below it), the same for CUDA when a GPU ran, and per-size figures. On CUDA each size
also gets fraction_of_peak: the fused op's input bytes per second over the GPU's peak memory
bandwidth (NVML: 2 x max memory clock x bus width, or --peak_gb_per_s). The op reads x twice (stats,
then histogram), so 50% is its ceiling on tensors larger than the L2 cache.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

import torch

from bdh_fast import ops

TARGET_SPEEDUP = 2.0
SPEEDUP_SIZE = 10_000_000


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1e6,1e7,1e8", help="comma-separated element counts (default 1e6,1e7,1e8)")
    p.add_argument("--bins", type=int, default=64)
    p.add_argument("--repeats", type=int, default=15, help="timed rounds per variant and size")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds per size")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: CPU, then CUDA as well when available")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="skip the torch.compile'd baseline (it compiles once per size)")
    p.add_argument("--peak_gb_per_s", type=float, default=None,
                   help="the GPU's peak memory bandwidth in GB/s (default: from NVML)")
    p.add_argument("--quick", action="store_true", help="sizes 1e5,1e6, 3 repeats, no compile: checks the harness")
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


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int, cuda: bool) -> dict[str, list[float]]:
    """Seconds per call of each fn, round-robin A, B, C, A, B, C, ...; gc and (on CUDA) a device
    sync happen outside the timed region."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_index in range(warmup + repeats):
        for name, fn in fns.items():
            gc.collect()
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if cuda:
                torch.cuda.synchronize()
            if round_index >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


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
    times = interleaved(fns, args.repeats, args.warmup, device.type == "cuda")
    medians = {name: statistics.median(samples) for name, samples in times.items()}
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


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown CPU"


def size_table(result: dict[str, Any]) -> str:
    fused_ms = result["median_ms"]["fused"]
    lines = [f"{result['device']}, n = {result['n']:,}"
             + (f" (inductor compile {result['compile_s']:.1f} s, not timed)" if result["compile_s"] else ""),
             f"  {'variant':<18}{'median ms':>11}{'min-max ms':>19}{'vs fused':>10}"]
    for name, samples in result["times"].items():
        med = result["median_ms"][name]
        spread = f"{min(samples) * 1e3:.2f}-{max(samples) * 1e3:.2f}"
        lines.append(f"  {name:<18}{med:>11.2f}{spread:>19}{med / fused_ms:>9.2f}x")
    return "\n".join(lines)


def summary_table(results: list[dict[str, Any]]) -> str:
    lines = [f"{'device':<7}{'n':>13}{'fused ms':>10}{'best eager':>14}{'its ms':>9}{'speedup':>9}"
             f"{'vs compiled':>13}{'fused GB/s':>12}"]
    for r in results:
        best = r["best_baseline"]
        vs_compiled = f"{r['speedup_vs_compiled']:.2f}x" if r["speedup_vs_compiled"] else "-"
        lines.append(f"{r['device']:<7}{r['n']:>13,}{r['median_ms']['fused']:>10.2f}{best:>14}"
                     f"{r['median_ms'][best]:>9.2f}{r['speedup']:>8.2f}x{vs_compiled:>13}"
                     f"{r['fused_gb_per_s']:>12.1f}")
    return "\n".join(lines)


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
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    print(f"# bench/stats.py  {' '.join(sys.argv[1:])}")
    print(f"# CPU: {cpu_model()}; {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
          + (f"; GPU: {gpu}" if gpu else ""))
    print(f"# torch {torch.__version__}, Python {platform.python_version()}, native extension: {ops.HAS_NATIVE}")
    print(f"# fp32 input, bins={args.bins}, {args.repeats} interleaved rounds after {args.warmup} warm-up; "
          "speedup = the faster eager baseline median / fused median")

    results = []
    for device in devices:
        for n in args.sizes:
            result = bench_size(n, device, args)
            results.append(result)
            print()
            print(size_table(result), flush=True)
    print()
    print(summary_table(results))

    cpu, cuda = headline(results, "cpu"), headline(results, "cuda")
    peak = args.peak_gb_per_s if args.peak_gb_per_s else (gpu_peak_gb_per_s() if gpu else None)
    if peak:
        for r in results:
            if r["device"] == "cuda":
                r["fraction_of_peak"] = r["fused_gb_per_s"] / peak
                print(f"cuda, n = {r['n']:,}: fused {r['fused_gb_per_s']:.0f} GB/s of input = "
                      f"{r['fraction_of_peak']:.1%} of the {peak:.0f} GB/s peak (two passes: 50% is the ceiling)")
    if cpu is not None:
        verdict = "meets" if cpu["speedup"] >= TARGET_SPEEDUP else "MISSES"
        vs_compiled = (f"; {cpu['speedup_vs_compiled']:.2f}x vs the torch.compile'd reductions + histc"
                       if cpu["speedup_vs_compiled"] else "")
        print(f"\nCPU speedup at {cpu['n']:,} elements: {cpu['speedup']:.2f}x vs the unfused torch ops "
              f"({verdict} the {TARGET_SPEEDUP}x target){vs_compiled}")
    record = {
        "bench": "stats",
        "speedup_cpu": cpu["speedup"] if cpu else None,
        "speedup_cpu_vs_compiled": cpu["speedup_vs_compiled"] if cpu else None,
        "speedup_cpu_n": cpu["n"] if cpu else None,
        "target_speedup": TARGET_SPEEDUP,
        "per_size": [
            {"device": r["device"], "n": r["n"], "median_ms": r["median_ms"], "best_baseline": r["best_baseline"],
             "speedup": r["speedup"], "speedup_vs_compiled": r["speedup_vs_compiled"],
             "fused_gb_per_s": r["fused_gb_per_s"], "fraction_of_peak": r.get("fraction_of_peak"),
             "compile_s": r["compile_s"]}
            for r in results
        ],
        "peak_gb_per_s": peak,
        "peak_source": None if not peak else "--peak_gb_per_s" if args.peak_gb_per_s else "NVML",
        "bins": args.bins,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "cpu": cpu_model(),
        "gpu": gpu,
        "torch": torch.__version__,
        "native": ops.HAS_NATIVE,
    }
    if cuda is not None:
        record["speedup_cuda"] = cuda["speedup"]
        record["speedup_cuda_vs_compiled"] = cuda["speedup_vs_compiled"]
        record["speedup_cuda_n"] = cuda["n"]
    sys.stdout.flush()
    print(json.dumps(record, allow_nan=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
