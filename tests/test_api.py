"""The public interface (the seed's): Logger, evaluate, generate_samples, get_grad_norm, and the
Telemetry seam driven by a loop of its own, with any nn.Module. Each is the code the CLI runs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from bdh_fast.evaluate import evaluate, generate_samples
from bdh_fast.logger import Logger
from bdh_fast.model import BDH, BDHConfig
from bdh_fast.ops import STATS_SIZE
from bdh_fast.telemetry import Telemetry
from bdh_fast.telemetry.grads import get_grad_norm

from test_backends import load_tensorboard, read_jsonl
from test_telemetry import count_host_reads

TINY = BDHConfig(n_layer=2, n_embd=32, n_head=2, mlp_internal_dim_multiplier=4, dropout=0.0)


class Bigram(torch.nn.Module):
    """Not BDH: an embedding and a linear layer, returning logits (B, T, V) only."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(256, 16)
        self.head = torch.nn.Linear(16, 256)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.embed(x))  # (B, T, V)


def batches(n: int, seed: int = 1, B: int = 3, T: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(256, (B, T), generator=g), torch.randint(256, (B, T), generator=g)) for _ in range(n)]


def test_logger_writes_every_backend_it_names(tmp_path):
    logger = Logger(backend="tensorboard,jsonl", project_name="p", config={"lr": 1e-3}, log_dir=tmp_path / "run")
    logger.log_metrics({"train/loss": 2.5, "train/lr": 1e-3}, 1)
    logger.log_text("notes", "hello", 1)
    logger.finish()
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert records == [{"step": 1, "train/loss": 2.5, "train/lr": 1e-3},
                       {"step": 1, "event": "text", "name": "notes", "text": "hello"}]
    assert [(e.step, e.value) for e in load_tensorboard(str(tmp_path / "run")).Scalars("train/loss")] == [(1, 2.5)]


def test_log_histogram_reduces_on_the_device_and_reads_only_the_buckets(tmp_path, monkeypatch):
    values = torch.randn(10_000, generator=torch.Generator().manual_seed(0))
    values[:3] = float("nan")  # counted apart, never in a bucket
    logger = Logger("jsonl", log_dir=tmp_path, hist_bins=32)
    reads = []
    real_tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: reads.append(self.numel()) or real_tolist(self))
    for name in ("cpu", "numpy", "__array__"):
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, **k: pytest.fail("a host copy of the tensor"))
    logger.log_histogram("w", values, 7)
    monkeypatch.undo()
    logger.finish()
    assert reads == [STATS_SIZE + 32]  # the statistics and the bucket counts, never the values
    (h,) = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if r.get("event") == "histogram"]
    finite = values[values.isfinite()]
    assert h["step"] == 7 and len(h["bucket_counts"]) == 32 and h["num"] == sum(h["bucket_counts"]) == finite.numel()
    assert h["min"] == pytest.approx(finite.min().item()) and h["max"] == pytest.approx(finite.max().item())
    assert h["sum"] == pytest.approx(finite.double().sum().item(), abs=1e-6)
    expected = torch.histc(finite.double(), bins=32, min=finite.min().item(), max=finite.max().item())
    assert sum(abs(a - b) for a, b in zip(h["bucket_counts"], expected.tolist())) <= 2  # edges: float rounding


def test_evaluate_takes_batches_or_a_batch_function_and_logits_only_models():
    torch.manual_seed(0)
    model = Bigram()
    data = batches(4)
    got = evaluate(model, data, 3)  # the first three batches
    logits = torch.cat([model(x) for x, _ in data[:3]])
    targets = torch.cat([y for _, y in data[:3]])
    assert got["loss"] == pytest.approx(F.cross_entropy(logits.flatten(0, 1), targets.flatten()).item(), rel=1e-6)
    assert got["perplexity"] == pytest.approx(math.exp(got["loss"]))
    assert got["accuracy"] == pytest.approx((logits.argmax(-1) == targets).double().mean().item())
    drawn = iter(data)
    assert evaluate(model, lambda: next(drawn), 3) == got
    with pytest.raises(ValueError, match="eval_iters"):
        evaluate(model, lambda: data[0])


def test_generate_samples_with_a_tokenizer_is_seeded():
    class Letters:  # ids are byte values: the model's vocabulary
        def encode(self, text):
            return [ord(c) for c in text]

        def decode(self, ids):
            return "".join(chr(i) for i in ids)

    torch.manual_seed(0)
    model = BDH(TINY)
    a = generate_samples(model, ["ab", "c"], Letters(), max_tokens=5, seed=3)
    assert [len(t) for t in a] == [5, 5]
    assert a == generate_samples(model, ["ab", "c"], Letters(), max_tokens=5, seed=3)
    text = generate_samples(model, ["ab"], max_tokens=5, seed=3)[0]  # bytes, by default
    assert len(text.encode("utf-8", "backslashreplace")) >= 5


def test_get_grad_norm_is_the_global_norm_reduced_on_the_device():
    torch.manual_seed(0)
    model = BDH(TINY)
    x, y = batches(1)[0]
    model(x, y)[1].backward()
    model.encoder.grad = None  # no gradient: counts as zero
    reads: list[str] = []
    with count_host_reads(reads):
        norm = get_grad_norm(model)
    assert reads == [] and isinstance(norm, torch.Tensor) and norm.dim() == 0 and norm.dtype == torch.float32
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    torch.testing.assert_close(norm, torch.nn.utils.get_total_norm(grads), rtol=1e-6, atol=0)


@pytest.mark.parametrize("make_model", [Bigram, lambda: BDH(TINY)], ids=["bigram", "bdh"])
def test_telemetry_in_a_loop_of_its_own_with_any_module(tmp_path, make_model):
    torch.manual_seed(0)
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = batches(6)
    telemetry = Telemetry(model, optimizer, log_dir=tmp_path, max_iters=6, log_train_freq=4, tokens_per_step=48,
                          probe_freq=3, hist_bins=8, probe_batch=data[0][0], metrics="full")
    for step, (x, y) in enumerate(data, start=1):
        out = model(x, y)
        loss = out[1] if isinstance(out, tuple) else F.cross_entropy(out.flatten(0, 1), y.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        telemetry.after_backward(loss)
        optimizer.step()
        telemetry.step(step)
    telemetry.close()
    records = read_jsonl(tmp_path / "metrics.jsonl")
    steps = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 7))
    assert all({"train/lr", "train/grad_norm", "perf/step_ms", "perf/tokens_per_sec"} <= set(r) for r in steps)
    probes = [r for r in records if any(k.startswith("model/param_norm/") for k in r)]
    assert [r["step"] for r in probes] == [3, 6]
    assert {r["name"] for r in records if r.get("event") == "histogram"} >= {
        f"model/{kind}/{name.removesuffix('.weight')}" for kind in ("weights", "grads")
        for name, _ in model.named_parameters()}
    neurons = any(k.startswith("model/sparsity/") for r in probes for k in r)
    assert neurons == isinstance(model, BDH)  # BDH's neuron statistics attach to BDH only
    # this loop leaves BDH's every-step channel off: its steps log no train/sparsity, and nothing breaks
    assert telemetry.neuron_stats == isinstance(model, BDH)
    assert not any(k.startswith("train/sparsity/") for r in steps for k in r)
