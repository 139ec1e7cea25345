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
        With --ours bare: bench/common.py's BareLoop (the Trainer's model and optimizer math, no
        telemetry), to compare model + optimizer steps on both sides.

Peak memory of a training step, per side, over --mem_steps steps after the timing:
  CPU   torch.profiler with profile_memory=True: c10's CPU allocator reports every allocation and
        free made inside the profiled window with its running total ("Total Allocated"); the peak
        is the highest total minus the total at the window's start. Weights and optimizer moments,
        allocated before the window, are not in it; activations, gradients (set to None after
        every step, so allocated again) and temporaries are. tracemalloc would see none of it.
  CUDA  torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus the allocation at the
        window's start (the absolute maximum is reported too).

Fidelity: with the same weights, our eager forward's logits against the peer's on one batch, in
float32 (target: max |diff| <= 1e-5).

    python bench/peer.py                    # L4 D128 H4 m32, B8 T256 (issue 17's CPU configuration)
    python bench/peer.py --quick            # tiny sizes, one block of two steps: the harness works
    python bench/peer.py --ours bare        # model + optimizer on both sides, no telemetry
    python bench/peer.py --save             # also file bench/results/<date>-<machine>-peer.md|json

The last stdout line is one JSON object (see `record` below).
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
    AUTOCAST, BareLoop, bench_config, command_line, configure_device, corpus_file, emit_json, interleaved,
    machine_info, machine_line, median, print_report, ratio_table, save_result, timed_once,
)
from overhead import Full, quiet  # noqa: E402
from torch import nn  # noqa: E402

from bdh_fast.config import RunConfig  # noqa: E402
from bdh_fast.data import ByteDataset  # noqa: E402
from bdh_fast.errors import UserError  # noqa: E402
from bdh_fast.model import BDHConfig  # noqa: E402
from bdh_fast.train import pick_device, pick_dtype  # noqa: E402

# Issue 17's configuration; --quick shrinks it to a few seconds.
SHAPE = dict(n_layer=4, n_embd=128, n_head=4, mlp_mult=32, batch_size=8, block_size=256)
QUICK_SHAPE = dict(n_layer=2, n_embd=64, n_head=2, mlp_mult=8, batch_size=4, block_size=64)
TARGET_SPEEDUP, TARGET_MEMORY, TARGET_LOGITS = 1.5, 0.7, 1e-5


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


