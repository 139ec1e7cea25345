"""bdh_fast::tensor_stats: the op (C++ kernel, or its fallback) against the pure-PyTorch reference
and against plain torch; the rules for empty, constant and NaN/Inf inputs; opcheck; one
fullgraph compile; the Triton kernels under TRITON_INTERPRET=1 (subprocess); the forced fallback
(subprocess); CUDA when there is one."""

import importlib.util
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

from bdh_fast import ops
from bdh_fast.ops import STATS_FIELDS, STATS_SIZE, stats_to_dict, tensor_stats, tensor_stats_reference

COUNT, SUM, SUM_SQ, MIN, MAX, NONZERO, ABSMAX, NAN_COUNT, INF_COUNT = range(STATS_SIZE)
NAN, INF = float("nan"), float("inf")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def assert_stats_match(x: torch.Tensor, stats: torch.Tensor, hist: torch.Tensor, bins: int) -> None:
    """Checks (stats, hist) of x against the reference: counts, extremes and buckets exactly, sums
    to float64 rounding (every implementation sums in float64, in its own order)."""
    ref_stats, ref_hist = tensor_stats_reference(x, bins)
    assert stats.shape == (STATS_SIZE,) and stats.dtype == torch.float64 and stats.device == x.device
    assert hist.shape == (bins,) and hist.dtype == torch.int64 and hist.device == x.device
    exact = [COUNT, MIN, MAX, NONZERO, ABSMAX, NAN_COUNT, INF_COUNT]
    torch.testing.assert_close(stats[exact], ref_stats[exact], rtol=0, atol=0, equal_nan=True)
    values = x.detach().double().reshape(-1)
    l1 = values[values.isfinite()].abs().sum().item()
    for field, tol in ((SUM, 1e-9 * l1), (SUM_SQ, 1e-9 * ref_stats[SUM_SQ].item())):
        got, want = stats[field].item(), ref_stats[field].item()
        assert got == want or abs(got - want) <= tol + 1e-12, (STATS_FIELDS[field], got, want)  # == for inf
    torch.testing.assert_close(hist, ref_hist, rtol=0, atol=0)


