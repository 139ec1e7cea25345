"""Triton kernels behind `bdh_fast::tensor_stats` on CUDA (the rules live in bdh_fast/ops.py).

Three launches, no host round trip:

1. `_stats_partials_kernel`: each program reads TILES x BLOCK elements into BLOCK lanes (min/max
   in the input's float width, sums in float64: the same rules as the C++ kernel), tree-reduces
   the lanes and writes one float64 partial per statistic: (7, num_programs). The float64 sums
   cost two fp64 operations per element, well under the memory time on data-centre GPUs.
2. `_stats_finalize_kernel`: one program folds the partials in float64 and writes `stats`.
3. `_hist_kernel`: reads min/max back from `stats` in device memory, buckets its elements with the
   float64 arithmetic the reference uses, counts them with `tl.histogram` into a per-program
   histogram and adds that to `hist` with int64 atomics (integers: the result is deterministic).

Triton versions: torch 2.4-2.11 pin triton 3.0-3.6. `tl.histogram(..., mask=)` exists only from
triton 3.4, so the kernel never passes a mask: elements that must not count go to a padding bucket
(index `bins`) that is never written back. `torch.library.wrap_triton` (torch >= 2.6) is not used
either: the kernels run inside an opaque custom op's CUDA implementation, on real tensors, where a
plain launch is what wrap_triton would do anyway.

`triton_tensor_stats(x, bins)` runs them. It takes CUDA tensors, or CPU tensors when the
environment has TRITON_INTERPRET=1 before triton is imported (that is how the tests run it).
"""

import torch
import triton
import triton.language as tl

BLOCK = 1024  # elements per tile: one vector of lanes
TILES = 16  # tiles per program: 16K elements, so 134M elements make 8K partials
MAX_TL_HISTOGRAM_BINS = 1024  # above this, per-element atomics instead of tl.histogram
_NUM_PARTIAL_ROWS = 7  # sum, sum_sq, min, max, nonzero, nan, nonfinite


@triton.jit
def _stats_partials_kernel(x_ptr, partials_ptr, numel, num_programs,
                           ACC: tl.constexpr, BLOCK: tl.constexpr, TILES: tl.constexpr):
    pid = tl.program_id(0)
    lanes = tl.arange(0, BLOCK)
    base = pid.to(tl.int64) * (BLOCK * TILES)
    acc_sum = tl.zeros([BLOCK], tl.float64)  # float64 sums: a float32 square overflows above 1.8e19
    acc_sum_sq = tl.zeros([BLOCK], tl.float64)
    acc_lo = tl.full([BLOCK], float("inf"), ACC)
    acc_hi = tl.full([BLOCK], float("-inf"), ACC)
    acc_nonzero = tl.zeros([BLOCK], tl.int32)
    acc_nan = tl.zeros([BLOCK], tl.int32)
    acc_nonfinite = tl.zeros([BLOCK], tl.int32)
    for tile in range(TILES):
        offs = base + tile * BLOCK + lanes
        in_bounds = offs < numel
        v = tl.load(x_ptr + offs, mask=in_bounds, other=0.0).to(ACC)
        finite = in_bounds & (tl.abs(v) < float("inf"))  # false for NaN, +-Inf and padding
        v_sum = tl.where(finite, v, 0.0).to(tl.float64)
        acc_sum += v_sum
        acc_sum_sq += v_sum * v_sum
        acc_lo = tl.minimum(acc_lo, tl.where(finite, v, float("inf")))
        acc_hi = tl.maximum(acc_hi, tl.where(finite, v, float("-inf")))
        acc_nonzero += (v != 0.0).to(tl.int32)  # NaN counts as non-zero; padding is 0.0
        acc_nan += (v != v).to(tl.int32)
        acc_nonfinite += in_bounds.to(tl.int32) - finite.to(tl.int32)
    out = partials_ptr + pid
    tl.store(out + 0 * num_programs, tl.sum(acc_sum, axis=0))
    tl.store(out + 1 * num_programs, tl.sum(acc_sum_sq, axis=0))
    tl.store(out + 2 * num_programs, tl.min(acc_lo, axis=0).to(tl.float64))
    tl.store(out + 3 * num_programs, tl.max(acc_hi, axis=0).to(tl.float64))
    tl.store(out + 4 * num_programs, tl.sum(acc_nonzero, axis=0).to(tl.float64))
    tl.store(out + 5 * num_programs, tl.sum(acc_nan, axis=0).to(tl.float64))
    tl.store(out + 6 * num_programs, tl.sum(acc_nonfinite, axis=0).to(tl.float64))


