"""Python face of bdh_fast's custom ops: thin wrappers, fake (meta) impls, the pure-PyTorch
references, and the fallback used when the native extension is not built.

At import this module decides once whether `bdh_fast._C` (built from csrc/ by setup.py) loads.
If it does, `torch.ops.bdh_fast.tensor_stats` runs the C++ kernel on CPU (HAS_NATIVE is True).
If not, or if the environment has BDH_FAST_FORCE_FALLBACK=1, it warns once and registers the
pure-PyTorch reference under the same op name, so callers never need to know. On CUDA the op runs
the Triton kernels of bdh_fast/triton_stats.py once they pass a small self-check against the
reference; if triton is missing, a kernel fails, or the check disagrees, the op runs the reference on
CUDA for the rest of the process, with one warning (`_TritonGate`).

## tensor_stats(x, bins) -> (stats, hist)

One pass over x for the statistics, a second for the histogram, no host synchronisation in
between (the histogram's range is read from `stats` where it lies, on x's device).

stats: float64 tensor of STATS_SIZE entries, indexed by STATS_FIELDS:

    0 count      every element, NaN and Inf included (x.numel())
    1 sum        sum of the finite elements
    2 sum_sq     sum of squares of the finite elements
    3 min        smallest finite element
    4 max        largest finite element
    5 nonzero    elements != 0, NaN and Inf included (as torch.count_nonzero)
    6 absmax     max(|min|, |max|): largest finite magnitude
    7 nan_count  NaN elements
    8 inf_count  +Inf and -Inf elements

So NaN and +-Inf never poison a statistic: they are left out of sum, sum_sq, min, max, absmax and
the histogram, and counted in nan_count / inf_count instead. The number of finite elements is
count - nan_count - inf_count. With no finite element (an empty tensor, or all NaN/Inf), sum and
sum_sq are 0, min, max and absmax are NaN, and the histogram is all zero.

hist: int64 tensor of `bins` counts over `bins` equal-width buckets spanning [min, max] of the
finite elements. A finite v goes to bucket floor((v - min) * (bins / (max - min))), computed in
float64 and clamped to bins - 1, so the last bucket includes max (as torch.histc). When
max == min the width is 0 and every finite element goes to bucket 0 (the first). hist.sum() equals
the number of finite elements. The reference, the C++ and the Triton kernels use the same float64
arithmetic, so they agree bucket for bucket (torch.histc, which computes in the input dtype, can
differ by one bucket for values on an edge). One corner: an fp64 input whose range exceeds the
float64 maximum (max - min overflows) puts everything in bucket 0 or the last bucket.

Inputs: fp32, bf16, fp16 or fp64, any shape (non-contiguous inputs are copied contiguous); the
outputs are on x's device. The op is not differentiable (the wrapper detaches x). Every
implementation accumulates sum and sum_sq in float64 (a float32 square overflows above 1.8e19);
they differ only in summation order, so in the last bits (well under 1e-9 of sum(|x|)). The C++
kernel's order is fixed by the data, not the thread count: its results are reproducible bit for bit.
"""

from __future__ import annotations

import os
import warnings

import torch

__all__ = [
    "HAS_NATIVE",
    "STATS_FIELDS",
    "check_cuda_kernels",
    "triton_off_reason",
    "STATS_SIZE",
    "stats_to_dict",
    "tensor_stats",
    "tensor_stats_many",
    "tensor_stats_reference",
]

STATS_FIELDS = ("count", "sum", "sum_sq", "min", "max", "nonzero", "absmax", "nan_count", "inf_count")
STATS_SIZE = len(STATS_FIELDS)
_SCHEMA = "(Tensor x, int bins) -> (Tensor stats, Tensor hist)"  # also in csrc/tensor_stats.cpp
_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _check_args(x: torch.Tensor, bins: int) -> None:
    if x.dtype not in _DTYPES:
        raise TypeError(f"bdh_fast::tensor_stats: expected fp32, bf16, fp16 or fp64, got {x.dtype}")
    if not 1 <= bins < 2**31 - 1:
        raise ValueError(f"bdh_fast::tensor_stats: bins must be in [1, 2**31 - 1), got {bins}")


