"""`python bench/overhead.py --matrix`: what each telemetry setting costs, each row against the same
bare loop (bench/overhead.py's variants and flags).

Rows over --log_train_freq 1, 10, 100 (full telemetry at its defaults otherwise; log_freq rounded up
to a multiple of the row's log_train_freq, so console lines do not flush its window early), then one
feature at a time at --log_train_freq 10 on top of TensorBoard + JSONL with NVML off: backends none
(console only), jsonl, tensorboard, tensorboard,jsonl (the default), wandb (offline, under the temp
dir; skipped with the reason if it cannot start), grad_clip 1.0, probes (probe_freq = the row's
block length: one probe per timed block) and NVML (nvml_interval 2; n/a on CPU). Each row is a
`Full` variant (the real Trainer) timed against the same `bare` loop: by default every row and
bare round-robin in one `interleaved` call (--schedule all), or bare + one row at a time
(--schedule pairwise: one row's Trainer in memory at a time). Each row's block holds a whole number
of its flush windows (the log_train_freq 100 row runs blocks of 100 steps); per-step medians,
overhead % vs bare with its paired range, and the verdict of bench/targets.py's `overhead_row`
(<= 5%, goal 1%; unresolved when the paired range is wider than 5 points). The last stdout line is
one JSON object {"bench": "overhead_matrix", "rows": [...], ...}.

    python bench/overhead.py --matrix                 # small on CPU, reference on CUDA
    python bench/overhead.py --matrix --quick         # tiny, 10-step blocks, 1 repeat, no ranges: harness check
    python bench/overhead.py --matrix --preset reference --allow_slow   # reference on CPU: hours
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import pathlib
import re
import sys
import tempfile

import torch
from common import (bench_config, configure_device, corpus_file, finish, interleaved, judge, machine_info,
                    markdown_table, median, paired_pct, span, timed_once)
from overhead import Bare, Full, telemetry_ranges_ms

from bdh_fast.config import RunConfig
from bdh_fast.errors import UserError
from bdh_fast.train import pick_device, pick_dtype

MATRIX_LOG_TRAIN_FREQS = (1, 10, 100)
MATRIX_BACKENDS = ("none", "jsonl", "tensorboard", "tensorboard,jsonl", "wandb")
MATRIX_CLIP = 1.0
MATRIX_NVML_S = 2.0
DEFAULTS = {"log_backend": "tensorboard,jsonl", "grad_clip": 0.0, "probe_freq": 0, "nvml_interval": 2.0}


def matrix_rows(args: argparse.Namespace, preset_log_freq: int) -> list[dict]:
    """The rows: name, the RunConfig fields that make the row, and its block length (a whole number
    of its flush windows). Every row shares eval/samples/checkpoints off, like the default `full`."""
    rows = []

    def add(name: str, ltf: int, **fields) -> None:
        steps = -(-args.steps // ltf) * ltf  # args.steps rounded up to a multiple of ltf
        fields = {**DEFAULTS, "grad_clip": args.grad_clip, **fields, "log_train_freq": ltf,
                  "log_freq": -(-preset_log_freq // ltf) * ltf}
        if fields.pop("probe_per_block", False):
            fields["probe_freq"] = steps
        rows.append({"row": name, "fields": fields, "steps": steps})

    for ltf in MATRIX_LOG_TRAIN_FREQS:
        add(f"log_train_freq {ltf}", ltf)
    ltf = args.log_train_freq
    for backend in MATRIX_BACKENDS:
        add(f"backend {backend}" + (" (default)" if backend == DEFAULTS["log_backend"] else ""), ltf,
            log_backend=backend, nvml_interval=0.0)
    add(f"grad_clip {MATRIX_CLIP:g}", ltf, nvml_interval=0.0, grad_clip=MATRIX_CLIP)
    add("probes", ltf, nvml_interval=0.0, probe_per_block=True)
    add(f"nvml {MATRIX_NVML_S:g} s", ltf, nvml_interval=MATRIX_NVML_S)
    return rows


def settings_text(fields: dict, device: torch.device) -> str:
    nvml = fields["nvml_interval"]
    return (f"ltf {fields['log_train_freq']}, log_freq {fields['log_freq']}, {fields['log_backend']}, "
            f"clip {fields['grad_clip']:g}, probe_freq {fields['probe_freq'] or 'off'}, "
            f"nvml {f'{nvml:g} s' if nvml else 'off'}{' (inactive on CPU)' if nvml and device.type == 'cpu' else ''}")


def build_row(row: dict, base: dict, device: torch.device, workdir: pathlib.Path) -> "Full | None":
    """The row's Full variant, or None with row["status"] / row["reason"] set (skipped, n/a)."""
    fields = row["fields"]
    if row["row"].startswith("nvml") and device.type != "cuda":
        row.update(status="n/a", reason="n/a on CPU (NVML samples GPUs only)")
        return None
    if "wandb" in fields["log_backend"]:
        (workdir / "wandb").mkdir(exist_ok=True)
        os.environ["WANDB_DIR"] = str(workdir / "wandb")
        os.environ["WANDB_SILENT"] = "true"
        fields = {**fields, "wandb_mode": "offline"}
    err = io.StringIO()
    try:
        config = bench_config(**base, **fields, run_name=re.sub(r"[^a-z0-9]+", "-", row["row"].lower()).strip("-"))
        with contextlib.redirect_stderr(err):
            full = Full(config)
    except Exception as e:  # noqa: BLE001 - a row that cannot start is reported, not fatal
        row.update(status="skipped", reason=f"{type(e).__name__}: {e}".splitlines()[0][:200])
        return None
    failed = list(getattr(full.trainer.telemetry.logger, "failed", []))
    if failed:
        lines = [line for line in err.getvalue().splitlines() if "could not start" in line] or [f"{failed} failed"]
        full.close()
        row.update(status="skipped", reason=lines[0].removeprefix("warning: ")[:200])
        return None
    sys.stderr.write(err.getvalue())
    row["status"] = "ok"
    return full


