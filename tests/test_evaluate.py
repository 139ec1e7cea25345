"""Evaluation and samples: exact metrics, fixed batches, no disturbance of training, no recompiles."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from bdh_fast import train
from bdh_fast.evaluate import evaluate, generate_samples
from bdh_fast.model import BDH, BDHConfig

from test_telemetry import make_trainer
from test_train import metric_records, tiny_args


def test_metrics_equal_an_independent_computation():
    torch.manual_seed(0)
    model = BDH(BDHConfig(n_layer=2, n_embd=32, n_head=2, mlp_internal_dim_multiplier=4, dropout=0.2))
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randint(256, (3, 16), generator=g), torch.randint(256, (3, 16), generator=g))
               for _ in range(4)]
    got = evaluate(model, batches)
    assert model.training  # restored

    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(x)[0] for x, _ in batches])  # (4*3, 16, V)
    targets = torch.cat([y for _, y in batches])
    loss = F.cross_entropy(logits.reshape(-1, 256).double(), targets.reshape(-1)).item()
    accuracy = (logits.argmax(-1) == targets).double().mean().item()
    assert got["loss"] == pytest.approx(loss, rel=1e-6)
    assert got["perplexity"] == pytest.approx(math.exp(loss), rel=1e-6)
    assert got["accuracy"] == pytest.approx(accuracy, abs=1e-12)


def test_eval_uses_fixed_batches_and_one_host_read(corpus, tmp_path, monkeypatch):
    trainer = make_trainer(corpus, tmp_path, max_iters=2, eval_freq=1, eval_iters=3)
    try:
        val = trainer.telemetry.eval_batches["val"]
        assert len(val) == 3 and len(trainer.telemetry.eval_batches["train"]) == 3
        reads = []
        real = torch.Tensor.tolist
        monkeypatch.setattr(torch.Tensor, "tolist", lambda self: reads.append(1) or real(self))
        first = trainer.evaluate()
        assert len(reads) == 2  # one per split
        monkeypatch.undo()
        trainer.train_step(1)
        trainer.step = 1
        assert all(torch.equal(a[0], b[0]) for a, b in zip(val, trainer.telemetry.eval_batches["val"]))
        second = trainer.evaluate()
        assert second["val/loss"] != first["val/loss"]  # same batches, new weights
    finally:
        trainer.close()


def test_evaluation_and_sampling_do_not_disturb_training(corpus, tmp_path):
    common = ["--max_iters", "12", "--dropout", "0.2", "--log_train_freq", "4"]
    assert train.main(tiny_args(corpus, tmp_path, "plain", *common, "--eval_freq", "0", "--generate_freq", "0")) == 0
    assert train.main(tiny_args(corpus, tmp_path, "evals", *common, "--eval_freq", "3", "--eval_iters", "2",
                                "--generate_freq", "5", "--sample_tokens", "8")) == 0
    plain = [r["train/loss"] for r in metric_records(tmp_path / "plain") if "train/loss" in r]
    evals = [r["train/loss"] for r in metric_records(tmp_path / "evals") if "train/loss" in r]
    assert plain == evals
    records = metric_records(tmp_path / "evals", key=None)
    assert [r["step"] for r in records if "val/loss" in r] == [3, 6, 9, 12]
    for r in (r for r in records if "val/loss" in r):
        assert r["val/perplexity"] == pytest.approx(math.exp(r["val/loss"]), rel=1e-9)
        assert r["val/bpb"] == pytest.approx(r["val/loss"] / math.log(2), rel=1e-9)  # a token is a byte
        assert 0 <= r["val/accuracy"] <= 1 and r["train/loss_eval"] > 0


def test_samples_are_logged_per_prompt_and_reproducible(corpus, tmp_path):
    import json

    assert train.main(tiny_args(corpus, tmp_path, "s", "--max_iters", "4", "--generate_freq", "2",
                                "--sample_tokens", "12", "--prompts", "To be", "\xe9t\xe9")) == 0
    tables = [json.loads(l) for l in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()
              if '"table"' in l]
    assert [t["step"] for t in tables] == [2, 4]
    assert [row[1] for row in tables[0]["rows"]] == ["To be", "\xe9t\xe9"]
    assert all(len(row[2].encode("utf-8", "backslashreplace")) >= 12 for t in tables for row in t["rows"])

    model = BDH(BDHConfig(n_layer=1, n_embd=32, n_head=2, mlp_internal_dim_multiplier=4))
    state = torch.get_rng_state()
    a = generate_samples(model, ["ab"], max_tokens=10, temperature=1.0, top_k=None, seed=5)
    b = generate_samples(model, ["ab"], max_tokens=10, temperature=1.0, top_k=None, seed=5)
    assert a == b and torch.equal(state, torch.get_rng_state())


@pytest.mark.compiled
def test_evaluation_reuses_compiled_graphs(corpus, tmp_path):
    from torch._dynamo.utils import counters

    trainer = make_trainer(corpus, tmp_path, max_iters=4, compile=True, eval_freq=1, eval_iters=2)
    try:
        trainer.train_step(1)
        trainer.step = 1
        trainer.evaluate()  # the first evaluation compiles the eval-mode graph once
        before = dict(counters["stats"])
        assert before.get("unique_graphs", 0) >= 2  # train and eval graphs were counted
        for step in (2, 3, 4):
            trainer.train_step(step)
            trainer.step = step
            trainer.evaluate()
        assert dict(counters["stats"]) == before  # no compile and no recompile since
    finally:
        trainer.close()
