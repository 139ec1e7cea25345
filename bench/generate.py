"""Generation speed: incremental decoding vs full recompute.

`BDH.generate(use_cache=True)` prefills the prompt once and then decodes one token at a time from
the recurrent attention state; `use_cache=False` is the reference path, re-running the whole prefix
for every new token. Both run greedily (top_k=1), batch 1, eval mode, no_grad, from the prompt
"To be or not to be" (bytes), on a randomly initialised model of the preset's size (speed does not
depend on the weights). After one untimed warm-up of each, the two run interleaved (cached, full,
cached, ...) and the table reports medians and the paired per-round speedups; both must produce the
same tokens. Target (bench/targets.py): cached >= 5x faster than full recompute for 256 new tokens
on CPU.

    python bench/generate.py                        # small preset, 256 tokens, 5 repeats, CPU
    python bench/generate.py --preset reference     # the reference size (slow on CPU)
    python bench/generate.py --quick                # 32 tokens, 1 repeat: the harness works
    python bench/generate.py --save                 # also file bench/results/<date>-<machine>-generate.md|json

The last stdout line is one JSON object (see `record` below).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is not a package

from common import (bench_config, bench_parser, finish, interleaved, judge, machine_info,  # noqa: E402
                    markdown_table, median, paired_ratio, span)

from bdh_fast.model import BDH  # noqa: E402

PROMPT = "To be or not to be"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = bench_parser(__doc__, "32 tokens, 1 repeat", dtype=False, compile=False, data=False, device=("cpu", "cuda"))
    p.set_defaults(preset="small")
    p.add_argument("--new_tokens", type=int, default=256, help="tokens generated per run")
    p.add_argument("--repeats", type=int, default=5, help="timed runs of each variant, interleaved")
    p.add_argument("--prompt", default=PROMPT, help="prompt, encoded as UTF-8 bytes")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--seed", type=int, default=1337, help="model init seed")
    args = p.parse_args(argv)
    if args.quick:
        args.new_tokens, args.repeats = min(args.new_tokens, 32), 1
    if args.new_tokens < 1 or args.repeats < 1:
        p.error("--new_tokens and --repeats must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    config = bench_config(args.preset, args.device).model_config()
    model = BDH(config).to(device).eval()
    prompt = torch.tensor([list(args.prompt.encode())], dtype=torch.long, device=device)  # (1, T0)
    state_mb = config.n_layer * config.n_head * config.neurons_per_head * config.n_embd * 4 / 2**20
    n = args.new_tokens
    outputs: dict[str, torch.Tensor] = {}

    def run(name: str, use_cache: bool, tokens: int):
        def call() -> None:
            outputs[name] = model.generate(prompt, tokens, top_k=1, use_cache=use_cache)  # greedy
        return call

    for use_cache in (True, False):  # warm-up: allocator, BLAS, the RoPE op
        run("warm-up", use_cache, min(8, n))()
    times = interleaved({"cached": run("cached", True, n), "full": run("full", False, n)}, args.repeats,
                        warmup=0, device=device)

    info = machine_info()
    med = {name: median(samples) for name, samples in times.items()}
    speedup = med["full"] / med["cached"]
    paired = span(paired_ratio(times["full"], times["cached"]))
    same = torch.equal(outputs["cached"], outputs["full"])
    table = markdown_table(["variant", "median s", "min-max s", "ms/token", "tokens/s", "speedup"], [
        [name, f"{med[name]:.3f}", f"{min(samples):.3f}-{max(samples):.3f}", f"{med[name] / n * 1e3:.2f}",
         f"{n / med[name]:,.1f}", f"{med['full'] / med[name]:.2f}x"] for name, samples in times.items()])
    verdicts = [judge("generate", speedup, device=device.type, preset=args.preset, paired=paired, quick=args.quick)]
    notes = [
        f"preset {args.preset} (L={config.n_layer}, D={config.n_embd}, nh={config.n_head}, "
        f"N={config.neurons_per_head}), batch 1, greedy, prompt {args.prompt!r} ({prompt.size(1)} bytes), "
        f"{n} new tokens, {args.repeats} interleaved repeats, medians",
        f"attention state: {state_mb:.1f} MiB per sequence (float32); tokens identical: {'yes' if same else 'NO'}",
        f"paired speedups (each round's full recompute over its cached run): {paired[0]:.2f}..{paired[1]:.2f}x",
    ]
    if not same:
        notes.append("WARNING: greedy tokens differ between cached and full recompute (near-tie in the logits?)")
    record = {
        "bench": "generate", "preset": args.preset, "new_tokens": n, "device": args.device,
        "cached_s": med["cached"], "full_s": med["full"], "speedup": speedup, "paired_speedup_range": paired,
        "repeats": args.repeats, "cached_samples_s": times["cached"], "full_samples_s": times["full"],
        "tokens_identical": same, "verdicts": verdicts, "quick": args.quick, "machine": info,
    }
    title = f"generate: cached decoding vs full recompute, preset {args.preset}, {args.device}"
    return finish(args, "generate", title, table, notes, record, info)


if __name__ == "__main__":
    sys.exit(main())