@triton.jit(do_not_specialize=["numel"])
def _stats_finalize_kernel(partials_ptr, stats_ptr, numel, num_partials, BLOCK_P: tl.constexpr):
    offs = tl.arange(0, BLOCK_P)
    acc_sum = tl.zeros([BLOCK_P], tl.float64)
    acc_sum_sq = tl.zeros([BLOCK_P], tl.float64)
    acc_lo = tl.full([BLOCK_P], float("inf"), tl.float64)
    acc_hi = tl.full([BLOCK_P], float("-inf"), tl.float64)
    acc_nonzero = tl.zeros([BLOCK_P], tl.float64)  # counts < 2**53 are exact in float64
    acc_nan = tl.zeros([BLOCK_P], tl.float64)
    acc_nonfinite = tl.zeros([BLOCK_P], tl.float64)
    for start in range(0, num_partials, BLOCK_P):
        idx = start + offs
        m = idx < num_partials
        acc_sum += tl.load(partials_ptr + 0 * num_partials + idx, mask=m, other=0.0)
        acc_sum_sq += tl.load(partials_ptr + 1 * num_partials + idx, mask=m, other=0.0)
        acc_lo = tl.minimum(acc_lo, tl.load(partials_ptr + 2 * num_partials + idx, mask=m, other=float("inf")))
        acc_hi = tl.maximum(acc_hi, tl.load(partials_ptr + 3 * num_partials + idx, mask=m, other=float("-inf")))
        acc_nonzero += tl.load(partials_ptr + 4 * num_partials + idx, mask=m, other=0.0)
        acc_nan += tl.load(partials_ptr + 5 * num_partials + idx, mask=m, other=0.0)
        acc_nonfinite += tl.load(partials_ptr + 6 * num_partials + idx, mask=m, other=0.0)
    count = numel.to(tl.float64)
    nan_count = tl.sum(acc_nan, axis=0)
    nonfinite = tl.sum(acc_nonfinite, axis=0)
    any_finite = nonfinite < count
    lo = tl.where(any_finite, tl.min(acc_lo, axis=0), float("nan"))
    hi = tl.where(any_finite, tl.max(acc_hi, axis=0), float("nan"))
    tl.store(stats_ptr + 0, count)
    tl.store(stats_ptr + 1, tl.sum(acc_sum, axis=0))
    tl.store(stats_ptr + 2, tl.sum(acc_sum_sq, axis=0))
    tl.store(stats_ptr + 3, lo)
    tl.store(stats_ptr + 4, hi)
    tl.store(stats_ptr + 5, tl.sum(acc_nonzero, axis=0))
    tl.store(stats_ptr + 6, tl.maximum(-lo, hi))  # NaN when there is no finite element
    tl.store(stats_ptr + 7, nan_count)
    tl.store(stats_ptr + 8, nonfinite - nan_count)


@triton.jit(do_not_specialize=["bins"])
def _hist_kernel(x_ptr, stats_ptr, hist_ptr, numel, bins,
                 BLOCK: tl.constexpr, TILES: tl.constexpr, BINS_P2: tl.constexpr, USE_TL_HISTOGRAM: tl.constexpr):
    # The range comes from device memory: no host sync between the passes.
    lo = tl.load(stats_ptr + 3)
    hi = tl.load(stats_ptr + 4)
    bins_f = bins.to(tl.float64)
    # scale = bins / (max - min); 0 when max == min (all in bucket 0) or when there is no finite
    # element (min is NaN; every element is masked out anyway).
    spread = tl.where(hi > lo, hi - lo, 1.0)
    # float64 `/` is IEEE division, correctly rounded like the CPU's (tl.math.div_rn is fp32-only).
    scale = tl.where(hi > lo, bins_f / spread, 0.0)
    last = bins_f - 1.0
    pid = tl.program_id(0)
    lanes = tl.arange(0, BLOCK)
    base = pid.to(tl.int64) * (BLOCK * TILES)
    local = tl.zeros([BINS_P2], tl.int32)
    for tile in range(TILES):
        offs = base + tile * BLOCK + lanes
        in_bounds = offs < numel
        v = tl.load(x_ptr + offs, mask=in_bounds, other=0.0).to(tl.float64)
        counted = in_bounds & (tl.abs(v) < float("inf"))
        pos = (v - lo) * scale
        pos = tl.where(pos < last, pos, last)  # the last bucket holds max (and a NaN from overflow)
        idx = tl.where(counted, pos, 0.0).to(tl.int32)
        if USE_TL_HISTOGRAM:
            # No `mask=` (triton >= 3.4 only): the uncounted go to the padding bucket `bins`.
            local += tl.histogram(tl.where(counted, idx, bins), BINS_P2)
        else:
            tl.atomic_add(hist_ptr + idx, tl.full([BLOCK], 1, tl.int64), mask=counted, sem="relaxed")
    if USE_TL_HISTOGRAM:
        bucket = tl.arange(0, BINS_P2)
        tl.atomic_add(hist_ptr + bucket, local.to(tl.int64), mask=(bucket < bins) & (local > 0), sem="relaxed")


def triton_tensor_stats(x: torch.Tensor, bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs the three kernels; same contract as `bdh_fast.ops.tensor_stats_reference`."""
    if bins < 1:
        raise ValueError(f"bdh_fast::tensor_stats: bins must be >= 1, got {bins}")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        raise TypeError(f"bdh_fast::tensor_stats: expected fp32, bf16, fp16 or fp64, got {x.dtype}")
    flat = x.detach().contiguous().view(-1)  # (numel,)
    numel = flat.numel()
    num_programs = max(1, triton.cdiv(numel, BLOCK * TILES))
    acc = tl.float64 if flat.dtype == torch.float64 else tl.float32
    partials = torch.empty((_NUM_PARTIAL_ROWS, num_programs), dtype=torch.float64, device=flat.device)
    stats = torch.empty(9, dtype=torch.float64, device=flat.device)
    hist = torch.zeros(bins, dtype=torch.int64, device=flat.device)
    grid = (num_programs,)
    _stats_partials_kernel[grid](flat, partials, numel, num_programs,
                                              ACC=acc, BLOCK=BLOCK, TILES=TILES)
    block_p = min(1024, triton.next_power_of_2(num_programs))
    _stats_finalize_kernel[(1,)](partials, stats, numel, num_programs, BLOCK_P=block_p)
    use_tl_histogram = bins <= MAX_TL_HISTOGRAM_BINS
    # tl.histogram wants a power-of-two bin count; bucket `bins` and above are padding, never written back.
    bins_p2 = max(32, triton.next_power_of_2(bins + 1)) if use_tl_histogram else 1
    _hist_kernel[grid](flat, stats, hist, numel, bins,
                                    BLOCK=BLOCK, TILES=TILES, BINS_P2=bins_p2, USE_TL_HISTOGRAM=use_tl_histogram)
    return stats, hist
