"""Generation speed: incremental decoding vs full recompute (tracker issue 4, section 2).

`BDH.generate(use_cache=True)` prefills the prompt once and then decodes one token at a time from
the recurrent attention state; `use_cache=False` is the reference path, re-running the whole prefix
for every new token. Both run greedily (top_k=1), batch 1, eval mode, no_grad, from the prompt
"To be or not to be" (bytes), on a randomly initialised model (speed does not depend on the
weights). After one untimed warm-up of each, the two run interleaved (cached, full, cached, ...)
and the table reports medians; both must produce the same tokens. Target, reported not asserted:
cached >= 5x faster than full recompute for 256 new tokens on CPU at the small preset.

    python bench/generate.py                        # small preset, 256 tokens, 5 repeats, CPU
    python bench/generate.py --preset reference     # the reference size (slow on CPU)
    python bench/generate.py --quick                # 32 tokens, 1 repeat: the harness works

The last stdout line is one JSON object (see `record` below). Self-contained: depends only on
bdh_fast.model.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from bdh_fast.model import BDH, BDHConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is not a package
from common import machine_info  # noqa: E402

PRESETS = {  # n_layer, n_embd, n_head, mlp_internal_dim_multiplier (dropout is off in eval anyway)
    "tiny": dict(n_layer=2, n_embd=64, n_head=2, mlp_internal_dim_multiplier=8),
    "small": dict(n_layer=4, n_embd=128, n_head=4, mlp_internal_dim_multiplier=16),
    "reference": dict(n_layer=6, n_embd=256, n_head=4, mlp_internal_dim_multiplier=128),
}
TARGET_SPEEDUP = 5.0
PROMPT = "To be or not to be"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=tuple(PRESETS), default="small", help="model size")
    p.add_argument("--new_tokens", type=int, default=256, help="tokens generated per run")
    p.add_argument("--repeats", type=int, default=5, help="timed runs of each variant, interleaved")
    p.add_argument("--prompt", default=PROMPT, help="prompt, encoded as UTF-8 bytes")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--seed", type=int, default=1337, help="model init seed")
    p.add_argument("--quick", action="store_true", help="32 tokens, 1 repeat: checks the harness")
    args = p.parse_args(argv)
    if args.quick:
        args.new_tokens, args.repeats = min(args.new_tokens, 32), 1
    if args.new_tokens < 1 or args.repeats < 1:
        p.error("--new_tokens and --repeats must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device")
    return args


def timed(fn: Callable[[], torch.Tensor], device: torch.device) -> tuple[float, torch.Tensor]:
    """Seconds for one call, synchronised on CUDA; gc runs before the clock starts."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0, out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    config = BDHConfig(**PRESETS[args.preset], dropout=0.0)
    model = BDH(config).to(device).eval()
    prompt = torch.tensor([list(args.prompt.encode())], dtype=torch.long, device=device)  # (1, T0)
    state_mb = config.n_layer * config.n_head * config.neurons_per_head * config.n_embd * 4 / 2**20

    def run(use_cache: bool, n: int) -> Callable[[], torch.Tensor]:
        return lambda: model.generate(prompt, n, top_k=1, use_cache=use_cache)  # greedy

    variants = {"cached": True, "full": False}
    for use_cache in variants.values():  # warm-up: allocator, BLAS, the RoPE op
        run(use_cache, min(8, args.new_tokens))()
    times: dict[str, list[float]] = {name: [] for name in variants}
    outputs: dict[str, torch.Tensor] = {}
    for _ in range(args.repeats):  # interleaved: cached, full, cached, full, ...
        for name, use_cache in variants.items():
            seconds, outputs[name] = timed(run(use_cache, args.new_tokens), device)
            times[name].append(seconds)

    info = machine_info()
    med = {name: statistics.median(samples) for name, samples in times.items()}
    speedup = med["full"] / med["cached"]
    same = torch.equal(outputs["cached"], outputs["full"])
    n = args.new_tokens
    print(f"# bench/generate.py: cached decoding vs full recompute, preset {args.preset} "
          f"(L={config.n_layer}, D={config.n_embd}, nh={config.n_head}, N={config.neurons_per_head}), "
          f"batch 1, greedy, prompt {args.prompt!r} ({prompt.size(1)} bytes), {n} new tokens, "
          f"{args.repeats} interleaved repeats, medians")
    where = f"GPU {info['gpu']}, " if info["gpu"] else ""
    print(f"# {where}CPU {info['cpu']}, {info['usable_cores']}/{info['cores']} cores usable, "
          f"{info['torch_threads']} torch threads; torch {info['torch']}, Python {info['python']}; {info['date']}")
    print(f"# command: python {' '.join([os.path.relpath(sys.argv[0]), *sys.argv[1:]])}")
    print(f"# attention state: {state_mb:.1f} MiB per sequence (float32); tokens identical: {'yes' if same else 'NO'}")
    print()
    print("| variant | median s | min-max s | ms/token | tokens/s | speedup |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, samples in times.items():
        print(f"| {name} | {med[name]:.3f} | {min(samples):.3f}-{max(samples):.3f} | "
              f"{med[name] / n * 1e3:.2f} | {n / med[name]:,.1f} | {med['full'] / med[name]:.2f}x |")
    verdict = "PASS" if speedup >= TARGET_SPEEDUP else "BELOW TARGET"
    print(f"\nspeedup {speedup:.1f}x (target >= {TARGET_SPEEDUP:g}x for 256 tokens on CPU at small): {verdict}")
    if not same:
        print("WARNING: greedy tokens differ between cached and full recompute (near-tie in the logits?)")
    record = {
        "bench": "generate", "preset": args.preset, "new_tokens": n,
        "cached_s": med["cached"], "full_s": med["full"], "speedup": speedup,
        "machine": info,
        "repeats": args.repeats, "cached_samples_s": times["cached"], "full_samples_s": times["full"],
        "tokens_identical": same, "device": args.device,
    }
    sys.stdout.flush()
    print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