class Bare:
    """--ours bare: BareLoop with the interface of overhead.Full."""

    def __init__(self, config: RunConfig, device: torch.device, dtype: str, data_path: pathlib.Path):
        self.loop = BareLoop(config, device, dtype, data_path, compile=True)
        self.model = self.loop.model

    def steps(self, n: int) -> None:
        self.loop.steps(n)

    def settle(self) -> None:
        pass

    def close(self) -> None:
        pass


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
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="autocast dtype for both sides (auto: bfloat16 on CUDA when supported, else float32)")
    p.add_argument("--ours", choices=("trainer", "bare"), default="trainer",
                   help="our side: the Trainer with its default telemetry, or model + optimizer only")
    for name, value in SHAPE.items():
        p.add_argument(f"--{name}", type=int, default=value)
    p.add_argument("--preset", default="small", help="preset for the fields not given above (dropout, lr, ...)")
    p.add_argument("--attention_block", type=int, default=None, help="override bdh_fast's attention row block")
    p.add_argument("--log_train_freq", type=int, default=10, help="ours: steps between telemetry flushes")
    p.add_argument("--steps", type=int, default=None, help="steps per timed block (default --log_train_freq)")
    p.add_argument("--repeats", type=int, default=7, help="timed blocks per side")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per side after the first step")
    p.add_argument("--mem_steps", type=int, default=2, help="steps in each side's memory window")
    p.add_argument("--data", choices=("corpus", "random"), default="corpus")
    p.add_argument("--quick", action="store_true", help="tiny sizes, one block of 2 steps: the harness, no gate")
    p.add_argument("--save", action="store_true", help="file the table and JSON under bench/results/")
    args = p.parse_args(argv)
    if args.quick:
        for name, value in QUICK_SHAPE.items():
            setattr(args, name, value)
        args.log_train_freq, args.repeats, args.warmup, args.mem_steps = 2, 1, 1, 1
    args.steps = args.steps or args.log_train_freq
    for name in ("steps", "repeats", "mem_steps", "log_train_freq", *SHAPE):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.ours == "trainer" and args.steps % args.log_train_freq:
        p.error("--steps must be a multiple of --log_train_freq (every timed block holds the same flushes)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bdh-peer-") as tmp:
        workdir = pathlib.Path(tmp)
        data_path, data_label = corpus_file(args.data, workdir)
        try:
            config = bench_config(
                args.preset, args.device, dtype=args.dtype, data=str(data_path), **{k: getattr(args, k) for k in SHAPE},
                log_backend="tensorboard,jsonl", log_train_freq=args.log_train_freq, eval_freq=0,
                generate_freq=0, probe_freq=0, ckpt_freq=0, progress=False, max_iters=1_000_000,
                log_freq=args.log_train_freq, out_dir=str(workdir / "runs"), run_name="ours")
            device = pick_device(config)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return run(args, config, device, data_path, data_label)


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
    model = ours.trainer.model if args.ours == "trainer" else ours.model
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
    paired = [p / o for p, o in zip(block_s["peer"], block_s["ours"])]
    peak = {name: m["peak_bytes"] for name, m in memory.items()}
    memory_ratio = peak["ours"] / peak["peer"] if peak["peer"] else None
    checks = {"speedup": speedup >= TARGET_SPEEDUP,
              "memory": memory_ratio is not None and memory_ratio <= TARGET_MEMORY,
              "logits": diff is not None and diff <= TARGET_LOGITS}
    mib = {name: f"{b / 2**20:,.1f}" for name, b in peak.items()}
    extra = {"peer": {"speedup": "1.00x", "paired range": "-", "peak MiB": mib["peer"], "memory": "1.00x"},
             "ours": {"speedup": f"{speedup:.2f}x", "paired range": f"{min(paired):.2f}-{max(paired):.2f}x",
                      "peak MiB": mib["ours"], "memory": f"{memory_ratio:.2f}x" if memory_ratio else "n/a"}}
    table = ratio_table(step_s, "peer", tokens_per_step, extra)
    how = ("CPU: torch.profiler profile_memory, highest c10 CPU-allocator total in the window minus its start"
           if device.type == "cpu" else "CUDA: max_memory_allocated in the window minus the allocation at its start")
    verdict = "quick run: harness check only, no gate" if args.quick else (
        f"targets: tokens/s >= {TARGET_SPEEDUP}x peer: {'PASS' if checks['speedup'] else 'FAIL'}; "
        f"peak memory <= {TARGET_MEMORY}x peer: {'PASS' if checks['memory'] else 'FAIL'}; "
        f"logits within {TARGET_LOGITS:g}: {'PASS' if checks['logits'] else 'FAIL' if diff is not None else 'n/a'}")
    notes = [
        "first step, not in the medians: " + ", ".join(f"{name} {s:.1f} s" for name, s in first_s.items()),
        "paired range: per round, peer's block time / ours' block time in the same round (noise indicator)",
        f"ours: {'the Trainer at its default telemetry (eval, samples, probes, checkpoints off)' if args.ours == 'trainer' else 'BareLoop, no telemetry'}; "
        "peer: compiled PeerBDH (reference formulation) + default AdamW, as the reference train.py",
        f"peak memory of {args.mem_steps} training step(s) above the persistent state; {how}",
        f"logits, eager {dtype}, same weights, one batch: max |ours - peer| = "
        + (f"{diff:.2e}" if diff is not None else "n/a (not float32)"),
        f"attention row block: {model.attn.block}; THP_MEM_ALLOC_ENABLE="
        f"{os.environ.get('THP_MEM_ALLOC_ENABLE', 'unset')} (1: c10 backs large CPU tensors with huge pages)",
        verdict,
    ]
    print_report(table, notes, info)

    record = {
        "bench": "peer", "device": device.type, "dtype": dtype, "ours": args.ours, "preset": config.preset,
        "n_layer": config.n_layer, "n_embd": config.n_embd, "n_head": config.n_head, "mlp_mult": config.mlp_mult,
        "batch_size": config.batch_size, "block_size": config.block_size, "dropout": config.dropout,
        "tokens_per_step": tokens_per_step, "steps": args.steps, "repeats": args.repeats, "data": data_label,
        "attention_block": model.attn.block, "thp_mem_alloc": os.environ.get("THP_MEM_ALLOC_ENABLE"),
        "peer_ms": median(step_s["peer"]) * 1e3, "ours_ms": median(step_s["ours"]) * 1e3,
        "peer_tokens_per_s": tps["peer"], "ours_tokens_per_s": tps["ours"], "speedup": speedup,
        "paired_range": [min(paired), max(paired)], "compile_s": first_s,
        "peer_peak_bytes": peak["peer"], "ours_peak_bytes": peak["ours"], "memory_ratio": memory_ratio,
        "absolute_peak_bytes": {name: m["absolute_peak_bytes"] for name, m in memory.items()},
        "memory_method": how, "logits_max_abs_diff": diff,
        "targets": {"speedup": TARGET_SPEEDUP, "memory_ratio": TARGET_MEMORY, "logits": TARGET_LOGITS},
        "passed": None if args.quick else checks, "quick": args.quick, "machine": info,
    }
    if args.save:
        text = "\n".join([f"# peer: bdh_fast vs the reference formulation, {shape}, {device.type}, {dtype}", "",
                          f"`{command_line()}`", "", table, "", *(f"- {line}" for line in notes),
                          f"- machine: {machine_line(info)}"])
        for path in save_result("peer", text, record):
            print(f"saved {path}")
    emit_json(record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
