"""The BDH model against ../shared/docs/BDH.md: parameters, init, causality, RoPE, a full forward
checked against an independent re-implementation, dropout placement, torch.compile, generation and
config validation.

Tiny sizes throughout (CPU, shared cores); the default-size model is only ever built on the meta
device. One torch.compile, marked `compiled`.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch
import torch.nn.functional as F

from bdh_fast.model import BDH, BDHConfig, LinearAttention, rope, rope_frequencies, sample_next

THETA = 2.0**16
TINY = dict(n_layer=2, n_embd=32, n_head=4, mlp_internal_dim_multiplier=8, vocab_size=256, dropout=0.0)


def make_model(seed: int = 0, **overrides) -> BDH:
    torch.manual_seed(seed)
    return BDH(BDHConfig(**{**TINY, **overrides}))


def random_idx(B: int, T: int, V: int = 256, seed: int = 1) -> torch.Tensor:
    return torch.randint(V, (B, T), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------------
# An independent, deliberately plain re-implementation of BDH.md (float64, loops, explicit masks).
# --------------------------------------------------------------------------------------------------


def ref_ln(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)  # biased, as LayerNorm
    return (x - mu) / torch.sqrt(var + eps)


def ref_freqs(N: int) -> list[float]:
    """f_i = theta^(-q_i/N) / (2 pi), q_i = 2 floor(i/2), rounded to float32 (as Python floats)."""
    out = []
    for i in range(N):
        q = 2 * (i // 2)
        out.append(float(torch.tensor(THETA ** (-q / N) / (2 * math.pi), dtype=torch.float32)))
    return out


def f32(x: float) -> float:
    return float(torch.tensor(x, dtype=torch.float32))


def ref_angles(phases: torch.Tensor) -> torch.Tensor:
    """2 pi frac(phase) in float32 arithmetic, element by element.  (T, N) float32."""
    T, N = phases.shape
    two_pi = f32(2 * math.pi)
    out = torch.empty(T, N, dtype=torch.float32)
    for t in range(T):
        for i in range(N):
            p = float(phases[t, i])
            frac = p - math.floor(p)  # exact for a float32 p >= 0
            out[t, i] = f32(frac * two_pi)  # product of two float32 values is exact in double
    return out


def ref_rope_cos_sin(T: int, N: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 cos/sin tables of the float32 phases of positions 0..T-1."""
    f = ref_freqs(N)
    phases = torch.tensor([[f32(t * f[i]) for i in range(N)] for t in range(T)], dtype=torch.float32)
    ang = ref_angles(phases).double()
    return torch.cos(ang), torch.sin(ang)


