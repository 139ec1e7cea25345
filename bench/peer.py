"""bdh_fast's training step against the reference formulation of BDH, same config, one process
(tracker issue 17): tokens/s, peak memory, and a logits check.

Two sides, each its own model instance (identical weights), optimizer and copy of the same batch
stream, both torch.compile'd, run in interleaved blocks (peer, ours, peer, ours, ...):

  peer  `PeerBDH` below: our own implementation of the reference's formulation, written from
        ../shared/docs/BDH.md. Each layer rotates x_s with RoPE as the reference computes it (phases
        t * f, then frac, cos and sin, inside the layer, on a (B, nh, T, N) tensor built with the
        strided stack), forms the full (T, T) scores QR @ QR^T, masks them with tril(-1), multiplies
        by V. Trained like the reference train.py: torch.compile(model) in default mode,
        torch.optim.AdamW(lr 1e-3, weight decay 0.1) with its default implementation, zero_grad().
  ours  the real bdh_fast Trainer at its telemetry defaults (on-device step buffer, grad norms, step
        timer, TensorBoard + JSONL through the background logger; periodic eval, samples, probes
        and checkpoints off, as in bench/overhead.py's `full`), driven through Trainer.run_step.
        With --ours bare: bench/overhead.py's Bare (bench/common.py's BareLoop: the Trainer's model
        and optimizer math, no telemetry), to compare model + optimizer steps on both sides.

Peak memory of a training step, per side, over --mem_steps steps after the timing:
  CPU   torch.profiler with profile_memory=True: c10's CPU allocator reports every allocation and
        free made inside the profiled window with its running total ("Total Allocated"); the peak
        is the highest total minus the total at the window's start. Weights and optimizer moments,
        allocated before the window, are not in it; activations, gradients (set to None after
        every step, so allocated again) and temporaries are. tracemalloc would see none of it.
  CUDA  torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus the allocation at the
        window's start (the absolute maximum is reported too).

Fidelity: with the same weights, our eager forward's logits against the peer's on one batch, in
float32.

Targets (bench/targets.py: peer_speedup >= 1.5x, peer_memory <= 0.7x, peer_logits <= 1e-5), judged
by the harness's rule: the speedup with its paired range (each round's peer block over ours), so a
range that spreads wider than the target's margin is "unresolved", never PASS.

Both sides read the same corpus (--data FILE, default the packaged tiny Shakespeare). The shape
flags default to issue 17's CPU configuration (float32 unless --dtype says otherwise) with the small
preset's other fields; with --preset the preset's own shape (e.g. --preset reference on a GPU, the
issue's GPU setting), flags override.

    python bench/peer.py                    # L4 D128 H4 m32, B8 T256 (issue 17's CPU configuration)
    python bench/peer.py --quick            # tiny sizes, one block of two steps: the harness works
    python bench/peer.py --ours bare        # model + optimizer on both sides, no telemetry
    python bench/peer.py --save             # also file bench/results/<date>-<machine>-peer.md|json

The last stdout line is one JSON object (see `record` below), its verdicts under "verdicts".
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import pathlib
import sys
import tempfile
from typing import Callable

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # bench/ is not a package

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import (  # noqa: E402
    AUTOCAST, bench_config, bench_parser, configure_device, corpus_file, finish, interleaved, judge, machine_info,
    median, paired_ratio, ratio_table, span, timed_once,
)
from overhead import Bare, Full, quiet  # noqa: E402
from torch import nn  # noqa: E402

from bdh_fast.config import RunConfig  # noqa: E402
from bdh_fast.data import ByteDataset  # noqa: E402
from bdh_fast.errors import UserError  # noqa: E402
from bdh_fast.model import BDHConfig  # noqa: E402
from bdh_fast.train import pick_device, pick_dtype  # noqa: E402

# Issue 17's configuration; --quick shrinks it to a few seconds.
SHAPE = dict(n_layer=4, n_embd=128, n_head=4, mlp_mult=32, batch_size=8, block_size=256)
QUICK_SHAPE = dict(n_layer=2, n_embd=64, n_head=2, mlp_mult=8, batch_size=4, block_size=64)


# ---------------------------------------------------------------------------------------------
# The reference formulation (BDH.md), kept deliberately as the reference computes it
# ---------------------------------------------------------------------------------------------


class PeerAttention(nn.Module):
    def __init__(self, n: int):
        super().__init__()
        q = torch.floor(torch.arange(n, dtype=torch.float32) / 2) * 2  # q_i = 2 floor(i / 2)
        freqs = 1.0 / (2.0**16) ** (q / n) / (2 * math.pi)
        self.register_buffer("freqs", freqs.view(1, 1, 1, n), persistent=False)  # (1, 1, 1, N)

    @staticmethod
    def rope(phases: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        v_rot = torch.stack((-v[..., 1::2], v[..., ::2]), dim=-1).view(*v.size())  # (B, nh, T, N)
        phases = (phases % 1) * (2 * math.pi)
        return (v * torch.cos(phases)).to(v.dtype) + (v_rot * torch.sin(phases)).to(v.dtype)

    def forward(self, Q: torch.Tensor, K: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
        T = Q.size(-2)
        r_phases = torch.arange(T, device=self.freqs.device, dtype=self.freqs.dtype).view(1, 1, -1, 1) * self.freqs
        QR = self.rope(r_phases, Q)  # (B, nh, T, N)
        KR = QR  # K is Q
        scores = (QR @ KR.mT).tril(diagonal=-1)  # (B, nh, T, T)
        return scores @ V  # (B, nh, T, D)


class PeerBDH(nn.Module):
    """BDH as the reference writes it; same parameter names as bdh_fast.model.BDH."""

    def __init__(self, config: BDHConfig):
        super().__init__()
        self.config = config
        nh, D, N, V = config.n_head, config.n_embd, config.neurons_per_head, config.vocab_size
        self.embed = nn.Embedding(V, D)
        self.encoder = nn.Parameter(torch.empty(nh, D, N))
        self.encoder_v = nn.Parameter(torch.empty(nh, D, N))
        self.decoder = nn.Parameter(torch.empty(nh * N, D))
        self.lm_head = nn.Parameter(torch.empty(D, V))
        self.attn = PeerAttention(N)
        self.ln = nn.LayerNorm(D, elementwise_affine=False, bias=False)
        self.drop = nn.Dropout(config.dropout)
        for p in self.parameters():
            nn.init.normal_(p, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        B, T = idx.size()
        nh, N, D = self.config.n_head, self.config.neurons_per_head, self.config.n_embd
        x = self.ln(self.embed(idx).unsqueeze(1))  # (B, 1, T, D)
        for _ in range(self.config.n_layer):
            x_sparse = F.relu(x @ self.encoder)  # (B, nh, T, N)
            yKV = self.ln(self.attn(Q=x_sparse, K=x_sparse, V=x))  # (B, nh, T, D)
            y_sparse = F.relu(yKV @ self.encoder_v)  # (B, nh, T, N)
            xy_sparse = self.drop(x_sparse * y_sparse)  # (B, nh, T, N)
            yMLP = xy_sparse.transpose(1, 2).reshape(B, 1, T, N * nh) @ self.decoder  # (B, 1, T, D)
            x = self.ln(x + self.ln(yMLP))
        logits = x.view(B, T, D) @ self.lm_head  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        return logits, loss


class PeerLoop:
    """The reference train.py's step: compiled model, default AdamW, zero_grad, the same batches."""

    def __init__(self, config: RunConfig, device: torch.device, dtype: str, data_path: pathlib.Path,
                 weights: dict[str, torch.Tensor]):
        self.device = device
        self.data = ByteDataset(data_path, config.block_size, config.batch_size, config.val_fraction,
                                device, config.seed)
        self.model = PeerBDH(config.model_config()).to(device)
        self.model.load_state_dict(weights)
        self.train_model = torch.compile(self.model)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-3, weight_decay=0.1)
        self.autocast_dtype = AUTOCAST[dtype]
        self.scaler = torch.amp.GradScaler(device.type, enabled=dtype == "float16")

    def step(self) -> None:
        x, y = self.data.get_batch("train")
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            _, loss = self.train_model(x, y)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad()

    def steps(self, n: int) -> None:
        for _ in range(n):
            self.step()