def prepare_row(full: "Full", row: dict, warmup: int, device: torch.device) -> None:
    """First step (compilation, apart), warm-up, steady flush cadence, then one untimed block (a
    probe row's first probe, a backend's first write, land there, not in the medians)."""
    row["first_step_s"] = timed_once(full.first_step, device)
    full.steps(warmup)
    row["aligned_steps"] = full.align()
    full.steps(row["steps"])
    full.settle()


def matrix_main(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="bdh-bench-matrix-") as tmp:
        workdir = pathlib.Path(tmp)
        data_path, data_label = corpus_file(args.data)
        base = dict(preset=args.preset, device=args.device, dtype=args.dtype, data=str(data_path),
                    compile=args.compile, eval_freq=0, generate_freq=0, ckpt_freq=0, progress=False,
                    max_iters=1_000_000, out_dir=str(workdir / "runs"))
        try:
            config = bench_config(**base, log_backend="none", run_name="bare")
            device = pick_device(config)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if config.preset == "reference" and device.type == "cpu" and not args.allow_slow:
            print("error: the reference preset is for GPUs (hours per matrix on a CPU); use --preset small or tiny, "
                  "or pass --allow_slow", file=sys.stderr)
            return 2
        return run_matrix(args, config, base, device, data_path, data_label, workdir)