def inputs_with_specials(n: int, dtype: torch.dtype) -> torch.Tensor:
    x = torch.randn(n, dtype=torch.float64)
    x[:: max(1, n // 5)] = NAN
    x[1 :: max(1, n // 3)] = INF
    x[2 :: max(1, n // 4)] = -INF
    x[3 :: max(1, n // 6)] = 0.0
    return x.to(dtype)


# --- the reference against plain torch -------------------------------------------------------


def test_reference_matches_plain_torch():
    x = torch.randn(10_000) * 3 + 1
    stats, hist = tensor_stats_reference(x, 32)
    d = stats_to_dict(stats)
    xd = x.double()
    assert d["count"] == d["nonzero"] == 10_000 and d["nan_count"] == d["inf_count"] == 0
    assert d["min"] == x.min().item() and d["max"] == x.max().item()
    assert d["absmax"] == x.abs().max().item()
    assert d["sum"] == pytest.approx(xd.sum().item(), rel=1e-12)
    assert d["sum_sq"] == pytest.approx((xd * xd).sum().item(), rel=1e-12)
    assert hist.sum().item() == 10_000
    # torch.histc buckets in fp32, so a value on an edge may move by one bucket.
    histc = torch.histc(x, 32, x.min().item(), x.max().item()).long()
    assert (hist - histc).abs().sum().item() <= 4


def test_reference_rules_for_nan_inf():
    x = torch.tensor([1.0, NAN, -2.0, INF, -INF, 0.0, 4.0])
    stats, hist = tensor_stats_reference(x, 4)
    assert stats_to_dict(stats) == {
        "count": 7.0, "sum": 3.0, "sum_sq": 21.0, "min": -2.0, "max": 4.0,
        "nonzero": 6.0, "absmax": 4.0, "nan_count": 1.0, "inf_count": 2.0,
    }
    # width 1.5: -2 -> 0, 0 -> 1, 1 -> 2, 4 (= max) -> 3
    assert hist.tolist() == [1, 1, 1, 1]


# --- the op (native kernel, or the reference when the extension is missing) --------------------


def test_native_extension_is_used_when_built():
    built = importlib.util.find_spec("bdh_fast._C") is not None
    forced = os.environ.get("BDH_FAST_FORCE_FALLBACK") == "1"
    assert ops.HAS_NATIVE == (built and not forced)
    assert hasattr(torch.ops.bdh_fast, "tensor_stats")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(), (1,), (7,), (33, 65), (3, 4097), (65537,), (2, 3, 5, 7)], ids=str)
def test_op_matches_reference(dtype, shape):
    x = (torch.randn(shape) * 10).to(dtype)
    assert_stats_match(x, *tensor_stats(x, 64), 64)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_op_matches_reference_with_nan_and_inf(dtype):
    x = inputs_with_specials(10_007, dtype)
    stats, hist = tensor_stats(x, 50)
    assert_stats_match(x, stats, hist, 50)
    d = stats_to_dict(stats)
    finite = x.isfinite()
    assert d["nan_count"] == x.isnan().sum().item() and d["inf_count"] == x.isinf().sum().item()
    assert d["min"] == x[finite].min().item() and d["max"] == x[finite].max().item()
    assert d["nonzero"] == torch.count_nonzero(x).item()
    assert hist.sum().item() == finite.sum().item() == d["count"] - d["nan_count"] - d["inf_count"]


def test_op_on_one_million_fp32():
    x = torch.randn(1_000_003) * 5 - 2
    stats, hist = tensor_stats(x, 128)
    assert_stats_match(x, stats, hist, 128)
    d = stats_to_dict(stats)
    xd = x.double()
    assert d["sum"] == pytest.approx(xd.sum().item(), abs=1e-9 * xd.abs().sum().item())
    assert d["sum_sq"] == pytest.approx((xd * xd).sum().item(), rel=1e-9)
    assert (d["min"], d["max"]) == tuple(v.item() for v in torch.aminmax(x))


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.randn(64, 96).t(),  # transposed
        lambda: torch.randn(1000)[::3],  # strided
        lambda: torch.randn(8, 9, 10).permute(2, 0, 1)[:, 1:, ::2],
        lambda: torch.randn(5, 1).expand(5, 300),  # stride 0
    ],
    ids=["transposed", "strided", "permuted-sliced", "expanded"],
)
def test_op_on_non_contiguous_inputs(make):
    x = make()
    assert not x.is_contiguous()
    stats, hist = tensor_stats(x, 16)
    assert_stats_match(x, stats, hist, 16)
    torch.testing.assert_close(stats, tensor_stats(x.contiguous(), 16)[0], rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(0,), (3, 0), (0, 5, 2)], ids=str)
def test_empty_input(shape):
    stats, hist = tensor_stats(torch.empty(shape), 8)
    d = stats_to_dict(stats)
    assert (d["count"], d["sum"], d["sum_sq"], d["nonzero"], d["nan_count"], d["inf_count"]) == (0,) * 6
    assert all(d[k] != d[k] for k in ("min", "max", "absmax"))  # NaN: undefined without elements
    assert hist.tolist() == [0] * 8


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_all_equal_values_go_to_the_first_bucket(dtype):
    x = torch.full((5000,), -1.5, dtype=dtype)
    stats, hist = tensor_stats(x, 10)
    assert_stats_match(x, stats, hist, 10)
    d = stats_to_dict(stats)
    assert (d["min"], d["max"], d["absmax"], d["sum"]) == (-1.5, -1.5, 1.5, -7500.0)
    assert hist.tolist() == [5000] + [0] * 9


def test_all_zero():
    stats, hist = tensor_stats(torch.zeros(3, 1000), 4)
    d = stats_to_dict(stats)
    assert (d["count"], d["nonzero"], d["sum"], d["min"], d["max"], d["absmax"]) == (3000, 0, 0, 0, 0, 0)
    assert hist.tolist() == [3000, 0, 0, 0]


@pytest.mark.parametrize(
    "values",
    [[NAN] * 5, [INF, -INF, INF], [NAN, INF, NAN]],
    ids=["all-nan", "all-inf", "nan-and-inf"],
)
def test_no_finite_element(values):
    x = torch.tensor(values)
    stats, hist = tensor_stats(x, 4)
    assert_stats_match(x, stats, hist, 4)
    d = stats_to_dict(stats)
    assert (d["sum"], d["sum_sq"]) == (0.0, 0.0) and d["nonzero"] == len(values)
    assert all(d[k] != d[k] for k in ("min", "max", "absmax"))
    assert hist.tolist() == [0] * 4


def test_single_finite_element_among_specials():
    x = torch.tensor([NAN, 3.0, INF])
    stats, hist = tensor_stats(x, 3)
    assert stats.tolist() == [3, 3, 9, 3, 3, 3, 3, 1, 1]
    assert hist.tolist() == [1, 0, 0]


def test_max_lands_in_last_bucket_and_edges_agree():
    x = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0, 0.9999999, 1e-7])
    stats, hist = tensor_stats(x, 4)
    assert_stats_match(x, stats, hist, 4)
    assert hist.tolist() == [2, 1, 1, 3]
    # a grid of values exactly on bucket edges, many bins: kernel and reference agree bucket for bucket
    y = torch.arange(-1000, 1001, dtype=torch.float32) / 7
    assert_stats_match(y, *tensor_stats(y, 37), 37)
    assert_stats_match(y, *tensor_stats(y, 1), 1)
    # (0.1796875 - min) * bins / (max - min) is exactly 25: bucket 25 only if bins / (max - min)
    # is correctly rounded (a reciprocal-multiply is one ulp low and gives 24)
    z = torch.tensor([-3.734375, 0.1796875, 4.09375], dtype=torch.bfloat16)
    assert tensor_stats(z, 50)[1][24:26].tolist() == [0, 1]
    assert tensor_stats_reference(z, 50)[1][24:26].tolist() == [0, 1]


@pytest.mark.parametrize("bins", [7, 50, 64, 100, 1000])
def test_every_bf16_value_lands_where_the_reference_puts_it(bins):
    # All bf16 numbers in [-4, 4) plus one outlier that sets an awkward range: every edge case of
    # the bucket arithmetic that bf16 can express.
    bits = torch.arange(0, 2**16, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    x = bits[bits.float().abs() < 4]
    x = torch.cat([x, torch.tensor([4.09375], dtype=torch.bfloat16)])
    assert_stats_match(x, *tensor_stats(x, bins), bins)


def test_extreme_magnitudes():
    big = torch.finfo(torch.float32).max
    x = torch.tensor([-big, big, 0.0, 1.0])  # sums overflow float32 but not the float64 output
    stats, hist = tensor_stats(x, 8)
    assert_stats_match(x, stats, hist, 8)
    assert hist.sum().item() == 4
    # fp64 whose range overflows float64: documented to saturate, must not crash or lose elements
    y = torch.tensor([-1e308, 1e308, 0.0, 5.0], dtype=torch.float64)
    stats, hist = tensor_stats(y, 8)
    assert_stats_match(y, stats, hist, 8)
    assert hist.sum().item() == 4


def test_many_bins_and_tiny_inputs():
    x = torch.randn(20_000)
    assert_stats_match(x, *tensor_stats(x, 100_000), 100_000)
    assert_stats_match(x[:1], *tensor_stats(x[:1], 3), 3)


def test_result_does_not_depend_on_thread_count():
    x = torch.randn(300_001)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = tensor_stats(x, 64)
        torch.set_num_threads(max(2, threads))
        many = tensor_stats(x, 64)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(one, many, rtol=0, atol=0)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="bins"):
        tensor_stats(torch.randn(4), 0)
    with pytest.raises(TypeError, match="fp32"):
        tensor_stats(torch.arange(4), 4)
    with pytest.raises(RuntimeError, match="bins"):  # the op itself checks too
        torch.ops.bdh_fast.tensor_stats(torch.randn(4), 0)


def test_input_requiring_grad_is_fine():
    x = torch.randn(100, requires_grad=True)
    stats, hist = tensor_stats(x * 2, 8)
    assert not stats.requires_grad and hist.sum().item() == 100


def test_stats_to_dict_and_many():
    tensors = [torch.randn(100), torch.randn(3, 7).to(torch.bfloat16), torch.empty(0)]
    stats, hist = ops.tensor_stats_many(tensors, 8)
    assert stats.shape == (3, STATS_SIZE) and hist.shape == (3, 8)
    for i, t in enumerate(tensors):
        assert_stats_match(t, stats[i], hist[i], 8)
    d = stats_to_dict(stats[0])
    assert list(d) == list(STATS_FIELDS) and d["count"] == 100.0
    with pytest.raises(ValueError):
        stats_to_dict(torch.zeros(3))


# --- the op in torch.library's checks and in a compiled graph --------------------------------


@pytest.mark.parametrize(
    "x",
    [torch.randn(3, 50), torch.randn(257).to(torch.bfloat16), torch.tensor([1.0, INF, NAN, 2.0])],
    ids=["fp32", "bf16", "with-nan-inf"],
)
def test_opcheck(x):
    torch.library.opcheck(torch.ops.bdh_fast.tensor_stats.default, (x, 16))


def test_opcheck_empty():
    # An empty input has NaN min/max by design; opcheck's eager-vs-compiled comparison treats
    # NaN != NaN, so that one check is left out here (the compile test covers tracing).
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.bdh_fast.tensor_stats.default, (torch.empty(0, 3), 16), test_utils=checks)


