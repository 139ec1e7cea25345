"""Data-parallel scaling on CPU: tokens/s of `python -m bdh_fast.train` under torchrun with 1 and 2
ranks (Gloo), same per-rank batch, so 2 ranks process twice the tokens per step. Reported, not a
gate: on a 2-core machine the ranks share the cores (each gets OMP_NUM_THREADS = cores / ranks).

    python bench/ddp.py [--preset small] [--max_iters 40] [--save]

Each configuration runs `--repeats` times, alternating (1, 2, 1, 2, ...); tokens/s is the median of
perf/tokens_per_sec over each run's steps after the first (the first holds compilation). The last
line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is not a package

from common import CORPUS, emit_json, machine_info, machine_line, markdown_table, save_result  # noqa: E402


def run_once(ranks: int, args, workdir: Path, index: int) -> float:
    cores = os.cpu_count() or 1
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // ranks))}
    name = f"r{ranks}-{index}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
           "-m", "bdh_fast.train", "--preset", args.preset, "--max_iters", str(args.max_iters),
           "--data", str(args.data), "--out_dir", str(workdir), "--run_name", name, "--no_progress",
           "--eval_freq", "0", "--generate_freq", "0", "--probe_freq", "0", "--ckpt_freq", "0",
           "--log_backend", "jsonl", "--device", "cpu", *(["--no-compile"] if args.no_compile else [])]
    subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    records = [json.loads(l) for l in (workdir / name / "metrics.jsonl").read_text().splitlines()]
    rates = [r["perf/tokens_per_sec"] for r in records if r.get("perf/tokens_per_sec") and r["step"] > 2]
    return statistics.median(rates)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--max_iters", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--data", default=str(CORPUS))
    parser.add_argument("--no_compile", action="store_true")
    parser.add_argument("--quick", action="store_true", help="tiny preset, 8 steps, no compile, 1 repeat")
    parser.add_argument("--save", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.preset, args.max_iters, args.repeats, args.no_compile = "tiny", 8, 1, True
    info = machine_info()
    results: dict[int, list[float]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory(prefix="bdh-ddp-") as tmp:
        for i in range(args.repeats):
            for ranks in (1, 2):
                results[ranks].append(run_once(ranks, args, Path(tmp), i))
    one, two = statistics.median(results[1]), statistics.median(results[2])
    table = markdown_table(["ranks", "tokens/s (median)", "runs", "scaling"],
                           [[1, f"{one:,.0f}", len(results[1]), "1.00x"],
                            [2, f"{two:,.0f}", len(results[2]), f"{two / one:.2f}x"]])
    text = (f"# DDP scaling, preset {args.preset}, {args.max_iters} steps, compile "
            f"{'off' if args.no_compile else 'on'}\n\n{machine_line(info)}\n\n{table}\n")
    print(text)
    record = {"bench": "ddp", "preset": args.preset, "tokens_per_sec_1": one, "tokens_per_sec_2": two,
              "scaling": two / one, "machine": info}
    if args.save:
        save_result("ddp", text, record)
    emit_json(record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