def run_matrix(args, config: RunConfig, base: dict, device: torch.device, data_path: pathlib.Path,
               data_label: str, workdir: pathlib.Path) -> int:
    dtype = pick_dtype(config, device)
    repeats = args.repeats or (10 if device.type == "cuda" else 7)
    configure_device(device)
    info = machine_info()
    rows = matrix_rows(args, config.log_freq)
    schedule = ("bare and every row round-robin in one interleaved call" if args.schedule == "all"
                else "bare + one row at a time (one row's Trainer in memory at a time)")
    print(f"overhead matrix: preset {config.preset} (L{config.n_layer} D{config.n_embd} H{config.n_head} "
          f"m{config.mlp_mult}, B{config.batch_size} T{config.block_size}), {device.type}, {dtype}, "
          f"compile {'on' if config.compile else 'off'}, {data_label}; {len(rows)} rows, {repeats} repeats of "
          f"{args.steps}-step blocks (whole flush windows per row); schedule: {schedule}", flush=True)

    bare = Bare(config, device, dtype, data_path)
    bare_first_s = timed_once(bare.first_step, device)
    bare.steps(args.warmup)
    bare_fn = {"bare": lambda: bare.steps(args.steps)}
    bare_s: dict[str, list[float]] = {}  # row -> bare's per-step samples it is compared with
    row_s: dict[str, list[float]] = {}

    def measure(batch: list[tuple[dict, "Full"]]) -> None:
        fns = {**bare_fn, **{row["row"]: (lambda f=full, n=row["steps"]: f.steps(n)) for row, full in batch}}
        block_s = interleaved(fns, repeats, warmup=0, device=device,
                              settle={row["row"]: full.settle for row, full in batch})
        for row, full in batch:
            bare_s[row["row"]] = [t / args.steps for t in block_s["bare"]]
            row_s[row["row"]] = [t / row["steps"] for t in block_s[row["row"]]]
            if not args.no_ranges:
                ranges = telemetry_ranges_ms(full, row["steps"])
                row["telemetry_ranges_ms"] = ranges

    def close_row(row: dict, full: "Full") -> None:
        row["steps_run"] = full.step
        jsonl = full.trainer.run_dir / "metrics.jsonl"
        full.close()
        row["steps_logged"] = (sum('"train/loss"' in line for line in jsonl.read_text().splitlines())
                               if jsonl.exists() else 0)

    try:
        if args.schedule == "all":
            batch = []
            try:
                for row in rows:
                    full = build_row(row, base, device, workdir)
                    if full is not None:
                        batch.append((row, full))
                        prepare_row(full, row, args.warmup, device)
                print("first step (compilation included, not in the medians): "
                      + ", ".join([f"bare {bare_first_s:.1f} s"]
                                  + [f"{r['row']} {r['first_step_s']:.1f} s" for r, _ in batch]), flush=True)
                measure(batch)
            finally:
                for row, full in batch:
                    close_row(row, full)
        else:
            for row in rows:
                full = build_row(row, base, device, workdir)
                if full is None:
                    continue
                try:
                    prepare_row(full, row, args.warmup, device)
                    measure([(row, full)])
                finally:
                    close_row(row, full)
                print(f"{row['row']}: done", flush=True)
    finally:
        bare.close()

    bare_ms_all = median([t for samples in bare_s.values() for t in samples]) * 1e3 if bare_s else float("nan")
    table_rows = [["bare", "no telemetry, no host read (BareLoop)", f"{bare_ms_all:.2f}", "-", "-", "-", "-"]]
    verdicts = []
    for row in rows:
        fields = row.pop("fields")
        row["settings"] = settings_text(fields, device)
        row["config"] = fields
        if row["status"] != "ok":
            row.update(median_ms=None, bare_ms=None, overhead_pct=None, verdict=row["status"].upper())
            table_rows.append([row["row"], row["settings"], "-", "-", row["verdict"], row["reason"], "-"])
            continue
        ms, bms = median(row_s[row["row"]]) * 1e3, median(bare_s[row["row"]]) * 1e3
        paired = span(paired_pct(row_s[row["row"]], bare_s[row["row"]]))
        pct = (ms / bms - 1) * 100
        judged = judge("overhead_row", pct, paired=paired, quick=args.quick)
        judged["claim"] = f"{row['row']}: {judged['claim']}"
        verdicts.append(judged)
        ranges = row.get("telemetry_ranges_ms")
        row.update(median_ms=ms, bare_ms=bms, overhead_pct=pct, verdict=judged["verdict"], paired_range_pct=paired,
                   samples_ms=[t * 1e3 for t in row_s[row["row"]]],
                   telemetry_ranges_pct=100 * sum(ranges.values()) / bms if ranges is not None else None)
        table_rows.append([row["row"], row["settings"], f"{ms:.2f}", judged["figure"], row["verdict"],
                           f"{paired[0]:+.1f}..{paired[1]:+.1f}%",
                           "-" if ranges is None else f"{sum(ranges.values()):.3f} ({row['telemetry_ranges_pct']:.2f}%)"])
    table = markdown_table(["row", "settings", "median ms/step", "overhead vs bare", "verdict", "paired range",
                            "telemetry/* ranges ms/step (% of bare)"], table_rows)
    ok = [r for r in rows if r["status"] == "ok"]
    worst = max(ok, key=lambda r: r["overhead_pct"]) if ok else None
    notes = [
        f"schedule: {schedule}" + ("; overhead is against the bare samples of the same interleaved call"
                                   if args.schedule == "pairwise" else ""),
        f"verdicts (bench/targets.py): {verdicts[0]['target_text'] if verdicts else '-'}, unresolved when the paired "
        f"range is wider than the target; {sum(r['verdict'] in ('GOAL', 'PASS') for r in ok)}/{len(ok)} timed rows pass"
        + (f"; worst {worst['row']} {worst['overhead_pct']:+.2f}%" if worst else ""),
        f"blocks: bare {args.steps} steps; each row a whole number of its flush windows "
        "(log_train_freq 100: 100 steps); per-step time = block time / steps; first steps and one untimed "
        "block per row are outside the medians",
        f"feature rows: log_train_freq {args.log_train_freq}, TensorBoard + JSONL, NVML off, one feature changed; "
        "log_train_freq rows: full telemetry at its defaults (NVML 2 s, active on CUDA only)",
        "paired range: per-round overhead vs the bare block of the same round (the noise)",
    ]
    if not args.no_ranges:
        notes.append("telemetry/* ranges: the Trainer's own record_function ranges in one profiled block per row "
                     "(the direct measure, robust to machine noise)")
    record = {
        "bench": "overhead_matrix", "preset": config.preset, "device": device.type, "dtype": dtype,
        "compile": config.compile, "batch_size": config.batch_size, "block_size": config.block_size,
        "tokens_per_step": config.batch_size * config.block_size, "steps": args.steps, "repeats": repeats,
        "schedule": args.schedule, "data": data_label, "bare_ms": bare_ms_all, "bare_first_step_s": bare_first_s,
        "rows": rows, "timed_rows": len(ok), "passing_rows": sum(r["verdict"] in ("GOAL", "PASS") for r in ok),
        "worst_row": worst["row"] if worst else None, "worst_overhead_pct": worst["overhead_pct"] if worst else None,
        "verdicts": verdicts, "quick": args.quick, "machine": info,
    }
    title = f"overhead matrix: telemetry settings vs bare, preset {config.preset}, {device.type}, {dtype}"
    return finish(args, "overhead-matrix", title, table, notes, record, info)
