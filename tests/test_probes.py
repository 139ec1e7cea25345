"""Model probes: neuron sparsity against an independent computation, device histograms against the
tensors, norms and update ratios, and the probe wiring of a training run."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
import torch.nn.functional as F

from bdh_fast import train
from bdh_fast.model import BDH, BDHConfig, rope, rope_frequencies
from bdh_fast.telemetry.probes import Probes

from test_train import tiny_args


def manual_neurons(model: BDH, idx: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """x_s and y_s of every layer, straight from BDH.md's equations (eval mode: no dropout)."""
    c = model.config
    ln = lambda t: F.layer_norm(t, t.shape[-1:])  # noqa: E731
    B, T = idx.shape
    x = ln(model.embed(idx)).unsqueeze(1)
    phases = torch.arange(T, dtype=torch.float32)[:, None] * rope_frequencies(c.neurons_per_head)
    mask = torch.tril(torch.ones(T, T), diagonal=-1)
    out = []
    for _ in range(c.n_layer):
        x_s = F.relu(x @ model.encoder)
        qr = rope(x_s, phases)
        a = ln(((qr @ qr.transpose(-1, -2)) * mask) @ x)
        y_s = F.relu(a @ model.encoder_v)
        out.append((x_s, y_s))
        m = (x_s * y_s).transpose(1, 2).reshape(B, 1, T, -1) @ model.decoder
        x = ln(x + ln(m))
    return out


@pytest.fixture
def probed():
    torch.manual_seed(0)
    model = BDH(BDHConfig(n_layer=3, n_embd=32, n_head=2, mlp_internal_dim_multiplier=8, dropout=0.1))
    idx = torch.randint(256, (4, 24), generator=torch.Generator().manual_seed(1))
    return model, idx, Probes(model, idx, bins=16, autocast=contextlib.nullcontext)


def test_neuron_statistics_equal_an_independent_computation(probed):
    model, idx, probes = probed
    with torch.no_grad():
        expected = manual_neurons(model, idx)
    metrics, _ = probes.collect()
    assert model.training  # the probe forward restored the mode
    for i, (x_s, y_s) in enumerate(expected):
        xy = x_s * y_s
        for key, t in (("x", x_s), ("y", y_s), ("xy", xy)):
            assert metrics[f"model/sparsity/{key}/layer{i}"] == pytest.approx((t != 0).double().mean().item(), abs=1e-9)
            assert metrics[f"model/active_mean/{key}/layer{i}"] == pytest.approx(t[t != 0].double().mean().item(), rel=1e-5)
        for key, t in (("x", x_s), ("y", y_s)):
            dead = 1 - (t > 0).any(dim=2).any(dim=0).double().mean().item()
            assert metrics[f"model/dead/{key}/layer{i}"] == pytest.approx(dead, abs=1e-12)
    assert f"model/sparsity/x/layer{len(expected)}" not in metrics
    # at initialisation, about half of x_s and y_s and a quarter of x_s*y_s are non-zero (BDH.md)
    assert 0.35 < metrics["model/sparsity/x/layer0"] < 0.65
    assert 0.15 < metrics["model/sparsity/xy/layer0"] < 0.35


def test_histograms_match_the_tensors_and_norms_and_update_ratios(probed):
    model, idx, probes = probed
    loss = model(idx, idx)[1]
    loss.backward()
    probes.before_update()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.01 * p.grad
    metrics, histograms = probes.collect()
    for name, p in model.named_parameters():
        short = name.removesuffix(".weight")
        for kind, t in (("weights", p.detach()), ("grads", p.grad)):
            h = histograms[f"model/{kind}/{short}"]
            assert sum(h.bucket_counts) == t.numel() == h.num
            assert h.min == pytest.approx(t.min().item()) and h.max == pytest.approx(t.max().item())
            assert h.sum == pytest.approx(t.double().sum().item(), rel=1e-4, abs=1e-6)
            assert h.sum_squares == pytest.approx(t.double().square().sum().item(), rel=1e-4)
            assert len(h.bucket_counts) == 16
        assert metrics[f"model/param_norm/{short}"] == pytest.approx(p.norm().item(), rel=1e-6)
        ratio = (p.detach() - before[name]).norm().item() / p.norm().item()
        assert metrics[f"model/update_ratio/{short}"] == pytest.approx(ratio, rel=1e-5)


def test_probe_runs_every_probe_freq_and_at_the_end(corpus, tmp_path):
    assert train.main(tiny_args(corpus, tmp_path, "p", "--max_iters", "25", "--probe_freq", "10",
                                "--hist_bins", "8", "--metrics", "full")) == 0
    records = [json.loads(l) for l in (tmp_path / "p" / "metrics.jsonl").read_text().splitlines()]
    probe_steps = sorted({r["step"] for r in records if "model/sparsity/x/layer0" in r})
    assert probe_steps == [10, 20, 25]
    hist_names = {r["name"] for r in records if r.get("event") == "histogram"}
    assert {"model/weights/encoder", "model/grads/decoder", "model/weights/embed"} <= hist_names
    assert all(len(r["bucket_counts"]) == 8 for r in records if r.get("event") == "histogram")