@pytest.mark.compiled
def test_op_in_fullgraph_compile():
    def probe(h):  # (B, N) activations -> stats of relu(h) and a cumulative histogram
        stats, hist = torch.ops.bdh_fast.tensor_stats(torch.relu(h), 16)
        return stats * 2, hist.cumsum(0)

    x = torch.randn(4, 1000)
    compiled = torch.compile(probe, fullgraph=True, dynamic=False)  # raises on a graph break
    got, want = compiled(x), probe(x)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# --- other paths, each in a fresh interpreter ---------------------------------------------------


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=full_env, capture_output=True, text=True,
        timeout=300,
    )


def test_forced_fallback_warns_once_and_matches():
    code = """
        import warnings
        warnings.simplefilter("always")
        with warnings.catch_warnings(record=True) as caught:
            import torch
            import bdh_fast.ops as ops
            import bdh_fast.ops  # a second import is a no-op
            x = torch.randn(5000)
            x[7] = float("nan")
            for _ in range(3):
                stats, hist = ops.tensor_stats(x, 32)
        ours = [w for w in caught if "bdh_fast" in str(w.message)]
        assert len(ours) == 1, [str(w.message) for w in ours]
        assert "BDH_FAST_FORCE_FALLBACK" in str(ours[0].message)
        assert "\\n" not in str(ours[0].message)
        assert not ops.HAS_NATIVE
        ref = ops.tensor_stats_reference(x, 32)
        torch.testing.assert_close((stats, hist), ref, rtol=0, atol=0, equal_nan=True)
        torch.library.opcheck(torch.ops.bdh_fast.tensor_stats.default, (x, 8))
        print("ok")
    """
    result = run_python(code, BDH_FAST_FORCE_FALLBACK="1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


@pytest.mark.skipif(not ops.HAS_NATIVE, reason="needs the native extension")
@pytest.mark.parametrize("isa", ["baseline", "x86-64-v3"])
def test_lower_isa_copies_of_the_cpu_kernel_match(isa):
    # The float32 block kernel exists in one copy per x86-64 level; the main tests run the best
    # one this CPU has, these run the others (BDH_FAST_CPU_ISA only picks a lower level).
    code = """
        import torch
        from bdh_fast import ops
        nan, inf = float("nan"), float("inf")
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            x = torch.randn(70_001, dtype=torch.float64) * 4
            x[::89] = nan; x[3::97] = inf; x[5::101] = -inf; x[7::13] = 0.0
            x = x.to(dtype)
            for n in (x.numel(), 4096 * 3 + 17, 15, 1):
                (stats, hist), (ref_stats, ref_hist) = ops.tensor_stats(x[:n], 64), ops.tensor_stats_reference(x[:n], 64)
                torch.testing.assert_close(stats, ref_stats, rtol=1e-12, atol=1e-9, equal_nan=True)
                assert torch.equal(hist, ref_hist), (dtype, n)
        print("ok")
    """
    result = run_python(code, BDH_FAST_CPU_ISA=isa)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.strip() == "ok"


def test_triton_kernels_in_interpreter_match_reference():
    # TRITON_INTERPRET must be set before bdh_fast.triton_stats is imported, hence a subprocess;
    # the interpreter is slow, so the sizes are small (a few programs at most).
    code = """
        import torch
        from bdh_fast.triton_stats import triton_tensor_stats
        from bdh_fast.ops import tensor_stats_reference
        nan, inf = float("nan"), float("inf")
        cases = [
            (torch.empty(0), 8),
            (torch.tensor(2.5), 4),
            (torch.full((300,), 7.0), 5),
            (torch.tensor([1.0, nan, -2.0, inf, -inf, 0.0, 4.0]), 4),
            (torch.tensor([nan, inf]), 4),
            (torch.randn(5000).to(torch.bfloat16), 64),
            (torch.randn(3000).to(torch.float16), 10),
            (torch.randn(2000, dtype=torch.float64), 33),
            (torch.randn(70, 600).t(), 64),   # non-contiguous, several programs
            (torch.randn(4000), 3000),        # above the tl.histogram limit: atomics path
            (torch.tensor([-3.734375, 0.1796875, 4.09375], dtype=torch.bfloat16), 50),  # exact edge
        ]
        x = torch.randn(40_000); x[::97] = nan; x[5::101] = -inf
        cases.append((x, 64))
        big = torch.finfo(torch.float32).max
        cases.append((torch.tensor([-big, big, 0.0, 1.0]), 8))  # float32 squares would overflow
        for i, (x, bins) in enumerate(cases):
            stats, hist = triton_tensor_stats(x, bins)
            ref_stats, ref_hist = tensor_stats_reference(x, bins)
            exact = [0, 3, 4, 5, 6, 7, 8]
            torch.testing.assert_close(stats[exact], ref_stats[exact], rtol=0, atol=0, equal_nan=True,
                                       msg=lambda m: f"case {i}: {m}")
            l1 = x.double().reshape(-1)[x.reshape(-1).isfinite()].abs().sum().item()
            torch.testing.assert_close(stats[1], ref_stats[1], rtol=0, atol=1e-9 * l1 + 1e-12)
            torch.testing.assert_close(stats[2], ref_stats[2], rtol=1e-9, atol=1e-12)
            assert torch.equal(hist, ref_hist), (i, hist, ref_hist)
        print("ok", len(cases))
    """
    result = run_python(code, TRITON_INTERPRET="1")
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.strip().startswith("ok")


# --- CUDA (Triton kernels on the device) --------------------------------------------------------


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [0, 1, 1000, 1_000_003], ids=str)
def test_cuda_op_matches_reference(dtype, n):
    x = inputs_with_specials(n, dtype).cuda() if n > 10 else torch.randn(n, dtype=dtype, device="cuda")
    for bins in (64, 3000):
        stats, hist = tensor_stats(x, bins)
        assert_stats_match(x, stats, hist, bins)