def ref_rotate(v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """v: (..., T, N) float64, interleaved pairs rotated with explicit even/odd slices."""
    out = torch.empty_like(v)
    ev, od = v[..., 0::2], v[..., 1::2]
    c, s = cos[:, 0::2], sin[:, 0::2]  # pairs share a frequency
    out[..., 0::2] = ev * c - od * s
    out[..., 1::2] = od * c + ev * s
    return out


def reference_forward(model: BDH, idx: torch.Tensor, xy_mask: list[torch.Tensor] | None = None):
    """BDH.md, literally, in float64 with the model's parameters.  Returns logits (B, T, V).

    xy_mask: optional per-layer multiplicative dropout masks of shape (B, nh, T, N), applied to
    x_s * y_s and nowhere else.
    """
    cfg = model.config
    P = {k: p.detach().double() for k, p in model.named_parameters()}
    B, T = idx.shape
    nh, N, D, L = cfg.n_head, cfg.neurons_per_head, cfg.n_embd, cfg.n_layer
    cos, sin = ref_rope_cos_sin(T, N)
    mask = torch.tril(torch.ones(T, T, dtype=torch.float64), -1)  # strictly lower triangle

    x = ref_ln(P["embed.weight"][idx])  # (B, T, D)
    for layer in range(L):  # the same weights each time
        xys = []
        for h in range(nh):
            x_s = torch.relu(x @ P["encoder"][h])  # (B, T, N)
            qr = ref_rotate(x_s, cos, sin)
            scores = (qr @ qr.transpose(-1, -2)) * mask  # (B, T, T)
            a = ref_ln(scores @ x)  # V = x, not rotated
            y_s = torch.relu(a @ P["encoder_v"][h])
            xys.append(x_s * y_s)
        xy = torch.stack(xys, 1)  # (B, nh, T, N)
        if xy_mask is not None:
            xy = xy * xy_mask[layer].double()
        m = torch.cat([xy[:, h] for h in range(nh)], -1) @ P["decoder"]  # head-major concat
        x = ref_ln(x + ref_ln(m))
    return x @ P["lm_head"]


# --------------------------------------------------------------------------------------------------
# Parameters and init
# --------------------------------------------------------------------------------------------------


def test_default_parameter_count_names_and_shapes():
    cfg = BDHConfig()
    with torch.device("meta"):
        model = BDH(cfg)
    nh, D, N, V = 4, 256, 8192, 256
    assert cfg.neurons_per_head == N and cfg.n_neurons == 32768
    shapes = {k: tuple(p.shape) for k, p in model.named_parameters()}
    assert shapes == {
        "embed.weight": (V, D),
        "encoder": (nh, D, N),
        "encoder_v": (nh, D, N),
        "decoder": (nh * N, D),
        "lm_head": (D, V),
    }
    assert sum(p.numel() for p in model.parameters()) == 25_296_896 == 3 * nh * D * N + 2 * V * D
    # No other state: no biases, no LayerNorm weights, the RoPE table is not saved.
    assert set(model.state_dict()) == set(shapes)


@pytest.mark.parametrize("n_layer", [1, 3, 12])
def test_parameter_count_independent_of_n_layer(n_layer):
    with torch.device("meta"):
        n = sum(p.numel() for p in BDH(BDHConfig(n_layer=n_layer)).parameters())
    assert n == 25_296_896


@pytest.mark.parametrize("nh,D,m,V", [(1, 16, 2, 10), (2, 24, 4, 7), (8, 64, 16, 256)])
def test_parameter_count_formula_small_configs(nh, D, m, V):
    cfg = BDHConfig(n_head=nh, n_embd=D, mlp_internal_dim_multiplier=m, vocab_size=V)
    with torch.device("meta"):
        model = BDH(cfg)
    N = m * D // nh
    assert sum(p.numel() for p in model.parameters()) == 3 * nh * D * N + 2 * V * D


def test_init_normal_002_and_untied():
    model = make_model(0, n_embd=64, n_head=4, mlp_internal_dim_multiplier=16)  # N = 256
    for name, p in model.named_parameters():
        p = p.detach().double()
        assert abs(p.mean().item()) < 1e-3, name
        assert abs(p.std().item() - 0.02) < 1e-3, name
        assert p.abs().max().item() < 0.02 * 7, name  # normal, not uniform/truncated oddities
    emb, head = model.embed.weight, model.lm_head
    assert emb.untyped_storage().data_ptr() != head.untyped_storage().data_ptr()
    assert not torch.equal(emb.detach(), head.detach().T)
    with torch.no_grad():
        before = head.clone()
        emb.add_(1.0)
    assert torch.equal(head, before)


# --------------------------------------------------------------------------------------------------
# Causality and position 0
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_future_tokens_never_change_earlier_logits():
    model = make_model(0).eval()
    B, T = 2, 12
    idx = random_idx(B, T)
    logits, _ = model(idx)
    for p in [0, 1, 4, 7, 10]:
        # change every token after p
        idx2 = idx.clone()
        idx2[:, p + 1:] = (idx[:, p + 1:] + 1 + random_idx(B, T - p - 1, 250, seed=p)) % 256
        assert (idx2[:, p + 1:] != idx[:, p + 1:]).all()
        logits2, _ = model(idx2)
        assert torch.equal(logits2[:, : p + 1], logits[:, : p + 1]), p
        assert not torch.allclose(logits2[:, p + 1:], logits[:, p + 1:])  # the change does matter
        # change only the very next token
        idx3 = idx.clone()
        idx3[:, p + 1] = (idx[:, p + 1] + 17) % 256
        logits3, _ = model(idx3)
        assert torch.equal(logits3[:, : p + 1], logits[:, : p + 1]), p
        assert not torch.allclose(logits3[:, p + 1], logits[:, p + 1])


@torch.no_grad()
def test_attention_output_at_position_0_is_exactly_zero():
    cfg = BDHConfig(**TINY)
    attn = LinearAttention(cfg)
    g = torch.Generator().manual_seed(3)
    B, nh, T, N, D = 2, cfg.n_head, 9, cfg.neurons_per_head, cfg.n_embd
    x_s = torch.relu(torch.randn(B, nh, T, N, generator=g))
    v = torch.randn(B, 1, T, D, generator=g)
    out = attn(x_s, v)
    assert out.shape == (B, nh, T, D)
    assert torch.count_nonzero(out[..., 0, :]) == 0
    assert (out[..., 1:, :].abs().sum(-1) > 0).all()  # every later position attends to something

    # ... and inside the model, at every layer, where the attention is exactly the reference's
    # formulation with positions 0..T-1 (RoPE is relative, so a position offset would only show
    # in the rounding: compare bit-exactly)
    model = make_model(0).eval()
    seen = []
    handle = model.attn.register_forward_hook(lambda mod, args, out: seen.append((args[0], args[1], out)))
    T = 30
    try:
        model(random_idx(2, T))
    finally:
        handle.remove()
    assert len(seen) == model.config.n_layer
    phases = torch.arange(T, dtype=torch.float32)[:, None] * rope_frequencies(N)
    mask = torch.tril(torch.ones(T, T), -1)
    for x_s, v, out in seen:
        assert out.shape == (2, model.config.n_head, T, model.config.n_embd)
        assert torch.count_nonzero(out[..., 0, :]) == 0
        qr = rope_reference_style(x_s, phases)
        assert torch.equal(out, ((qr @ qr.mT) * mask) @ v)


@torch.no_grad()
def test_linear_attention_is_rope_from_position_0_strictly_causal_unscaled():
    """Q = K = rope(x_s) with positions 0..T-1 on every call; scores strictly lower, no scaling."""
    cfg = BDHConfig(**TINY)
    attn = LinearAttention(cfg)
    g = torch.Generator().manual_seed(12)
    B, nh, T, N, D = 2, cfg.n_head, 40, cfg.neurons_per_head, cfg.n_embd
    x_s = torch.relu(torch.randn(B, nh, T, N, generator=g))
    v = torch.randn(B, 1, T, D, generator=g)
    out = attn(x_s, v)
    phases = torch.arange(T, dtype=torch.float32)[:, None] * rope_frequencies(N)
    qr = rope_reference_style(x_s, phases)
    mask = torch.tril(torch.ones(T, T), -1)
    assert torch.equal(out, ((qr @ qr.mT) * mask) @ v)  # bit-exact: same ops, positions from 0
    cos, sin = ref_rope_cos_sin(T, N)
    qr64 = ref_rotate(x_s.double(), cos, sin)
    expected = ((qr64 @ qr64.mT) * mask.double()) @ v.double()
    torch.testing.assert_close(out.double(), expected, atol=1e-4, rtol=1e-5)


@torch.no_grad()
def test_position_0_logits_depend_only_on_token_0():
    model = make_model(0).eval()
    idx = random_idx(3, 10)
    logits, _ = model(idx)
    other = idx.clone()
    other[:, 1:] = random_idx(3, 9, seed=99)
    logits_other, _ = model(other)
    assert torch.equal(logits_other[:, 0], logits[:, 0])
    single, _ = model(idx[:, :1])
    torch.testing.assert_close(single[:, 0], logits[:, 0], atol=1e-5, rtol=1e-5)
    # Attention is zero at t = 0, so LN(0) = 0, y_s = 0, m = 0 and every layer is x = LN(x):
    # logits_0 = LN^(L+1)(embed(tok_0)) @ lm_head.
    x = model.embed.weight.detach().double()[idx[:, 0]]
    for _ in range(model.config.n_layer + 1):
        x = ref_ln(x)
    expected = (x @ model.lm_head.detach().double()).float()
    torch.testing.assert_close(logits[:, 0], expected, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# RoPE
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("N", [8, 64, 8192])
def test_rope_frequencies(N):
    f = rope_frequencies(N)
    assert f.dtype == torch.float32 and f.shape == (N,)
    expected = torch.tensor(ref_freqs(N), dtype=torch.float32)
    torch.testing.assert_close(f, expected, atol=0, rtol=1e-6)
    assert torch.equal(f[0::2], f[1::2])  # pairs (2k, 2k+1) share a frequency
    assert f[0].item() == pytest.approx(1 / (2 * math.pi))
    assert (f[2::2] < f[:-2:2]).all()


@pytest.mark.parametrize("t0", [0, 40000])
def test_attention_rope_tables_are_cos_sin_of_t_times_f(t0):
    """The attention's (cos, sign * sin) tables at positions t0..t0+T-1 (the model uses t0 = 0)."""
    cfg = BDHConfig(**TINY)
    attn = LinearAttention(cfg)
    T, N = 11, cfg.neurons_per_head
    phases = torch.arange(t0, t0 + T, dtype=torch.float32)[:, None] * rope_frequencies(N)
    cos, sin_signed = attn.tables(t0, T)
    assert cos.shape == sin_signed.shape == (T, N) and cos.dtype == torch.float32
    ang = ref_angles(phases).double()
    sign = torch.tensor([-1.0, 1.0] * (N // 2), dtype=torch.float64)
    torch.testing.assert_close(cos.double(), torch.cos(ang), atol=1e-6, rtol=0)
    torch.testing.assert_close(sin_signed.double(), sign * torch.sin(ang), atol=1e-6, rtol=0)
    assert torch.equal(cos[:, 0::2], cos[:, 1::2]) and torch.equal(sin_signed[:, 0::2], -sin_signed[:, 1::2])


def _phases(positions: list[int], N: int) -> torch.Tensor:
    f = torch.tensor(ref_freqs(N), dtype=torch.float32)
    return torch.tensor(positions, dtype=torch.float32)[:, None] * f  # (T, N) float32


# T = 5: positions 0..4 (frac never wraps) and large positions where frac(t f) matters.
POSITIONS = [[0, 1, 2, 3, 4], [0, 7, 97, 4099, 40961]]


@pytest.mark.parametrize("positions", POSITIONS)
def test_rope_fp32_against_hand_loops(positions):
    T, N = 5, 8
    phases = _phases(positions, N)
    v = torch.randn(2, T, N, generator=torch.Generator().manual_seed(5))
    got = rope(v, phases)
    assert got.dtype == torch.float32 and got.shape == v.shape
    ang = ref_angles(phases)
    expected = torch.empty_like(v)
    for b in range(v.shape[0]):
        for t in range(T):
            for k in range(N // 2):
                a0, a1 = float(ang[t, 2 * k]), float(ang[t, 2 * k + 1])
                assert a0 == a1
                c, s = math.cos(a0), math.sin(a0)
                x0, x1 = float(v[b, t, 2 * k]), float(v[b, t, 2 * k + 1])
                expected[b, t, 2 * k] = x0 * c - x1 * s
                expected[b, t, 2 * k + 1] = x1 * c + x0 * s
    torch.testing.assert_close(got, expected, atol=2e-6, rtol=1e-5)
    if positions[0] == 0:
        torch.testing.assert_close(got[:, 0], v[:, 0], atol=0, rtol=0)  # t = 0: no rotation


@pytest.mark.parametrize("positions", POSITIONS)
def test_rope_bf16_casts_products_before_sum(positions):
    T, N = 5, 8
    phases = _phases(positions, N)
    v = torch.randn(2, T, N, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    got = rope(v, phases)
    assert got.dtype == torch.bfloat16
    ang = ref_angles(phases)
    cos, sin = torch.cos(ang), torch.sin(ang)  # float32 tables

    def prod(a: float, b: float) -> torch.Tensor:  # float32 product, then cast to bf16
        return torch.tensor(a * b, dtype=torch.float64).float().to(torch.bfloat16)

    expected = torch.empty_like(v)
    for b in range(v.shape[0]):
        for t in range(T):
            for k in range(N // 2):
                c, s = float(cos[t, 2 * k]), float(sin[t, 2 * k])
                x0, x1 = float(v[b, t, 2 * k]), float(v[b, t, 2 * k + 1])
                expected[b, t, 2 * k] = prod(x0, c) + prod(-x1, s)  # bf16 + bf16
                expected[b, t, 2 * k + 1] = prod(x1, c) + prod(x0, s)
    assert torch.equal(got, expected)


def rope_reference_style(v: torch.Tensor, phases: torch.Tensor) -> torch.Tensor:
    """The formulation of the reference bdh.py."""
    ph = (phases % 1) * (2 * math.pi)
    v_rot = torch.stack((-v[..., 1::2], v[..., ::2]), dim=-1).view(*v.size())
    return (v * torch.cos(ph)).to(v.dtype) + (v_rot * torch.sin(ph)).to(v.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("start", [0, 12345])
def test_rope_bit_exact_with_reference_formulation(dtype, start):
    T, N = 16, 64
    phases = torch.arange(start, start + T, dtype=torch.float32)[:, None] * rope_frequencies(N)
    v = torch.randn(2, 3, T, N, generator=torch.Generator().manual_seed(7)).to(dtype)
    got = rope(v, phases)
    assert got.dtype == dtype
    assert torch.equal(got, rope_reference_style(v, phases))


# --------------------------------------------------------------------------------------------------
# Full forward vs the independent re-implementation; loss
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_layer,T", [(1, 9), (3, 16)])
@torch.no_grad()
def test_forward_matches_independent_reimplementation(n_layer, T):
    model = make_model(4, n_layer=n_layer).eval()
    idx = random_idx(2, T)
    logits, loss = model(idx)
    assert loss is None and logits.shape == (2, T, 256) and logits.dtype == torch.float32
    expected = reference_forward(model, idx).float()
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_loss_is_mean_cross_entropy():
    model = make_model(0).eval()
    idx, targets = random_idx(3, 11), random_idx(3, 11, seed=8)
    logits, loss = model(idx, targets)
    assert loss.ndim == 0
    manual = -torch.log_softmax(logits.double(), -1).gather(-1, targets[..., None]).mean()
    torch.testing.assert_close(loss.double(), manual, atol=1e-6, rtol=1e-6)
    ref = reference_forward(model, idx)
    ref_loss = -torch.log_softmax(ref, -1).gather(-1, targets[..., None]).mean()
    torch.testing.assert_close(loss.double(), ref_loss, atol=1e-5, rtol=1e-5)
    # every one of the B*T positions counts equally
    per_pos = F.cross_entropy(logits.view(-1, 256), targets.view(-1), reduction="none")
    assert per_pos.numel() == 3 * 11
    torch.testing.assert_close(loss, per_pos.mean(), atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------------------------------------
# Dropout
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_dropout_varies_with_seed_in_train_and_is_off_in_eval():
    p = 0.3
    model = make_model(0, dropout=p)
    plain = make_model(0, dropout=0.0)
    plain.load_state_dict(model.state_dict())
    idx = random_idx(2, 8)

    model.train()
    torch.manual_seed(10)
    a, _ = model(idx)
    torch.manual_seed(11)
    b, _ = model(idx)
    torch.manual_seed(10)
    a2, _ = model(idx)
    assert not torch.allclose(a, b)
    assert torch.equal(a, a2)

    model.eval()
    e1, _ = model(idx)
    torch.manual_seed(123)
    e2, _ = model(idx)
    assert torch.equal(e1, e2)
    ref, _ = plain.eval()(idx)
    assert torch.equal(e1, ref)
    ref_train, _ = plain.train()(idx)  # dropout 0 in train mode is a no-op too
    assert torch.equal(ref_train, ref)
    assert not torch.allclose(a, e1)


@torch.no_grad()
def test_dropout_applies_to_xs_times_ys_only():
    p = 0.4
    model = make_model(2, dropout=p).train()
    cfg = model.config
    B, T = 2, 8
    idx = random_idx(B, T)
    # only one dropout module, called once per layer on a (B, nh, T, N) tensor
    drops = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert drops == [model.drop] and model.drop.p == p
    shapes = []
    handle = model.drop.register_forward_hook(lambda mod, args, out: shapes.append(tuple(args[0].shape)))
    try:
        torch.manual_seed(21)
        logits, _ = model(idx)
    finally:
        handle.remove()
    assert shapes == [(B, cfg.n_head, T, cfg.neurons_per_head)] * cfg.n_layer
    # Reproduce the masks with the same RNG draws (dropout of a ones tensor of the same shape, in
    # the same order) and apply them to x_s * y_s in the reference: nothing else may be dropped.
    torch.manual_seed(21)
    masks = [F.dropout(torch.ones(shapes[0]), p, training=True) for _ in range(cfg.n_layer)]
    assert 0 < (masks[0] == 0).float().mean() < 1
    expected = reference_forward(model, idx, xy_mask=masks).float()
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# torch.compile (the file's only compile)
# --------------------------------------------------------------------------------------------------


@pytest.mark.compiled
@torch.no_grad()
def test_compiled_matches_eager():
    model = make_model(0, n_layer=1).eval()  # one layer: half the graph to compile
    idx = random_idx(2, 16)
    eager, _ = model(idx)
    compiled, _ = torch.compile(model, dynamic=False)(idx)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# Generation and sampling
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def greedy(model: BDH, idx: torch.Tensor, n: int) -> torch.Tensor:
    for _ in range(n):
        logits, _ = model(idx)  # the full prefix every time
        idx = torch.cat((idx, logits[:, -1].argmax(-1, keepdim=True)), 1)
    return idx


@pytest.fixture(scope="module")
def gen_model() -> BDH:
    return make_model(0, n_layer=1).eval()


# generate() with its defaults, plus each of its decoding paths where it offers a choice.
GEN_KWARGS = [pytest.param({}, id="default")]
if "use_cache" in inspect.signature(BDH.generate).parameters:
    GEN_KWARGS += [pytest.param({"use_cache": False}, id="no_cache"), pytest.param({"use_cache": True}, id="cache")]


@pytest.mark.parametrize("kw", GEN_KWARGS)
def test_generate_shape_and_prefix(gen_model, kw):
    prefix = random_idx(3, 4)
    out = gen_model.generate(prefix, 6, generator=torch.Generator().manual_seed(0), **kw)
    assert out.shape == (3, 10) and out.dtype == prefix.dtype
    assert torch.equal(out[:, :4], prefix)
    assert ((out >= 0) & (out < 256)).all()
    assert torch.equal(gen_model.generate(prefix, 0, **kw), prefix)
    assert gen_model.generate(prefix, 1, **kw).shape == (3, 5)


@pytest.mark.parametrize("kw", GEN_KWARGS)
def test_generate_top_k_1_is_greedy_and_seed_independent(gen_model, kw):
    prefix = random_idx(2, 4)
    expected = greedy(gen_model, prefix, 6)
    a = gen_model.generate(prefix, 6, top_k=1, generator=torch.Generator().manual_seed(1), **kw)
    b = gen_model.generate(prefix, 6, top_k=1, generator=torch.Generator().manual_seed(2), **kw)
    torch.manual_seed(3)
    c = gen_model.generate(prefix, 6, top_k=1, **kw)
    assert torch.equal(a, expected) and torch.equal(b, expected) and torch.equal(c, expected)


@pytest.mark.parametrize("kw", GEN_KWARGS)
def test_generate_low_temperature_is_greedy(gen_model, kw):
    prefix = random_idx(2, 4, seed=4)
    n, temperature = 6, 1e-4
    expected = greedy(gen_model, prefix, n)
    # precondition of the test: the top-1 margin is large against the temperature at every step
    logits, _ = gen_model(expected[:, :-1])
    top2 = logits[:, prefix.shape[1] - 1:].topk(2, -1).values
    assert ((top2[..., 0] - top2[..., 1]) > 30 * temperature).all()
    for seed in (0, 1):
        out = gen_model.generate(prefix, n, temperature=temperature, generator=torch.Generator().manual_seed(seed), **kw)
        assert torch.equal(out, expected)
    # at temperature 1 the same generators do not all reproduce greedy (temperature is honoured)
    outs = [gen_model.generate(prefix, n, generator=torch.Generator().manual_seed(s), **kw) for s in (0, 1)]
    assert not all(torch.equal(o, expected) for o in outs)


@pytest.mark.parametrize("kw", GEN_KWARGS)
@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_generate_rejects_nonpositive_temperature(gen_model, temperature, kw):
    with pytest.raises(ValueError):
        gen_model.generate(random_idx(1, 3), 2, temperature=temperature, **kw)


@pytest.mark.parametrize("kw", GEN_KWARGS)
def test_generate_generator_is_reproducible_and_leaves_global_rng_alone(gen_model, kw):
    prefix = random_idx(2, 3)
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    a = gen_model.generate(prefix, 12, generator=torch.Generator().manual_seed(7), **kw)
    assert torch.equal(torch.get_rng_state(), state)
    b = gen_model.generate(prefix, 12, generator=torch.Generator().manual_seed(7), **kw)
    c = gen_model.generate(prefix, 12, generator=torch.Generator().manual_seed(8), **kw)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # without a generator the global RNG drives it (reproducible under manual_seed)
    torch.manual_seed(5)
    d = gen_model.generate(prefix, 12, **kw)
    torch.manual_seed(5)
    e = gen_model.generate(prefix, 12, **kw)
    assert torch.equal(d, e)
    assert not torch.equal(torch.get_rng_state(), state)


def test_sample_next_top_k_never_leaves_the_top_k():
    g = torch.Generator().manual_seed(0)
    rows, V, k, reps = 4, 50, 5, 1000
    logits = torch.randn(rows, V, generator=g)
    draws = sample_next(logits.repeat(reps, 1), top_k=k, generator=g)  # (rows*reps, 1)
    assert draws.shape == (rows * reps, 1) and draws.dtype == torch.int64
    draws = draws.view(reps, rows)
    top = logits.topk(k, -1).indices
    for r in range(rows):
        got = draws[:, r]
        assert torch.isin(got, top[r]).all()
        freq = torch.bincount(got, minlength=V).double() / reps
        expected = torch.zeros(V, dtype=torch.float64)
        expected[top[r]] = torch.softmax(logits[r, top[r]].double(), -1)
        assert (freq - expected).abs().max() < 0.06  # the kept logits keep their relative weights
    # top_k larger than V keeps everything
    assert sample_next(logits, top_k=10 * V, generator=g).shape == (rows, 1)


def test_sample_next_divides_logits_by_temperature():
    g = torch.Generator().manual_seed(1)
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0]])
    n = 20_000
    for temperature in (0.5, 2.0):
        draws = sample_next(logits.repeat(n, 1), temperature=temperature, generator=g).view(-1)
        freq = torch.bincount(draws, minlength=4).double() / n
        expected = torch.softmax(logits[0].double() / temperature, -1)
        assert (freq - expected).abs().max() < 0.015, (temperature, freq, expected)


def test_sample_next_generator_reproducible_and_global_rng_untouched():
    logits = torch.randn(8, 30, generator=torch.Generator().manual_seed(2))
    state = torch.get_rng_state()
    a = sample_next(logits, generator=torch.Generator().manual_seed(3))
    b = sample_next(logits, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert torch.equal(torch.get_rng_state(), state)


# --------------------------------------------------------------------------------------------------
# Config validation
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(n_embd=10, n_head=3, mlp_internal_dim_multiplier=1),  # 10 not divisible by 3
        dict(n_embd=8, n_head=3, mlp_internal_dim_multiplier=4),  # 32 not divisible by 3
        dict(n_embd=6, n_head=2, mlp_internal_dim_multiplier=1),  # N = 3, odd
        dict(n_embd=10, n_head=2, mlp_internal_dim_multiplier=1),  # N = 5, odd
        dict(dropout=-0.1),
        dict(dropout=1.0),
        dict(dropout=1.5),
        dict(n_layer=0),
        dict(n_head=0),
        dict(vocab_size=0),
    ],
)
def test_config_validation_rejects(kwargs):
    with pytest.raises(ValueError):
        BDHConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs", [dict(), dict(dropout=0.0), dict(dropout=0.99), dict(n_embd=12, n_head=3, mlp_internal_dim_multiplier=2)]
)
def test_config_validation_accepts(kwargs):
    cfg = BDHConfig(**kwargs)
    assert cfg.neurons_per_head % 2 == 0
    assert cfg.n_neurons == cfg.n_head * cfg.neurons_per_head


def test_config_defaults_match_reference():
    cfg = BDHConfig()
    assert (cfg.n_layer, cfg.n_embd, cfg.dropout, cfg.n_head, cfg.mlp_internal_dim_multiplier, cfg.vocab_size) == (
        6, 256, 0.1, 4, 128, 256)
