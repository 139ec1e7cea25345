"""Incremental decoding (BDH.prefill / decode_step / generate(use_cache=True)) against the full
recompute: the recurrent attention state S = sum_{s<t} rotate(x_s)_s (outer) x_s gives the same
logits, the same greedy tokens and, with a seeded generator, the same samples.

Tiny sizes, CPU, a few seconds in all.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bdh_fast.model import BDH, BDHConfig, rotate

TINY = dict(n_layer=3, n_embd=32, n_head=4, mlp_internal_dim_multiplier=8, vocab_size=256, dropout=0.0)
TEXT = (b"To be, or not to be, that is the question: Whether 'tis nobler in the mind to suffer "
        b"the slings and arrows of outrageous fortune, or to take arms against a sea of troubles. ")


def make_model(seed: int = 0, **overrides) -> BDH:
    torch.manual_seed(seed)
    return BDH(BDHConfig(**{**TINY, **overrides})).eval()


def random_idx(B: int, T: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(256, (B, T), generator=torch.Generator().manual_seed(seed))


def full_logits(model: BDH, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(idx)[0]  # (B, T, V)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls: on a shared 2-core machine a second intra-op thread only adds spin-waiting
    (7x slower here under load). Restored afterwards for the other test files."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model() -> BDH:
    return make_model(0)


@pytest.fixture(scope="module")
def trained() -> BDH:
    """A few AdamW steps on a fixed text: peaked logits, unlike random init."""
    model = make_model(1).train()
    data = torch.tensor(list(TEXT * 4))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(30):
        starts = torch.randint(len(data) - 65, (8,), generator=gen)
        batch = torch.stack([data[s:s + 65] for s in starts])  # (8, 65)
        _, loss = model(batch[:, :-1], batch[:, 1:].contiguous())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


# --------------------------------------------------------------------------------------------------
# prefill and decode_step against forward
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("T", [1, 7, 33])
def test_prefill_logits_are_forwards_last_position_bit_for_bit(model, T):
    idx = random_idx(2, T)
    logits, state = model.prefill(idx)
    assert torch.equal(logits, full_logits(model, idx)[:, -1])
    cfg = model.config
    assert state.shape == (cfg.n_layer, 2, cfg.n_head, cfg.neurons_per_head, cfg.n_embd)
    assert state.dtype == torch.float32


def test_prefill_state_is_sum_of_rotated_xs_outer_x():
    """Layer 0's state from the equations: x = LN(embed), x_s = relu(x D_x), S = rotate(x_s)^T x."""
    model = make_model(2)
    idx = random_idx(2, 11)
    _, state = model.prefill(idx)
    x = F.layer_norm(model.embed(idx), (model.config.n_embd,)).unsqueeze(1).double()  # (B, 1, T, D)
    x_s = torch.relu(x @ model.encoder.double())  # (B, nh, T, N)
    cos, sin_signed = model.attn.tables(0, idx.size(1))
    qr = rotate(x_s, cos.double(), sin_signed.double())  # (B, nh, T, N)
    expected = torch.einsum("bhtn,bztd->bhnd", qr, x)  # sum over t of qr_t (outer) x_t
    torch.testing.assert_close(state[0].double(), expected, rtol=1e-5, atol=1e-5)
    # position 0 attends to nothing: an empty prompt would give a zero state, one token does not
    assert state[0].abs().sum() > 0


@pytest.mark.parametrize("prompt_len", [1, 9])
def test_decode_step_logits_match_forward_at_every_position(trained, prompt_len):
    idx = random_idx(2, 48, seed=3)
    expected = full_logits(trained, idx)  # (B, T, V)
    scale = expected.abs().max()
    logits, state = trained.prefill(idx[:, :prompt_len])
    torch.testing.assert_close(logits, expected[:, prompt_len - 1], rtol=0, atol=1e-4 * scale)
    for t in range(prompt_len, idx.size(1)):
        logits, state = trained.decode_step(idx[:, t:t + 1], state, t)
        torch.testing.assert_close(logits, expected[:, t], rtol=0, atol=1e-4 * scale)


