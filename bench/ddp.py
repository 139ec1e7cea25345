"""Data-parallel scaling on CPU: tokens/s of `python -m bdh_fast.train` under torchrun with 1 and 2
ranks (Gloo), same per-rank batch, so 2 ranks process twice the tokens per step. Reported, not a
gate: on a 2-core machine the ranks share the cores (each gets OMP_NUM_THREADS = cores / ranks).

    python bench/ddp.py [--preset small] [--max_iters 40] [--no-compile] [--quick] [--save]

Each configuration runs `--repeats` times, alternating (1, 2, 1, 2, ...); tokens/s is the median of
perf/tokens_per_sec over each run's steps after the first (the first holds compilation). The last
line of stdout is one JSON object.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is not a package

from common import bench_parser, corpus_file, finish, machine_info, markdown_table  # noqa: E402


def run_once(ranks: int, args, workdir: Path, index: int) -> float:
    cores = os.cpu_count() or 1
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // ranks))}
    name = f"r{ranks}-{index}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
           "-m", "bdh_fast.train", "--preset", args.preset, "--max_iters", str(args.max_iters),
           "--data", str(args.data), "--out_dir", str(workdir), "--run_name", name, "--no_progress",
           "--eval_freq", "0", "--generate_freq", "0", "--probe_freq", "0", "--ckpt_freq", "0",
           "--log_backend", "jsonl", "--device", "cpu", "--compile" if args.compile else "--no-compile"]
    subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    records = [json.loads(l) for l in (workdir / name / "metrics.jsonl").read_text().splitlines()]
    rates = [r["perf/tokens_per_sec"] for r in records if r.get("perf/tokens_per_sec") and r["step"] > 2]
    return statistics.median(rates)


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser(__doc__, "tiny preset, 8 steps, no compile, 1 repeat", dtype=False, device=("cpu",))
    parser.set_defaults(preset="small")
    parser.add_argument("--max_iters", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    if args.quick:
        args.preset, args.max_iters, args.repeats, args.compile = "tiny", 8, 1, False
    args.data, data_label = corpus_file(args.data)
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
    notes = [f"preset {args.preset}, {args.max_iters} steps, compile {'on' if args.compile else 'off'}, {data_label}; "
             "reported, no target: on a 2-core machine the ranks share the cores"]
    record = {"bench": "ddp", "preset": args.preset, "tokens_per_sec_1": one, "tokens_per_sec_2": two,
              "scaling": two / one, "verdicts": [], "quick": args.quick, "machine": info}
    return finish(args, "ddp", f"DDP scaling, preset {args.preset}", table, notes, record, info)


if __name__ == "__main__":
    sys.exit(main())