@needs_cuda
@pytest.mark.cuda
def test_cuda_op_matches_cpu_op():
    x = torch.randn(2_000_000) * 3
    cpu_stats, cpu_hist = tensor_stats(x, 64)
    gpu_stats, gpu_hist = tensor_stats(x.cuda(), 64)
    torch.testing.assert_close(gpu_hist.cpu(), cpu_hist, rtol=0, atol=0)
    exact = [COUNT, MIN, MAX, NONZERO, ABSMAX, NAN_COUNT, INF_COUNT]
    torch.testing.assert_close(gpu_stats.cpu()[exact], cpu_stats[exact], rtol=0, atol=0)
    torch.testing.assert_close(gpu_stats.cpu()[[SUM, SUM_SQ]], cpu_stats[[SUM, SUM_SQ]], rtol=1e-9, atol=1e-9 * x.abs().sum().item())


@needs_cuda
@pytest.mark.cuda
def test_cuda_op_is_served_by_triton_not_the_fallback():
    """The CUDA results above must come from the Triton kernels: the gate never switched them off."""
    pytest.importorskip("triton")
    for dtype in DTYPES:
        tensor_stats(torch.randn(50_000, device="cuda").to(dtype), 64)
        tensor_stats(torch.randn(50_000, device="cuda").to(dtype), 3000)
    assert ops.triton_off_reason() is None