@pytest.mark.parametrize("k", [1, 5, 23])
def test_state_after_prefill_equals_shorter_prefill_plus_decode_steps(model, k):
    idx = random_idx(2, 24, seed=5)
    _, expected = model.prefill(idx)
    _, state = model.prefill(idx[:, :-k])
    for t in range(idx.size(1) - k, idx.size(1)):
        _, returned = model.decode_step(idx[:, t:t + 1], state, t)
        assert returned is state  # updated in place, not copied
    torch.testing.assert_close(state, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_decode_step_reads_the_state_before_adding_its_own_token(model):
    """Strictly causal: a token decoded at position 0 (empty state) sees zero attention, so its
    logits are those of a one-token forward; the state then holds exactly that token."""
    idx = random_idx(2, 1, seed=6)
    cfg = model.config
    empty = torch.zeros(cfg.n_layer, 2, cfg.n_head, cfg.neurons_per_head, cfg.n_embd)
    logits, state = model.decode_step(idx, empty, 0)
    prefill_logits, prefill_state = model.prefill(idx)
    torch.testing.assert_close(logits, prefill_logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(state, prefill_state, rtol=0, atol=1e-6)


def test_decode_step_rejects_bad_input(model):
    _, state = model.prefill(random_idx(1, 3))
    with pytest.raises(ValueError):
        model.decode_step(random_idx(1, 2), state, 3)
    with pytest.raises(ValueError):
        model.decode_step(random_idx(1, 1), state, -1)


# --------------------------------------------------------------------------------------------------
# generate: cached vs full recompute
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt_len", [1, 2, 17, 64])
def test_greedy_cached_equals_full_recompute(model, prompt_len):
    prompt = random_idx(2, prompt_len, seed=prompt_len)
    cached = model.generate(prompt, 40, top_k=1, use_cache=True)
    full = model.generate(prompt, 40, top_k=1, use_cache=False)
    assert cached.shape == (2, prompt_len + 40)
    assert torch.equal(cached, full)


@pytest.mark.parametrize("prompt", [b"T", b"To be or not to be"])
def test_greedy_cached_equals_full_recompute_trained(trained, prompt):
    idx = torch.tensor([list(prompt), list(prompt[::-1])])  # (2, T0)
    cached = trained.generate(idx, 40, top_k=1)
    assert torch.equal(cached, trained.generate(idx, 40, top_k=1, use_cache=False))
    # the trained model has learnt something, so this is not a trivial constant sequence
    assert len(set(cached[0, len(prompt):].tolist())) > 3


@pytest.mark.parametrize("temperature, top_k", [(1.0, None), (0.8, 5), (1.3, 50)])
def test_sampling_cached_equals_full_recompute_with_same_generator(trained, temperature, top_k):
    prompt = torch.tensor([list(b"To be or "), list(b"Whether '")])  # (2, 9)
    runs = {}
    for use_cache in (True, False):
        generator = torch.Generator().manual_seed(1234)
        out = trained.generate(prompt, 40, temperature=temperature, top_k=top_k,
                               generator=generator, use_cache=use_cache)
        runs[use_cache] = (out, generator.get_state())
    assert torch.equal(runs[True][0], runs[False][0])
    assert torch.equal(runs[True][1], runs[False][1])  # the generator was consumed identically


def test_sampling_with_a_generator_is_reproducible_and_leaves_global_rng_alone(trained):
    prompt = torch.tensor([list(b"To be or ")])
    torch.manual_seed(0)
    rng = torch.get_rng_state()
    a = trained.generate(prompt, 30, generator=torch.Generator().manual_seed(7))
    b = trained.generate(prompt, 30, generator=torch.Generator().manual_seed(7))
    c = trained.generate(prompt, 30, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(torch.get_rng_state(), rng)


@pytest.mark.parametrize("use_cache", [True, False])
def test_zero_new_tokens_returns_the_prompt(model, use_cache):
    prompt = random_idx(2, 5)
    assert torch.equal(model.generate(prompt, 0, use_cache=use_cache), prompt)


def test_both_paths_honour_train_mode_dropout():
    """generate does not switch modes: in train mode the cached path applies dropout like the
    reference path does (the caller is expected to call eval())."""
    model = make_model(3, dropout=0.5)
    prompt = random_idx(1, 6, seed=9)
    eval_logits, _ = model.prefill(prompt)
    model.train()
    try:
        train_logits, state = model.prefill(prompt)
        assert not torch.equal(train_logits, eval_logits)
        step_train, _ = model.decode_step(prompt[:, :1], state.clone(), 6)
        model.eval()
        step_eval, _ = model.decode_step(prompt[:, :1], state.clone(), 6)
        assert not torch.equal(step_train, step_eval)
    finally:
        model.eval()


# --------------------------------------------------------------------------------------------------
# reduced precision
# --------------------------------------------------------------------------------------------------


def test_bf16_autocast_smoke(trained):
    prompt = torch.tensor([list(b"To be or "), list(b"Whether '")])  # (2, 9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, state = trained.prefill(prompt)
        assert logits.shape == (2, 256) and state.dtype == torch.float32  # accumulated in fp32
        logits, state = trained.decode_step(prompt[:, :1], state, prompt.size(1))
        assert logits.shape == (2, 256) and state.dtype == torch.float32
        out = trained.generate(prompt, 16, top_k=1)
    assert out.shape == (2, 25) and torch.equal(out[:, :9], prompt)
    assert torch.isfinite(logits).all()
    # close to the fp32 logits (bf16 matmuls elsewhere)
    ref = full_logits(trained, torch.cat([prompt, prompt[:, :1]], 1))[:, -1]
    assert (logits.float() - ref).abs().max() < 0.1 * ref.abs().max()


def test_bf16_weights_keep_a_float32_state(model):
    bf16 = make_model(0).to(torch.bfloat16)
    assert bf16.state_dtype() == torch.float32
    out = bf16.generate(random_idx(2, 4), 8, top_k=1)
    assert out.shape == (2, 12)
    f64 = make_model(0).double()
    assert f64.state_dtype() == torch.float64
    assert f64.prefill(random_idx(1, 4))[1].dtype == torch.float64


# --------------------------------------------------------------------------------------------------
# the benchmark harness (bench/generate.py --quick, tiny preset)
# --------------------------------------------------------------------------------------------------


def test_bench_generate_quick(capsys):
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "generate.py"
    spec = importlib.util.spec_from_file_location("bench_generate", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--quick", "--preset", "tiny", "--new_tokens", "8"]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["bench"] == "generate" and record["preset"] == "tiny" and record["new_tokens"] == 8
    assert record["cached_s"] > 0 and record["full_s"] > 0 and record["tokens_identical"]
    assert set(record) >= {"cached_s", "full_s", "speedup", "machine"}
