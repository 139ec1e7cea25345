"""The GPU proof's checks of the machine, the install and the ops, each run in a child by
`gpu_proof.py --check NAME` and ending its stdout with one JSON record (partial records before it
say how far a check got): the environment (versions, GPU, the extension), the editable install,
the W&B backend offline, the project's CUDA tests, and Triton tensor_stats against the float64
reference and against exact analytic statistics on a tensor of more than 2**31 elements.

The checks that train the model are in bench/proof_runs.py.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import fractions
import math
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from typing import Any, Callable

from proof_harness import PROOF, REPO, emit, last_json, shell


def check_env(a: argparse.Namespace) -> dict:
    """Versions, GPU, the extension, wandb, compilers: what the summary calls the machine."""
    import importlib.metadata
    import importlib.util
    import platform
    import sysconfig

    def version(dist: str) -> str | None:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    env: dict[str, Any] = {"python": platform.python_version(), "cpu_count": os.cpu_count(),
                           "platform": platform.platform(), "executable": sys.executable,
                           "triton_interpret_in_env": os.environ.get("TRITON_INTERPRET")}
    for dist in ("torch", "triton", "tensorboard", "nvidia-ml-py", "numpy", "tqdm", "pytest", "wandb",
                 "setuptools", "pip"):
        env[dist.replace("-", "_")] = version(dist)
    env["wandb"] = env["wandb"] if importlib.util.find_spec("wandb") else None
    env["c_compiler"] = shutil.which("cc") or shutil.which("gcc")
    env["cxx_compiler"] = shutil.which("c++") or shutil.which("g++")
    env["python_h"] = (pathlib.Path(sysconfig.get_paths()["include"]) / "Python.h").exists()
    from common import cpu_model

    env["cpu"] = cpu_model()
    import torch

    env["torch"] = torch.__version__
    env["cuda_available"] = torch.cuda.is_available()
    env["cuda"] = torch.version.cuda
    if env["cuda_available"]:
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=torch.cuda.get_device_name(0), gpu_count=torch.cuda.device_count(),
                   gpu_memory_gib=round(props.total_memory / 2**30, 1), capability=f"{props.major}.{props.minor}",
                   bf16_supported=torch.cuda.is_bf16_supported())
        with contextlib.suppress(Exception):
            import pynvml

            pynvml.nvmlInit()
            driver = pynvml.nvmlSystemGetDriverVersion()
            env["driver"] = driver.decode() if isinstance(driver, bytes) else driver
            pynvml.nvmlShutdown()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import bdh_fast
            from bdh_fast import ops
            from bdh_fast.telemetry.throughput import peak_tflops
    except Exception as e:  # noqa: BLE001 - the versions above still make the record
        env["bdh_fast_error"] = f"{type(e).__name__}: {e}"[:300]
        return env
    env["has_native"] = ops.HAS_NATIVE
    env["native_warning"] = next((str(w.message) for w in caught if "native extension" in str(w.message)), None)
    env["bdh_fast_path"] = str(pathlib.Path(bdh_fast.__file__).parent)
    if env["cuda_available"]:
        env["peak_tflops_bf16"] = peak_tflops(torch.device("cuda"), "bfloat16")
    return env


def check_install(a: argparse.Namespace) -> dict:
    rec: dict[str, Any] = {"check": "install"}
    probe_s = 10.0  # kept for the environment probe (imports torch and bdh_fast)
    end = time.monotonic() + a.budget - 2.0
    if a.dry_run or a.skip_pip:
        rec["pip_skipped"] = ("--dry-run: the project is already installed here" if a.dry_run
                              else "--no-install: the project is taken as installed")
    else:
        rec["pip"] = pip_install([], "pip install --no-build-isolation --no-deps --no-index -e .",
                                 end - probe_s - time.monotonic())
        out = rec["pip"].pop("output")
        if rec["pip"]["rc"] != 0 and end - probe_s - time.monotonic() > 10:
            # Without a compiler or Python headers the extension cannot build: install the package
            # without it (ops falls back to its reference on CPU; CUDA runs Triton either way).
            # A system Python that refuses pip (PEP 668) gets --break-system-packages: it adds
            # bdh_fast only (--no-deps), nothing preinstalled changes.
            extra = ["--break-system-packages"] if "externally-managed" in out else []
            env = {"BDH_FAST_NO_EXT": "1"} if not extra else {}
            how = "retry with " + (" ".join(extra) if extra else "BDH_FAST_NO_EXT=1 (no extension)")
            rec["pip_retry"] = pip_install(extra, how, end - probe_s - time.monotonic(), env)
            rec["pip_retry"].pop("output")
    emit({**rec, "partial": True})
    # A fresh interpreter: the extension (if built just now) is imported after the install.
    try:
        probe = subprocess.run([sys.executable, str(PROOF), "--check", "env", "--work", a.work, "--budget", "30"],
                               cwd=REPO, capture_output=True, text=True, timeout=max(5.0, end - time.monotonic()))
    except subprocess.TimeoutExpired:
        rec["env_error"] = "the environment probe timed out"
        return rec
    sys.stderr.write(probe.stderr[-4000:])
    rec["env"] = last_json(probe.stdout)
    return rec


def pip_install(extra: list[str], how: str, timeout: float, env: dict[str, str] | None = None) -> dict:
    cmd = [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index", *extra, "-e", "."]
    print(f"$ {' '.join(cmd[2:])} (timeout {timeout:.0f} s)", flush=True)
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **(env or {})})
        rc, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        rc, out = None, f"timed out after {timeout:.0f} s\n" + str(e.stdout or "")[-2000:]
    sys.stderr.write(out[-6000:])
    lines = out.strip().splitlines()
    errors = [ln for ln in lines if "error" in ln.lower()]
    error_line = (errors[-1] if errors else lines[-1] if lines else "")[:300] if rc != 0 else ""
    return {"how": how, "rc": rc, "seconds": time.monotonic() - t0, "output": out, "error_line": error_line}


def check_wandb(a: argparse.Namespace) -> dict:
    import importlib.metadata
    import importlib.util

    if importlib.util.find_spec("wandb") is None:
        return {"check": "wandb", "wandb": None}
    work = pathlib.Path(a.work)
    cmd = [sys.executable, "-m", "bdh_fast.train", "--preset", "tiny", "--no-compile", "--device", "cpu",
           "--max_iters", "4", "--log_freq", "2", "--log_backend", "wandb,jsonl", "--wandb_mode", "offline",
           "--eval_freq", "0", "--generate_freq", "0", "--probe_freq", "0", "--nvml_interval", "0",
           "--out_dir", str(work / "runs"), "--run_name", "wandb", "--no_progress"]
    env = {**os.environ, "WANDB_DIR": str(work), "WANDB_SILENT": "true", "WANDB_MODE": "offline"}
    try:
        proc = subprocess.run(cmd, cwd=REPO, stdout=sys.stderr, stderr=subprocess.PIPE, text=True,
                              timeout=max(5.0, a.budget - 5), env=env)
    except subprocess.TimeoutExpired:
        return {"check": "wandb", "wandb": importlib.metadata.version("wandb"), "rc": None,
                "note": f"the tiny W&B run took over {a.budget - 5:.0f} s"}
    sys.stderr.write(proc.stderr[-4000:])
    offline = [p for p in work.rglob("offline-run-*") if p.is_dir()]
    jsonl = work / "runs" / "wandb" / "metrics.jsonl"
    logged = sum('"train/loss"' in ln for ln in jsonl.read_text().splitlines()) if jsonl.exists() else 0
    could_not = [ln for ln in proc.stderr.splitlines() if "could not start" in ln]
    return {"check": "wandb", "wandb": importlib.metadata.version("wandb"), "rc": proc.returncode,
            "offline_runs": len(offline), "steps_logged": logged, "note": could_not[0][:300] if could_not else ""}


PYTEST_FILES = ("tests/test_ops.py", "tests/test_data.py", "tests/test_telemetry.py", "tests/test_profiling.py",
                "tests/test_system.py")


def check_pytest(a: argparse.Namespace) -> dict:
    """The CUDA tests by name (-k cuda also selects the `cuda` marker): some are marked, some only
    named; files that no longer exist are left out rather than failing the whole selection."""
    import xml.etree.ElementTree as ET

    junit = pathlib.Path(a.work) / "junit.xml"
    files = [f for f in PYTEST_FILES if (REPO / f).exists()]
    cmd = [sys.executable, "-m", "pytest", *files, "-k", "cuda", "-p", "no:cacheprovider", "-v", "-rA",
           "--continue-on-collection-errors", f"--junitxml={junit}", "-o", "junit_family=xunit2"]
    print("$ " + shell(cmd), flush=True)
    try:
        proc = subprocess.run(cmd, cwd=REPO, stdout=sys.stderr, stderr=subprocess.STDOUT,
                              timeout=max(5.0, a.budget - 5))
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        rc = None
    rec: dict[str, Any] = {"check": "pytest", "rc": rc, "files": files}
    if not junit.exists():
        rec["error"] = f"pytest wrote no report (exit {rc})"
        return rec
    tests = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed"}.get(child.tag, child.tag)
                message = (child.get("message") or (child.text or "").strip())[:300]
        tests.append({"id": f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}", "outcome": outcome,
                      "message": message, "seconds": float(case.get("time") or 0)})
    rec["tests"] = tests
    return rec


def patterned_case(n: int, device, kernel: Callable, period: int = 64) -> dict:
    """tensor_stats of x[i] = i % period in bf16 (exact), with NaN, +-Inf and new extremes written
    at the end and on both sides of index 2**31 (when n > 2**31), against statistics computed
    exactly in Python: counts, extremes, sums (exact in float64 for these values) and buckets with
    the op's own float64 bucket arithmetic. No float64 copy of a 4 GiB tensor needed."""
    import torch

    from bdh_fast import ops

    x = torch.arange(period, dtype=torch.bfloat16, device=device).repeat(n // period + 1)[:n]  # (n,)
    overrides = {n - 1: math.nan, n - 2: math.inf, n - 3: -math.inf, n - 4: 1000.0, n - 5: -7.0}
    middle = 2**31 if n > 2**31 else n // 2
    overrides.update({middle - 1: 0.5, middle: -0.25})
    for pos, value in overrides.items():
        x[pos] = value
    bins = 64
    full_periods, rem = divmod(n, period)
    finite = collections.Counter({fractions.Fraction(v): full_periods + (v < rem) for v in range(period)})
    nan = inf = 0
    for pos, value in overrides.items():
        finite[fractions.Fraction(pos % period)] -= 1
        if math.isnan(value):
            nan += 1
        elif math.isinf(value):
            inf += 1
        else:
            finite[fractions.Fraction(value)] += 1
    finite = collections.Counter({v: c for v, c in finite.items() if c})
    lo, hi = float(min(finite)), float(max(finite))
    scale = bins / (hi - lo)  # float64, as the kernels: bins / (max - min), correctly rounded
    hist = [0] * bins
    for v, count in finite.items():
        pos = (float(v) - lo) * scale
        hist[int(pos if pos < bins - 1 else bins - 1)] += count
    expected = {"count": n, "sum": float(sum(v * c for v, c in finite.items())),
                "sum_sq": float(sum(v * v * c for v, c in finite.items())), "min": lo, "max": hi,
                "nonzero": n - finite[fractions.Fraction(0)], "absmax": max(-lo, hi), "nan_count": nan,
                "inf_count": inf}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for _ in range(4):
        sync()
        t0 = time.perf_counter()
        stats, got_hist = kernel(x, bins)
        sync()
        times.append(time.perf_counter() - t0)
    got = ops.stats_to_dict(stats)
    problems = [f"{k}: got {got[k]!r}, expected {v!r}" for k, v in expected.items()
                if not (got[k] == v or abs(got[k] - v) <= 1e-12 * abs(v))]
    got_hist = got_hist.cpu().tolist()
    if got_hist != hist:
        diff = [i for i in range(bins) if got_hist[i] != hist[i]]
        problems.append(f"histogram differs in {len(diff)} bucket(s), first {diff[:5]}")
    seconds = statistics.median(times[1:])  # the first call may JIT the kernels
    return {"n": n, "dtype": "bfloat16", "ok": not problems, "problems": problems, "seconds": seconds,
            "gb_per_s": n * 2 / seconds / 1e9 if device.type == "cuda" else None}


def specials_tensor(n: int, dtype, seed: int):
    """randn with NaN, +Inf, -Inf and zeros sprinkled (as tests/test_ops.py's inputs)."""
    import torch

    x = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    if n > 10:
        x[:: max(1, n // 5)] = math.nan
        x[1 :: max(1, n // 3)] = math.inf
        x[2 :: max(1, n // 4)] = -math.inf
        x[3 :: max(1, n // 6)] = 0.0
    return x.to(dtype)


def compare_to_reference(x, bins: int, kernel: Callable) -> str:
    """'' when the op equals the float64 reference: counts, extremes and buckets exactly, sums to
    1e-9 of sum|x| (each implementation sums in float64, in its own order)."""
    import torch

    from bdh_fast import ops

    stats, hist = kernel(x, bins)
    ref_stats, ref_hist = ops.tensor_stats_reference(x, bins)
    got, want = ops.stats_to_dict(stats), ops.stats_to_dict(ref_stats)
    problems = []
    for field in ("count", "min", "max", "nonzero", "absmax", "nan_count", "inf_count"):
        if not (got[field] == want[field] or (math.isnan(got[field]) and math.isnan(want[field]))):
            problems.append(f"{field} {got[field]!r} != {want[field]!r}")
    values = x.detach().double().reshape(-1)
    l1 = values[values.isfinite()].abs().sum().item()
    for field, tol in (("sum", 1e-9 * l1), ("sum_sq", 1e-9 * abs(want["sum_sq"]))):
        if not (got[field] == want[field] or abs(got[field] - want[field]) <= tol + 1e-12):
            problems.append(f"{field} {got[field]!r} != {want[field]!r}")
    if not torch.equal(hist.cpu(), ref_hist.cpu()):
        problems.append(f"histogram differs in {int((hist.cpu() != ref_hist.cpu()).sum())} bucket(s)")
    return "; ".join(problems)


def check_tensor_stats(a: argparse.Namespace) -> dict:
    import torch

    from bdh_fast import ops

    cuda = not a.dry_run
    device = torch.device("cuda" if cuda else "cpu")
    rec: dict[str, Any] = {"check": "tensor_stats", "device": device.type}
    # On CUDA the Triton kernel itself, not the op: the op falls back to the reference (with one
    # warning) when a kernel fails its self-check, and would then agree with it trivially. Whether
    # the op still serves Triton at the end is checked apart (triton_off_reason).
    if cuda:
        from bdh_fast.triton_stats import triton_tensor_stats as kernel

        rec["kernel"] = "triton"
    else:
        kernel = ops.tensor_stats
        rec["kernel"] = "native C++" if ops.HAS_NATIVE else "reference"
    # The one large tensor first: the claim least covered elsewhere.
    n_big = 2**31 + 4099 if cuda else 10_007
    try:
        rec["big"] = patterned_case(n_big, device, kernel)
    except Exception as e:  # noqa: BLE001 - reported; the sweep still runs
        traceback.print_exc()
        rec["big"] = {"n": n_big, "dtype": "bfloat16", "ok": False, "problems": [f"{type(e).__name__}: {e}"[:300]]}
    if cuda:
        torch.cuda.empty_cache()
    emit({**rec, "partial": True})
    sizes = [0, 1, 1000, 1_000_003, 2**24 + 3] if cuda else [0, 1, 1000, 100_003]
    cases = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        for n in sizes:
            x = specials_tensor(n, dtype, seed=n).to(device)
            for bins in (64, 3000):
                try:
                    why = compare_to_reference(x, bins, kernel)
                except Exception as e:  # noqa: BLE001 - a case that raises is a case that fails
                    why = f"{type(e).__name__}: {e}"[:300]
                cases.append({"dtype": str(dtype).removeprefix("torch."), "n": n, "bins": bins, "ok": not why,
                              "why": why})
    rec["cases"] = cases
    if cuda:  # the op itself on each dtype: does it serve the Triton kernels (its gate still on)?
        for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            for bins in (64, 3000):
                ops.tensor_stats(specials_tensor(1000, dtype, seed=1).to(device), bins)
        rec["op_triton_off_reason"] = ops.triton_off_reason()
    return rec