# ---------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------


def peak_step_memory(fn: Callable[[], None], device: torch.device) -> dict[str, float | None]:
    """Bytes: the highest allocation reached while fn runs, above the allocation at its start."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return {"peak_bytes": peak - start, "absolute_peak_bytes": peak}
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory(prefix="bdh-peer-") as tmp:
        path = pathlib.Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text())["traceEvents"]
    memory = [e["args"] for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0]
    if not memory:
        return {"peak_bytes": 0, "absolute_peak_bytes": None}
    start = memory[0]["Total Allocated"] - memory[0]["Bytes"]
    return {"peak_bytes": max(m["Total Allocated"] for m in memory) - start, "absolute_peak_bytes": None}


@torch.no_grad()
def logits_diff(ours: nn.Module, peer: nn.Module, data_path: pathlib.Path, config: RunConfig) -> float:
    """Max |logits_ours - logits_peer| in float32, eager, eval mode, one validation batch."""
    data = ByteDataset(data_path, config.block_size, config.batch_size, config.val_fraction,
                      torch.device("cpu"), config.seed + 1)
    x, _ = data.get_batch("val")
    device = next(ours.parameters()).device
    modes = ours.training, peer.training
    ours.eval(), peer.eval()
    try:
        return (ours(x.to(device))[0] - peer(x.to(device))[0]).abs().max().item()
    finally:
        ours.train(modes[0]), peer.train(modes[1])


# ---------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = bench_parser(__doc__, "tiny sizes, one block of two steps", compile=False)
    p.add_argument("--ours", choices=("trainer", "bare"), default="trainer",
                   help="our side: the Trainer with its default telemetry, or model + optimizer only")
    for name, value in SHAPE.items():
        p.add_argument(f"--{name}", type=int, default=None,
                       help=f"default {value} (issue 17's configuration), or the --preset's when one is given")
    p.add_argument("--attention_block", type=int, default=None, help="override bdh_fast's attention row block")
    p.add_argument("--log_train_freq", type=int, default=10, help="ours: steps between telemetry flushes")
    p.add_argument("--steps", type=int, default=None, help="steps per timed block (default --log_train_freq)")
    p.add_argument("--repeats", type=int, default=7, help="timed blocks per side")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per side after the first step")
    p.add_argument("--mem_steps", type=int, default=2, help="steps in each side's memory window")
    args = p.parse_args(argv)
    if args.preset is None and args.dtype == "auto":
        args.dtype = "float32"  # issue 17's configuration (and --quick's logits check) is float32
    if args.quick:
        for name, value in QUICK_SHAPE.items():
            setattr(args, name, value)
        args.log_train_freq, args.repeats, args.warmup, args.mem_steps = 2, 1, 1, 1
    elif args.preset is None:  # issue 17's configuration, the small preset's other fields
        args.preset = "small"
        for name, value in SHAPE.items():
            if getattr(args, name) is None:
                setattr(args, name, value)
    args.steps = args.steps or args.log_train_freq
    for name in ("steps", "repeats", "mem_steps", "log_train_freq", *SHAPE):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.ours == "trainer" and args.steps % args.log_train_freq:
        p.error("--steps must be a multiple of --log_train_freq (every timed block holds the same flushes)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    shape = {name: getattr(args, name) for name in SHAPE if getattr(args, name) is not None}
    with tempfile.TemporaryDirectory(prefix="bdh-peer-") as tmp:
        workdir = pathlib.Path(tmp)
        try:
            data_path, data_label = corpus_file(args.data)
            config = bench_config(
                args.preset, args.device, dtype=args.dtype, data=str(data_path), **shape,
                log_backend="tensorboard,jsonl", log_train_freq=args.log_train_freq, eval_freq=0,
                generate_freq=0, probe_freq=0, ckpt_freq=0, progress=False, max_iters=1_000_000,
                log_freq=args.log_train_freq, out_dir=str(workdir / "runs"), run_name="ours")
            device = pick_device(config)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return run(args, config, device, data_path, data_label)


def verdicts(speedup: float, paired: list[float], memory_ratio: float | None, diff: float | None, *,
             device: str, preset: str, quick: bool) -> list[dict]:
    """The three figures judged against bench/targets.py's peer_* targets: the speedup with its
    paired range (unresolved when the noise hides the 1.5x), memory and logits (no timing noise)."""
    where = dict(device=device, preset=preset, quick=quick)
    return [judge("peer_speedup", speedup, paired=paired, **where),
            judge("peer_memory", memory_ratio, **where),
            judge("peer_logits", diff, figure=f"{diff:.2e}" if diff is not None else "n/a (not float32)", **where)]


def run(args: argparse.Namespace, config: RunConfig, device: torch.device, data_path: pathlib.Path,
        data_label: str) -> int:
    dtype = pick_dtype(config, device)
    configure_device(device)
    tokens_per_step = config.batch_size * config.block_size
    info = machine_info()
    shape = (f"L{config.n_layer} D{config.n_embd} H{config.n_head} m{config.mlp_mult}, "
             f"B{config.batch_size} T{config.block_size}, dropout {config.dropout:g}")
    print(f"peer: {shape}, {device.type}, {dtype}, {data_label}; ours = "
          f"{'Trainer, default telemetry' if args.ours == 'trainer' else 'BareLoop (no telemetry)'}; "
          f"{args.repeats} x {args.steps} steps per side, interleaved", flush=True)

    ours = Full(config) if args.ours == "trainer" else Bare(config, device, dtype, data_path)
    model = ours.trainer.model if args.ours == "trainer" else ours.loop.model
    if args.attention_block:
        model.attn.block = args.attention_block
    peer = PeerLoop(config, device, dtype, data_path, model.state_dict())
    sides = {"peer": peer, "ours": ours}
    try:
        diff = logits_diff(model.float(), peer.model.float(), data_path, config) if dtype == "float32" else None
        first_s = {name: timed_once(lambda s=s: s.steps(1), device) for name, s in sides.items()}
        print("first step (compilation included, not in the medians): "
              + ", ".join(f"{name} {s:.1f} s" for name, s in first_s.items()), flush=True)
        for side in sides.values():
            side.steps(args.warmup)
        if args.ours == "trainer":
            ours.align()
        block_s = interleaved({name: (lambda s=s: s.steps(args.steps)) for name, s in sides.items()},
                              args.repeats, warmup=0, device=device, settle={"ours": ours.settle})
        memory = {name: peak_step_memory(lambda s=s: s.steps(args.mem_steps), device) for name, s in sides.items()}
        ours.settle()
    finally:
        with quiet():
            ours.close()

    step_s = {name: [t / args.steps for t in times] for name, times in block_s.items()}
    tps = {name: tokens_per_step / median(s) for name, s in step_s.items()}
    speedup = tps["ours"] / tps["peer"]
    paired = span(paired_ratio(block_s["peer"], block_s["ours"]))
    peak = {name: m["peak_bytes"] for name, m in memory.items()}
    memory_ratio = peak["ours"] / peak["peer"] if peak["peer"] else None
    judged = verdicts(speedup, paired, memory_ratio, diff, device=device.type, preset=config.preset,
                      quick=args.quick)
    mib = {name: f"{b / 2**20:,.1f}" for name, b in peak.items()}
    extra = {"peer": {"speedup": "1.00x", "paired range": "-", "peak MiB": mib["peer"], "memory": "1.00x"},
             "ours": {"speedup": judged[0]["figure"], "paired range": f"{paired[0]:.2f}..{paired[1]:.2f}x",
                      "peak MiB": mib["ours"], "memory": judged[1]["figure"]}}
    table = ratio_table(step_s, "peer", tokens_per_step, extra)
    how = ("CPU: torch.profiler profile_memory, highest c10 CPU-allocator total in the window minus its start"
           if device.type == "cpu" else "CUDA: max_memory_allocated in the window minus the allocation at its start")
    notes = [
        "first step, not in the medians: " + ", ".join(f"{name} {s:.1f} s" for name, s in first_s.items()),
        "paired range: per round, peer's block time / ours' block time in the same round (the noise); "
        "verdicts (bench/targets.py): a paired range wider than the target's margin is unresolved",
        f"ours: {'the Trainer at its default telemetry (eval, samples, probes, checkpoints off)' if args.ours == 'trainer' else 'BareLoop, no telemetry'}; "
        "peer: compiled PeerBDH (reference formulation) + default AdamW, as the reference train.py",
        f"peak memory of {args.mem_steps} training step(s) above the persistent state; {how}",
        f"logits, eager {dtype}, same weights, one batch: max |ours - peer| = " + judged[2]["figure"],
        f"attention row block: {model.attn.block}; THP_MEM_ALLOC_ENABLE="
        f"{os.environ.get('THP_MEM_ALLOC_ENABLE', 'unset')} (1: c10 backs large CPU tensors with huge pages)",
    ]
    record = {
        "bench": "peer", "device": device.type, "dtype": dtype, "ours": args.ours, "preset": config.preset,
        "n_layer": config.n_layer, "n_embd": config.n_embd, "n_head": config.n_head, "mlp_mult": config.mlp_mult,
        "batch_size": config.batch_size, "block_size": config.block_size, "dropout": config.dropout,
        "tokens_per_step": tokens_per_step, "steps": args.steps, "repeats": args.repeats, "data": data_label,
        "attention_block": model.attn.block, "thp_mem_alloc": os.environ.get("THP_MEM_ALLOC_ENABLE"),
        "peer_ms": median(step_s["peer"]) * 1e3, "ours_ms": median(step_s["ours"]) * 1e3,
        "peer_tokens_per_s": tps["peer"], "ours_tokens_per_s": tps["ours"], "speedup": speedup,
        "paired_range": paired, "compile_s": first_s,
        "peer_peak_bytes": peak["peer"], "ours_peak_bytes": peak["ours"], "memory_ratio": memory_ratio,
        "absolute_peak_bytes": {name: m["absolute_peak_bytes"] for name, m in memory.items()},
        "memory_method": how, "logits_max_abs_diff": diff,
        "verdicts": judged,
        "quick": args.quick, "machine": info,
    }
    title = f"peer: bdh_fast vs the reference formulation, {shape}, {device.type}, {dtype}"
    return finish(args, "peer", title, table, notes, record, info)


if __name__ == "__main__":
    sys.exit(main())