def tensor_stats_reference(x: torch.Tensor, bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-PyTorch tensor_stats, float64 throughout: the tests' oracle and the fallback kernel.

    Works on any device and makes no host sync; it materialises a few float64 copies of x, so
    it is the slow path for large tensors.
    """
    _check_args(x, bins)
    values = x.detach().reshape(-1).to(torch.float64)  # (N,)
    inf = float("inf")
    finite = torch.isfinite(values)
    any_finite = finite.any()
    nan_count = torch.isnan(values).sum()
    inf_count = torch.isinf(values).sum()
    finite_values = torch.where(finite, values, 0.0)
    # The appended sentinels keep amin/amax defined on an empty tensor.
    lo = torch.cat([torch.where(finite, values, inf), values.new_full((1,), inf)]).amin()
    hi = torch.cat([torch.where(finite, values, -inf), values.new_full((1,), -inf)]).amax()
    lo = torch.where(any_finite, lo, float("nan"))
    hi = torch.where(any_finite, hi, float("nan"))
    stats = torch.stack([
        values.new_tensor(values.numel()),
        finite_values.sum(),
        (finite_values * finite_values).sum(),
        lo,
        hi,
        torch.count_nonzero(values).to(torch.float64),
        torch.maximum(-lo, hi),
        nan_count.to(torch.float64),
        inf_count.to(torch.float64),
    ])  # (STATS_SIZE,)

    # Same arithmetic, in the same order, as the kernels: see the module docstring.
    has_width = hi > lo
    # bins / (max - min), correctly rounded. Not `bins / tensor`: dividing by a 0-d CPU tensor is
    # done as a multiply by its reciprocal, one ulp off at times, which moves values on an edge.
    spread = torch.where(has_width, hi - lo, 1.0).reshape(1)  # (1,)
    scale = torch.where(has_width, (values.new_full((1,), float(bins)) / spread)[0], 0.0)
    last = float(bins - 1)
    pos = (values - lo) * scale  # (N,)
    pos = torch.where(pos < last, pos, last)
    bucket = torch.where(finite, torch.where(finite, pos, 0.0).to(torch.int64), bins)  # (N,) bins = discard
    # scatter_add rather than bincount: bincount reads its output size back to the host on CUDA.
    counts = torch.zeros(bins + 1, dtype=torch.int64, device=values.device)
    hist = counts.scatter_add_(0, bucket, torch.ones_like(bucket))[:bins].clone()  # (bins,)
    return stats, hist


def _fake_tensor_stats(x: torch.Tensor, bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    return x.new_empty(STATS_SIZE, dtype=torch.float64), x.new_empty(bins, dtype=torch.int64)


class _TritonGate:
    """Serves `tensor_stats` on CUDA with the Triton kernels while they prove right, else the reference.

    A Triton kernel that fails to import, compile or run, or whose result on a small self-check
    disagrees with the pure-PyTorch reference, switches the op to the reference for the rest of the
    process, with one warning naming the reason (DESIGN.md invariant 9: an optional part never ends
    a run). The decision is made once per kernel variant (device, dtype, histogram path), at its
    first use, and never revisited. That first use reads one flag back to the host (the self-check's
    verdict): a one-time sync, which `check_cuda_kernels` lets a trainer pay at start-up instead of
    at its first probe step.
    """

    SELF_CHECK_NUMEL = 20_000  # two Triton programs (16K elements each), NaN/Inf included
    TL_HISTOGRAM_MAX_BINS = 1024  # as bdh_fast.triton_stats.MAX_TL_HISTOGRAM_BINS: another code path above

    def __init__(self) -> None:
        self.kernel = None  # bdh_fast.triton_stats.triton_tensor_stats, once imported
        self.off_reason: str | None = None
        self.checked: set[tuple] = set()

    def __call__(self, x: torch.Tensor, bins: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.off_reason is None:
            try:
                if self.kernel is None:
                    self.kernel = _import_triton_kernel()
                self._check(x.device, x.dtype, bins)
                return self.kernel(x, bins)
            except Exception as e:  # import, compile, launch, or a wrong self-check
                self.disable(f"{type(e).__name__}: {' '.join(str(e).split())[:300]}")
        return tensor_stats_reference(x, bins)

    def _check(self, device: torch.device, dtype: torch.dtype, bins: int) -> None:
        key = (device, dtype, bins > self.TL_HISTOGRAM_MAX_BINS)
        if key in self.checked:
            return
        generator = torch.Generator().manual_seed(0)
        probe = torch.randn(self.SELF_CHECK_NUMEL, generator=generator).mul_(3.0)
        probe[::997] = float("nan")
        probe[5::1009] = float("inf")
        probe[7::1013] = float("-inf")
        probe[11::101] = 0.0
        probe = probe.to(device=device, dtype=dtype)  # (SELF_CHECK_NUMEL,)
        check_bins = bins if bins <= self.TL_HISTOGRAM_MAX_BINS else self.TL_HISTOGRAM_MAX_BINS + 1
        stats, hist = self.kernel(probe, check_bins)
        ref_stats, ref_hist = tensor_stats_reference(probe, check_bins)
        exact = [0, 3, 4, 5, 6, 7, 8]  # counts and extremes agree bit for bit; sums to summation order
        same_exact = torch.equal(stats[exact].nan_to_num(-1.0), ref_stats[exact].nan_to_num(-1.0))
        l1 = probe.double().nan_to_num(0.0, 0.0, 0.0).abs().sum()
        close_sums = ((stats[1:3] - ref_stats[1:3]).abs() <= 1e-9 * (l1 + ref_stats[2]) + 1e-12).all()
        if not (same_exact and bool(close_sums) and torch.equal(hist, ref_hist)):  # SYNC POINT (once per variant)
            raise RuntimeError(f"self-check on {self.SELF_CHECK_NUMEL} {dtype} values with {check_bins} bins "
                               "disagrees with the reference")
        self.checked.add(key)

    def disable(self, reason: str) -> None:
        if self.off_reason is not None:
            return
        self.off_reason = reason
        warnings.warn(f"bdh_fast: Triton tensor_stats off ({reason}); tensor_stats runs the pure-PyTorch "
                      "reference on CUDA for the rest of the run", RuntimeWarning, stacklevel=3)


def _import_triton_kernel():
    try:
        from bdh_fast.triton_stats import triton_tensor_stats  # triton is imported here, lazily
    except ImportError as e:  # triton is an optional extra
        raise ImportError(f"triton is not importable ({e})") from e
    return triton_tensor_stats


_TRITON = _TritonGate()


def _cuda_tensor_stats(x: torch.Tensor, bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _TRITON(x, bins)


def check_cuda_kernels(device: torch.device | str, dtypes: tuple[torch.dtype, ...], bins: int) -> str | None:
    """Decide now, not at the first probe, whether Triton serves tensor_stats on `device` for these
    dtypes (one small self-check each; a sync). Returns the reason Triton is off, or None."""
    for dtype in dtypes:
        tensor_stats(torch.zeros(1, device=device, dtype=dtype), bins)
    return _TRITON.off_reason


def triton_off_reason() -> str | None:
    """Why tensor_stats runs the reference on CUDA (None while the Triton kernels serve it)."""
    return _TRITON.off_reason


def _load_native() -> bool:
    """Decides, once, whether the C++ kernel serves the op on CPU; warns once if not."""
    if os.environ.get("BDH_FAST_FORCE_FALLBACK") == "1":
        reason = "BDH_FAST_FORCE_FALLBACK=1"
    else:
        try:
            import bdh_fast._C  # noqa: F401  (loading it registers the op)

            return True
        except ImportError as e:
            reason = f"{type(e).__name__}: {e}"
    warnings.warn(
        f"bdh_fast: native extension not used ({reason}); tensor_stats runs the pure-PyTorch "
        "reference on CPU (build it with `pip install --no-build-isolation -e .`)",
        RuntimeWarning,
        stacklevel=2,
    )
    torch.library.define("bdh_fast::tensor_stats", _SCHEMA)
    torch.library.register_kernel("bdh_fast::tensor_stats", "cpu", tensor_stats_reference)
    return False


HAS_NATIVE: bool = _load_native()
torch.library.register_fake("bdh_fast::tensor_stats", _fake_tensor_stats)
torch.library.register_kernel("bdh_fast::tensor_stats", "cuda", _cuda_tensor_stats)


def tensor_stats(x: torch.Tensor, bins: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused statistics and histogram of x: `(stats, hist)`, both on x's device, no host sync.

    See the module docstring for the fields of `stats` and the NaN/Inf/empty rules.
    """
    _check_args(x, bins)
    return torch.ops.bdh_fast.tensor_stats(x.detach(), bins)


def tensor_stats_many(tensors: list[torch.Tensor], bins: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """tensor_stats of each tensor, stacked: `(stats (T, STATS_SIZE), hist (T, bins))`.

    A loop over the op. A call costs ~6 us beyond its work on CPU (measured: 24 tensors of 1K
    elements take 0.11 ms looped), against milliseconds of work for the activation tensors probes
    pass, so a fused multi-tensor kernel would not pay. All tensors must be on one device.
    """
    results = [tensor_stats(t, bins) for t in tensors]
    return torch.stack([s for s, _ in results]), torch.stack([h for _, h in results])


def stats_to_dict(stats: torch.Tensor) -> dict[str, float]:
    """Host copy of a `stats` tensor as {field: value}. A sync point: call it where syncs are allowed."""
    values = stats.detach().to("cpu", torch.float64).tolist()  # sync point: one device->host copy
    if len(values) != STATS_SIZE:
        raise ValueError(f"expected a stats tensor of {STATS_SIZE} entries, got {len(values)}")
    return dict(zip(STATS_FIELDS, values))
