"""BDH's neuron statistics at every training step (issue 16, item 1): the model's optional channel
`forward(..., neuron_stats=True)`, its values against the fixed-batch probe's independent
computation, one compiled graph with no break and no recompilation, and the step buffer's columns."""

from __future__ import annotations

import pytest
import torch

from bdh_fast.config import PRESETS
from bdh_fast.model import BDH, NEURON_STATS, BDHConfig
from bdh_fast.telemetry.buffer import StepBuffer
from bdh_fast.telemetry.probes import _NeuronStats

from test_train import metric_records, tiny_args

CONFIG = BDHConfig(n_layer=3, n_embd=32, n_head=2, mlp_internal_dim_multiplier=8, dropout=0.0)


def batch(seed: int = 0, B: int = 3, T: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (B, T), generator=g), torch.randint(0, 256, (B, T), generator=g)


def test_the_channel_leaves_logits_loss_and_gradients_unchanged():
    torch.manual_seed(0)
    model = BDH(CONFIG)
    x, y = batch()
    logits, loss = model(x, y)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    logits_s, loss_s, stats = model(x, y, neuron_stats=True)
    loss_s.backward()
    assert torch.equal(logits, logits_s) and torch.equal(loss, loss_s)
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))
    assert stats.shape == (CONFIG.n_layer, len(NEURON_STATS)) and stats.dtype == torch.float32
    assert not stats.requires_grad


def test_the_statistics_equal_the_probes_independent_computation():
    """The probe sees x_s and y_s through a TorchFunctionMode on ReLU and reduces them with ops.tensor_stats:
    another path to the same six numbers per layer (dropout 0: x_s * y_s is what the decoder reads)."""
    torch.manual_seed(1)
    model = BDH(CONFIG).train()
    for _ in range(3):  # weights that are not the init's, so that the fractions spread out
        _, loss = model(*batch(2))
        loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.5 * p.grad
        model.zero_grad()
    x, y = batch(3)
    _, _, stats = model(x, y, neuron_stats=True)
    probe = _NeuronStats()
    with torch.no_grad(), probe:
        model(x)
    expected = torch.stack(probe.layers)[:, :len(NEURON_STATS)].float()  # the probe's first six, same order
    torch.testing.assert_close(stats, expected, rtol=1e-5, atol=1e-7)
    fractions = stats[:, 0::2]
    assert ((fractions > 0) & (fractions < 1)).all()
    assert (stats[:, 4] <= torch.minimum(stats[:, 0], stats[:, 2]) + 1e-6).all()  # xy non-zero only where both are


def test_compiled_training_with_the_channel_is_one_graph_without_recompiling():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = BDH(CONFIG)
    compiled = torch.compile(model, dynamic=False, fullgraph=True)  # fullgraph: a graph break raises
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(3):
        x, y = batch(step)
        _, loss, stats = compiled(x, y, neuron_stats=True)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["graph_break"] and not counters["recompiles"]
    _, _, eager = model(x, y, neuron_stats=True)  # the weights after step 3 moved: recompute this batch
    _, _, again = compiled(x, y, neuron_stats=True)
    torch.testing.assert_close(again, eager, rtol=1e-5, atol=1e-6)
    assert counters["stats"]["unique_graphs"] == 1


def test_a_step_without_the_optional_columns_logs_only_its_own():
    buffer = StepBuffer(["train/loss", "a", "b"], 4, torch.device("cpu"))
    buffer.record(1, torch.tensor([1.0, 2.0, 3.0]))
    buffer.record(2, torch.tensor([4.0]))  # only the first column
    buffer.record(3, torch.tensor([5.0, 6.0, 7.0]))
    assert buffer.flush() == [(1, {"train/loss": 1.0, "a": 2.0, "b": 3.0}), (2, {"train/loss": 4.0}),
                              (3, {"train/loss": 5.0, "a": 6.0, "b": 7.0})]
    with pytest.raises(ValueError):
        buffer.record(4, torch.zeros(4))


def test_every_training_step_logs_every_layers_statistics(corpus, tmp_path):
    from bdh_fast import train

    assert train.main(tiny_args(corpus, tmp_path, "r", "--max_iters", "12", "--probe_freq", "0",
                                "--eval_freq", "0", "--generate_freq", "0")) == 0
    records = metric_records(tmp_path / "r")
    n_layer = PRESETS["tiny"]["n_layer"]
    names = {f"train/{stat}/layer{i}" for i in range(n_layer) for stat in NEURON_STATS}
    assert [r["step"] for r in records] == list(range(1, 13))
    for r in records:
        assert names <= set(r)
        assert all(0 < r[f"train/sparsity/{t}/layer{i}"] <= 1 for t in ("x", "y", "xy") for i in range(n_layer))
        assert all(r[f"train/active_mean/{t}/layer{i}"] > 0 for t in ("x", "y", "xy") for i in range(n_layer))
    assert len({r["train/sparsity/x/layer0"] for r in records}) > 1  # measured at every step, not repeated


def test_the_model_knows_nothing_of_telemetry_and_the_channel_off_computes_nothing():
    """DESIGN.md invariant 4: model.py imports no other bdh_fast module, and with the channel off its
    forward runs exactly the ops it runs without one (no hidden reduction)."""
    import ast
    import pathlib

    from torch.utils._python_dispatch import TorchDispatchMode

    import bdh_fast.model

    tree = ast.parse(pathlib.Path(bdh_fast.model.__file__).read_text())
    imported = [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    imported += [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    assert not [name for name in imported if name.startswith("bdh_fast")]

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    model = BDH(CONFIG)
    x, y = batch()
    runs = {}
    for on in (False, True):
        with Ops() as mode:
            model(x, y, neuron_stats=on) if on else model(x, y)
        runs[on] = mode.ops
    assert "aten.ne" not in runs[False] and runs[True].count("aten.ne") == 3 * CONFIG.n_layer
    extra = list(runs[True])
    for op in runs[False]:  # every op of the plain forward, in order, and only reductions besides
        extra.remove(op)
    assert set(extra) <= {"aten.ne", "aten.sum", "aten._to_copy", "aten.div", "aten.clamp", "aten.stack",
                          "aten.detach", "aten.unsqueeze", "aten.cat", "aten.view"}, set(extra)
