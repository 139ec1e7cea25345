"""Run every benchmark and file one summary (tracker issue 6, section 2).

Each benchmark runs as a subprocess (this Python, cwd the repo root, --quick and --device
forwarded); its last stdout line is its JSON record. Then:

    bench/results/<YYYY-MM-DD>-<machine-slug>.json   every record, the commands, machine info
    bench/results/<YYYY-MM-DD>-<machine-slug>.md     one table: benchmark, key figure, target, verdict

(-2, -3, ... rather than overwriting a same-day file) and the table is printed. A benchmark that
fails is reported as FAILED with its last stderr line; run_all then exits 1, after writing what it has.

    python bench/run_all.py                              # everything, full size (long)
    python bench/run_all.py --only throughput,stats      # a subset
    python bench/run_all.py --quick                      # every harness in quick mode; files in a temp dir
    python bench/run_all.py --update_readme              # also put the table between README.md's
                                                         # <!-- bench:begin --> and <!-- bench:end -->
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # bench/ is not a package

from common import RESULTS_DIR, machine_info, machine_line, machine_slug, markdown_table  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
README = REPO / "README.md"
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"

# name -> (script, extra arguments, devices its --device accepts)
BENCHES: dict[str, tuple[str, list[str], tuple[str, ...]]] = {
    "throughput": ("throughput.py", [], ("auto", "cpu", "cuda")),
    "overhead": ("overhead.py", [], ("auto", "cpu", "cuda")),
    "overhead_matrix": ("overhead.py", ["--matrix"], ("auto", "cpu", "cuda")),
    "stats": ("stats.py", [], ("auto", "cpu", "cuda")),
    "generate": ("generate.py", [], ("cpu", "cuda")),  # no "auto": its default is the CPU target
    "probes": ("probes.py", [], ("auto", "cpu", "cuda")),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="every benchmark in its quick mode; result files go to a temp dir unless --save")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="forwarded to each benchmark")
    p.add_argument("--only", default=None, help=f"comma list of benchmarks to run: {', '.join(BENCHES)}")
    p.add_argument("--save", action="store_true", help="--quick: write the result files under bench/results/ anyway")
    p.add_argument("--out_dir", default=None, help="write the result files here (default: bench/results/, "
                                                    "or a temp dir with --quick)")
    p.add_argument("--update_readme", action="store_true",
                   help=f"replace the block between {BEGIN} and {END} in README.md with the summary table")
    p.add_argument("--timeout", type=float, default=None, help="seconds per benchmark (default: none)")
    args = p.parse_args(argv)
    names = list(BENCHES) if args.only is None else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCHES]
    if unknown or not names:
        p.error(f"--only: unknown benchmark(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(BENCHES)}")
    args.names = list(dict.fromkeys(names))
    return args


# ---------------------------------------------------------------------------------------------
# Running one benchmark
# ---------------------------------------------------------------------------------------------


def command(name: str, args: argparse.Namespace) -> list[str]:
    script, extra, devices = BENCHES[name]
    cmd = [sys.executable, f"bench/{script}", *extra]
    if args.quick:
        cmd.append("--quick")
    if args.device in devices:
        cmd += ["--device", args.device]
    return cmd


def run_one(name: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = command(name, args)
    shown = " ".join(["python", *cmd[1:]])
    print(f"[{name}] {shown}", flush=True)
    t0 = time.perf_counter()
    entry: dict[str, Any] = {"name": name, "command": shown}
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        entry.update(ok=False, returncode=None, error=f"timed out after {args.timeout:g} s",
                     seconds=time.perf_counter() - t0)
        print(f"[{name}] FAILED: {entry['error']}", flush=True)
        return entry
    entry.update(returncode=proc.returncode, seconds=time.perf_counter() - t0)
    lines = proc.stdout.strip().splitlines()
    err_lines = [line for line in proc.stderr.strip().splitlines() if line.strip() and not line.startswith("USDT:")]
    last_err = err_lines[-1].strip() if err_lines else ""
    record = None
    if lines:
        try:
            record = json.loads(lines[-1])
        except json.JSONDecodeError:
            record = None
    if proc.returncode != 0 or not isinstance(record, dict):
        why = f"exit {proc.returncode}" if proc.returncode != 0 else "last stdout line is not a JSON object"
        entry.update(ok=False, error=f"{why}: {last_err}" if last_err else why,
                     stdout_tail=proc.stdout[-2000:], stderr_tail=proc.stderr[-2000:])
        print(f"[{name}] FAILED ({entry['seconds']:.0f} s): {entry['error']}", flush=True)
        return entry
    entry.update(ok=True, record=record)
    print(f"[{name}] done in {entry['seconds']:.0f} s", flush=True)
    return entry


# ---------------------------------------------------------------------------------------------
# The summary: one row per benchmark (probes: two)
# ---------------------------------------------------------------------------------------------


def fmt(value: Any, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def at_least(value: float | None, target: float) -> str:
    return "n/a" if value is None else "PASS" if value >= target else "FAIL"


def at_most(value: float | None, target: float) -> str:
    return "n/a" if value is None else "PASS" if value <= target else "FAIL"


def rows_throughput(r: dict) -> list[list[str]]:
    return [["throughput", f"compiled {fmt(r.get('speedup'), '.2f')}x eager ({r.get('preset')}, {r.get('device')})",
             ">= 1.3x (CPU, small)", at_least(r.get("speedup"), 1.3)]]


def rows_overhead(r: dict) -> list[list[str]]:
    pct, target = r.get("full_overhead_pct"), r.get("target_full_pct")
    if target is None:
        target = 1.0 if r.get("device") == "cuda" else 3.0
    return [["overhead", f"full telemetry {fmt(pct, '+.2f')}% vs bare ({r.get('preset')}, {r.get('device')}; "
             f"naive {fmt(r.get('naive_overhead_pct'), '+.1f')}%)",
             "<= 3% (CPU, small), <= 1% (GPU, reference)", at_most(pct, target)]]


def rows_matrix(r: dict) -> list[list[str]]:
    timed = [row for row in r.get("rows", []) if row.get("status") == "ok"]
    skipped = [row["row"] for row in r.get("rows", []) if row.get("status") != "ok"]
    worst = r.get("worst_overhead_pct")
    figure = (f"worst row {r.get('worst_row')} {fmt(worst, '+.2f')}%; {r.get('passing_rows')}/{len(timed)} rows <= 5%"
              + (f"; not timed: {', '.join(skipped)}" if skipped else ""))
    return [["overhead matrix", figure, "every row <= 5% (goal 1%)", "n/a" if not timed else at_most(worst, 5.0)]]


def rows_stats(r: dict) -> list[list[str]]:
    n = r.get("speedup_cpu_n")
    return [["stats", f"fused tensor_stats {fmt(r.get('speedup_cpu'), '.2f')}x unfused (CPU, {fmt(n, ',')} elements)",
             ">= 2x at 10M (CPU)", at_least(r.get("speedup_cpu"), 2.0)]]


def rows_generate(r: dict) -> list[list[str]]:
    return [["generate", f"cached decoding {fmt(r.get('speedup'), '.1f')}x full recompute ({r.get('preset')}, "
             f"{r.get('new_tokens')} tokens, {r.get('device')})", ">= 5x (CPU, 256 tokens)",
             at_least(r.get("speedup"), 5.0)]]


def rows_probes(r: dict) -> list[list[str]]:
    on_target = r.get("device") == "cuda" and r.get("preset") == "reference"
    pct = r.get("amortized_pct")
    return [
        ["probes: histograms", f"tensor_stats + add_histogram_raw {fmt(r.get('histogram_speedup'), '.1f')}x "
         f"add_histogram ({r.get('device')})", ">= 10x (CPU)", at_least(r.get("histogram_speedup"), 10.0)],
        ["probes: amortized", f"eval + samples + probes {fmt(pct, '.3f')}% of step time ({r.get('preset')}, "
         f"{r.get('device')})", "<= 2% (GPU, reference)",
         at_most(pct, 2.0) if on_target else "reported (target is GPU, reference)"],
    ]


SUMMARIES: dict[str, Callable[[dict], list[list[str]]]] = {
    "throughput": rows_throughput, "overhead": rows_overhead, "overhead_matrix": rows_matrix,
    "stats": rows_stats, "generate": rows_generate, "probes": rows_probes,
}


def summary_rows(entries: list[dict], quick: bool) -> list[list[str]]:
    rows = []
    for entry in entries:
        if not entry["ok"]:
            rows.append([entry["name"], "-", "-", f"FAILED: {entry['error']}"[:300].replace("|", "\\|")])
            continue
        try:
            made = SUMMARIES[entry["name"]](entry["record"])
        except (KeyError, TypeError, ValueError) as e:
            made = [[entry["name"], f"(record not understood: {type(e).__name__}: {e})", "-", "n/a"]]
        for row in made:
            if quick and row[3] in ("PASS", "FAIL"):
                row[3] += " (quick: no gate)"
            rows.append(row)
    return rows


def summary_text(entries: list[dict], info: dict, quick: bool) -> str:
    table = markdown_table(["benchmark", "key figure", "target", "verdict"], summary_rows(entries, quick))
    lines = [table, "", f"Machine: {machine_line(info)}", f"Date: {info['date'][:10]}"]
    if quick:
        lines.append("Quick run (tiny sizes, one repeat): checks the harnesses; the figures are not measurements.")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Files and README
# ---------------------------------------------------------------------------------------------


def result_paths(out_dir: pathlib.Path, info: dict) -> tuple[pathlib.Path, pathlib.Path]:
    stem = f"{info['date'][:10]}-{machine_slug(info)}"
    suffix, n = "", 1
    while (out_dir / f"{stem}{suffix}.json").exists() or (out_dir / f"{stem}{suffix}.md").exists():
        n += 1
        suffix = f"-{n}"
    return out_dir / f"{stem}{suffix}.json", out_dir / f"{stem}{suffix}.md"


def update_readme(summary: str) -> bool:
    text = README.read_text()
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < 0 or end < start:
        print(f"README.md has no {BEGIN} ... {END} block: left untouched", flush=True)
        return False
    README.write_text(text[:start + len(BEGIN)] + "\n" + summary.rstrip("\n") + "\n" + text[end:])
    print(f"updated the benchmark block in {README}", flush=True)
    return True


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    info = machine_info()
    started = time.perf_counter()
    entries = [run_one(name, args) for name in args.names]

    if args.out_dir is not None:
        out_dir = pathlib.Path(args.out_dir)
    elif args.quick and not args.save:
        out_dir = pathlib.Path(tempfile.mkdtemp(prefix="bdh-bench-run-all-"))
    else:
        out_dir = RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = result_paths(out_dir, info)
    summary = summary_text(entries, info, args.quick)
    failed = [e["name"] for e in entries if not e["ok"]]
    json_path.write_text(json.dumps({
        "bench": "run_all", "quick": args.quick, "device": args.device, "benchmarks": args.names,
        "failed": failed, "seconds": time.perf_counter() - started, "machine": info, "results": entries,
    }, indent=2, default=str) + "\n")
    md_path.write_text("\n".join([f"# Benchmarks{' (quick)' if args.quick else ''}: {info['date'][:10]}", "",
                                  f"`python bench/run_all.py {' '.join(sys.argv[1:] if argv is None else argv)}`",
                                  "", summary, ""]))
    print()
    print(summary)
    print()
    print(f"wrote {json_path}")
    print(f"wrote {md_path}")
    if args.update_readme:
        if args.quick:
            print("--update_readme ignored: quick results do not go into README.md", flush=True)
        else:
            update_readme(summary)
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