# --- the Triton gate: a kernel that fails or lies never ends a run --------------------------------
# The gate is exercised on CPU tensors with a stand-in kernel (its logic does not depend on the
# device); the real kernels go through it under TRITON_INTERPRET=1 in a subprocess.


def _gate_with(kernel):
    gate = ops._TritonGate()
    gate.kernel = kernel
    return gate


def test_gate_kernel_that_raises_falls_back_once_with_one_warning():
    calls = []

    def broken(x, bins):
        calls.append(bins)
        raise RuntimeError("PTX compile failed: out of resources")

    gate = _gate_with(broken)
    x = inputs_with_specials(3000, torch.float32)
    with pytest.warns(RuntimeWarning, match="Triton tensor_stats off .*PTX compile failed") as record:
        results = [gate(x, 64) for _ in range(3)]
    assert len([w for w in record if "Triton" in str(w.message)]) == 1
    assert calls == [64]  # tried once, then never again
    assert "PTX compile failed" in gate.off_reason
    for stats, hist in results:
        assert_stats_match(x, stats, hist, 64)


def test_gate_kernel_with_a_wrong_answer_is_caught_by_the_self_check():
    def off_by_one_bucket(x, bins):
        stats, hist = tensor_stats_reference(x, bins)
        return stats, hist.roll(1)

    gate = _gate_with(off_by_one_bucket)
    x = torch.randn(5000)
    with pytest.warns(RuntimeWarning, match="self-check .* disagrees"):
        stats, hist = gate(x, 64)
    assert_stats_match(x, stats, hist, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        gate(x, 64)


def test_gate_wrong_sum_is_caught_too():
    def bad_sum(x, bins):
        stats, hist = tensor_stats_reference(x, bins)
        return stats + torch.eye(STATS_SIZE, dtype=stats.dtype)[SUM], hist

    gate = _gate_with(bad_sum)
    with pytest.warns(RuntimeWarning, match="disagrees"):
        gate(torch.randn(100), 8)


def test_gate_checks_each_variant_once_then_trusts_it():
    calls = []

    def correct(x, bins):
        calls.append((x.dtype, bins, x.numel()))
        return tensor_stats_reference(x, bins)

    gate = _gate_with(correct)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            gate(torch.randn(10), 64)
        gate(torch.randn(10).to(torch.bfloat16), 64)
        gate(torch.randn(10), 2000)  # the atomics histogram path is another variant
    check = ops._TritonGate.SELF_CHECK_NUMEL
    assert calls == [(torch.float32, 64, check), (torch.float32, 64, 10), (torch.float32, 64, 10),
                     (torch.float32, 64, 10), (torch.bfloat16, 64, check), (torch.bfloat16, 64, 10),
                     (torch.float32, 1025, check), (torch.float32, 2000, 10)]
    assert gate.off_reason is None


def test_gate_without_triton_warns_once(monkeypatch):
    monkeypatch.setitem(sys.modules, "bdh_fast.triton_stats", None)  # import fails as if not installed
    gate = ops._TritonGate()
    x = torch.randn(100)
    with pytest.warns(RuntimeWarning, match="triton is not importable") as record:
        gate(x, 8)
        gate(x, 8)
    assert len(record) == 1
    assert_stats_match(x, *gate(x, 8), 8)


def test_gate_with_the_real_kernels_in_the_interpreter():
    code = """
        import warnings
        import torch
        from bdh_fast import ops
        from bdh_fast.triton_stats import triton_tensor_stats
        warnings.simplefilter("error")
        gate = ops._TritonGate()
        x = torch.randn(3000)
        for dtype in (torch.float32, torch.bfloat16):
            stats, hist = gate(x.to(dtype), 64)
            ref_stats, ref_hist = ops.tensor_stats_reference(x.to(dtype), 64)
            assert torch.equal(hist, ref_hist)
        assert gate.off_reason is None and gate.kernel is triton_tensor_stats, gate.off_reason
        print("ok", len(gate.checked))
    """
    result = run_python(code, TRITON_INTERPRET="1")
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.strip() == "ok 2"
