"""Run every benchmark and file one summary.

Each benchmark runs as a subprocess (this Python, cwd the repo root, --quick and --device
forwarded); its last stdout line is its JSON record, whose "verdicts" each script judged against
bench/targets.py. Then:

    bench/results/<YYYY-MM-DD>-<machine-slug>.json   every record, the commands, machine info
    bench/results/<YYYY-MM-DD>-<machine-slug>.md     one table: benchmark, claim, figure, target, verdict

(-2, -3, ... rather than overwriting a same-day file) and the table is printed. Exit status 1, after
writing what it has, when a benchmark crashed or a target FAILED (outside --quick, which gates
nothing); "unresolved" verdicts (noise wider than the target) are reported and do not fail the run.

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
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # bench/ is not a package

from common import RESULTS_DIR, free_stem, machine_info, machine_line, machine_slug, markdown_table  # noqa: E402
from records import last_json  # noqa: E402
from targets import FAIL, failed  # noqa: E402

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
    "peer": ("peer.py", [], ("auto", "cpu", "cuda")),
    "ddp": ("ddp.py", [], ("cpu",)),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="every benchmark in its quick mode; result files go to a temp dir unless --save")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="forwarded to each benchmark")
    p.add_argument("--only", default=None, help=f"comma list of benchmarks to run: {', '.join(BENCHES)} "
                                                "(default: all but ddp)")
    p.add_argument("--save", action="store_true", help="--quick: write the result files under bench/results/ anyway")
    p.add_argument("--out_dir", default=None, help="write the result files here (default: bench/results/, "
                                                    "or a temp dir with --quick)")
    p.add_argument("--update_readme", action="store_true",
                   help=f"replace the block between {BEGIN} and {END} in README.md with the summary table")
    p.add_argument("--timeout", type=float, default=None, help="seconds per benchmark (default: none)")
    args = p.parse_args(argv)
    names = [n for n in BENCHES if n != "ddp"] if args.only is None else [n.strip() for n in args.only.split(",") if n.strip()]
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
    err_lines = [line for line in proc.stderr.strip().splitlines() if line.strip() and not line.startswith("USDT:")]
    last_err = err_lines[-1].strip() if err_lines else ""
    lines = proc.stdout.strip().splitlines()
    record = last_json(lines[-1]) if lines else None  # the last line, and only it, is the record
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
# The summary: one row per verdict each benchmark put in its record
# ---------------------------------------------------------------------------------------------


def cell(text: str, limit: int = 300) -> str:
    return str(text)[:limit].replace("|", "\\|").replace("\n", " ")


def summary_rows(entries: list[dict], quick: bool) -> list[list[str]]:
    rows = []
    for entry in entries:
        if not entry["ok"]:
            rows.append([entry["name"], "-", "-", "-", cell(f"FAILED: {entry['error']}")])
            continue
        verdicts = entry["record"].get("verdicts")
        if not verdicts:
            rows.append([entry["name"], "(no target: figures in the record)", "-", "-", "reported"])
        for v in verdicts or []:
            verdict = v["verdict"] + (" (quick: no gate)" if quick and v["verdict"] in ("PASS", "GOAL", FAIL) else "")
            rows.append([entry["name"], cell(v["claim"]), cell(v["figure"]), cell(v["target_text"]), verdict])
    return rows


def failed_targets(entries: list[dict]) -> list[str]:
    """'bench: claim' for every FAIL verdict outside --quick."""
    return [f"{e['name']}: {v['claim']}" for e in entries if e["ok"] for v in failed(e["record"].get("verdicts") or [])]


def summary_text(entries: list[dict], info: dict, quick: bool) -> str:
    table = markdown_table(["benchmark", "claim", "figure", "target", "verdict"], summary_rows(entries, quick))
    lines = [table, "", f"Machine: {machine_line(info)}", f"Date: {info['date'][:10]}"]
    if quick:
        lines.append("Quick run (tiny sizes, one repeat): checks the harnesses; the figures are not measurements.")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Files and README
# ---------------------------------------------------------------------------------------------


def result_paths(out_dir: pathlib.Path, info: dict) -> tuple[pathlib.Path, pathlib.Path]:
    stem = free_stem(out_dir, f"{info['date'][:10]}-{machine_slug(info)}")
    return stem.with_name(stem.name + ".json"), stem.with_name(stem.name + ".md")


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
    crashed = [e["name"] for e in entries if not e["ok"]]
    missed = [] if args.quick else failed_targets(entries)  # --quick gates nothing
    json_path.write_text(json.dumps({
        "bench": "run_all", "quick": args.quick, "device": args.device, "benchmarks": args.names,
        "failed": crashed, "failed_targets": missed, "seconds": time.perf_counter() - started, "machine": info, "results": entries,
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
    if crashed:
        print(f"FAILED: {', '.join(crashed)}", file=sys.stderr)
    if missed:
        print("target FAILED: " + "; ".join(missed), file=sys.stderr)
    return 1 if crashed or missed else 0


if __name__ == "__main__":
    sys.exit(main())
