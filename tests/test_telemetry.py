"""Invariants of the training telemetry (DESIGN.md 1-6): zero host syncs between flushes, one copy
per flush, fused grad norms equal to torch's, non-finite handling, failing backends."""

from __future__ import annotations

import contextlib

import pytest
import torch

from bdh_fast import train
from bdh_fast.config import resolve
from bdh_fast.telemetry import backends
from bdh_fast.telemetry.buffer import StepBuffer
from bdh_fast.telemetry.grads import GradNorms, SpikeDetector

from test_train import metric_records, tiny_args

# Host reads of tensor values: each one is (or would be, on a GPU) a device->host sync.
HOST_READS = ["item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__",
              "__repr__", "__format__"]


@contextlib.contextmanager
def count_host_reads(log: list[str], paused: dict | None = None):
    """Count host reads of tensors while active; `paused["on"]` suspends counting (data pipeline)."""
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}
    paused = paused if paused is not None else {"on": False}

    def wrap(name, fn):
        def counted(self, *args, **kwargs):
            if not paused["on"]:
                log.append(name)
            return fn(self, *args, **kwargs)
        return counted

    for name, fn in originals.items():
        setattr(torch.Tensor, name, wrap(name, fn))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)


def make_trainer(corpus, tmp_path, **overrides) -> train.Trainer:
    values = dict(preset="tiny", compile=False, data=str(corpus), out_dir=str(tmp_path), run_name="t",
                  progress=False, nvml_interval=0.0, log_backend="jsonl", eval_freq=0,
                  generate_freq=0, ckpt_freq=0)
    values.update(overrides)
    return train.Trainer(resolve(values, cuda_available=torch.cuda.is_available()), None)


def test_no_host_reads_between_flushes(corpus, tmp_path):
    trainer = make_trainer(corpus, tmp_path, max_iters=12, log_train_freq=4, grad_clip=1.0,
                           log_freq=100)
    reads: list[str] = []
    flushes: list[int] = []
    real_flush = trainer.flush

    def flush():
        flushes.append(trainer.step)
        real_flush()  # reads inside a flush are its one allowed sync

    trainer.flush = flush
    # The data pipeline (CPU-side offsets, pinned copies) is outside the invariant.
    paused = {"on": False}
    real_batch = trainer.data.get_batch

    def get_batch(split):
        paused["on"] = True
        try:
            return real_batch(split)
        finally:
            paused["on"] = False

    trainer.data.get_batch = get_batch
    per_step = {}
    try:
        for step in range(1, 13):
            with count_host_reads(reads, paused):
                trainer.train_step(step)
            per_step[step] = list(reads)
            reads.clear()
            trainer.step = step
            if len(trainer.telemetry.buffer) == trainer.config.log_train_freq:
                trainer.flush()
    finally:
        trainer.close()
    assert flushes[:3] == [4, 8, 12]  # (close() flushes the empty remainder)
    assert per_step == {s: [] for s in range(1, 13)}, per_step
    assert [r["step"] for r in metric_records(tmp_path / "t")] == list(range(1, 13))


def test_fit_flushes_only_on_window_console_and_end(corpus, tmp_path):
    trainer = make_trainer(corpus, tmp_path, max_iters=13, log_train_freq=5, log_freq=100)
    flushed_at: list[int] = []
    real = trainer.telemetry.buffer.flush

    def spy(*args):
        flushed_at.append(trainer.step)
        return real(*args)

    trainer.telemetry.buffer.flush = spy
    try:
        trainer.fit()
    finally:
        trainer.close()
    assert flushed_at[:3] == [5, 10, 13]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_no_sync_on_cuda_under_sync_debug_mode(corpus, tmp_path):
    trainer = make_trainer(corpus, tmp_path, max_iters=8, log_train_freq=4, device="cuda", grad_clip=1.0)
    try:
        trainer.train_step(1)  # warm-up: lazy init may sync once
        trainer.flush()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for step in range(2, 6):
                trainer.train_step(step)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        trainer.flush()
    finally:
        trainer.close()


def test_buffer_keeps_every_step_and_flushes_in_one_copy(monkeypatch):
    buffer = StepBuffer(["a", "b"], window=3, device=torch.device("cpu"))
    for step in range(3):
        buffer.record(step + 10, torch.tensor([float(step), float(step) * 2]), {"lr": step / 10})
    assert buffer.full
    with pytest.raises(RuntimeError):
        buffer.record(99, torch.zeros(2))
    copies = []
    real_copy = torch.Tensor.copy_
    monkeypatch.setattr(torch.Tensor, "copy_", lambda self, src, *a, **k: copies.append(1) or real_copy(self, src, *a, **k))
    rows = buffer.flush()
    assert len(copies) == 1
    assert rows == [(10, {"a": 0.0, "b": 0.0, "lr": 0.0}), (11, {"a": 1.0, "b": 2.0, "lr": 0.1}),
                    (12, {"a": 2.0, "b": 4.0, "lr": 0.2})]
    assert len(buffer) == 0 and buffer.flush() == []


def _params_with_grads(dtypes=(torch.float32,)):
    g = torch.Generator().manual_seed(0)
    named = []
    for i, shape in enumerate([(7, 3), (11,), (2, 5, 4), (13, 1), (3,)]):
        p = torch.nn.Parameter(torch.randn(shape, generator=g).to(dtypes[i % len(dtypes)]))
        p.grad = torch.randn(shape, generator=g).to(p.dtype) * (i + 1)
        named.append((f"p{i}", p))
    return named


@pytest.mark.parametrize("dtypes", [(torch.float32,), (torch.float32, torch.bfloat16)])
def test_grad_norms_match_torch(dtypes):
    named = _params_with_grads(dtypes)
    groups = {"a": ["p0", "p2"], "b": ["p1", "p3", "p4"]}
    norms = GradNorms(named, groups, torch.device("cpu")).compute()
    grads = [p.grad for _, p in named]
    total = torch.nn.utils.get_total_norm(grads).float()
    torch.testing.assert_close(norms[0], total, rtol=1e-6, atol=0)
    for i, g in enumerate(grads):
        torch.testing.assert_close(norms[1 + i], torch.linalg.vector_norm(g).float(), rtol=1e-6, atol=0)
    for j, members in enumerate(groups.values()):
        expected = torch.nn.utils.get_total_norm([dict(named)[m].grad for m in members]).float()
        torch.testing.assert_close(norms[1 + len(named) + j], expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("max_norm", [0.5, 1e6])
def test_clipping_matches_clip_grad_norm(max_norm, monkeypatch):
    named = _params_with_grads()
    reference = [p.grad.clone() for _, p in named]
    ref_params = [torch.nn.Parameter(torch.zeros_like(g)) for g in reference]
    for p, g in zip(ref_params, reference):
        p.grad = g
    ref_total = torch.nn.utils.clip_grad_norm_(ref_params, max_norm)

    calls = []
    real = torch._foreach_norm
    monkeypatch.setattr(torch, "_foreach_norm", lambda *a, **k: calls.append(1) or real(*a, **k))
    norms = GradNorms(named, {"all": [n for n, _ in named]}, torch.device("cpu")).compute(max_norm)
    assert len(calls) == 1  # one fused pass, reused by clipping
    torch.testing.assert_close(norms[0], ref_total, rtol=1e-6, atol=0)
    for (_, p), ref in zip(named, ref_params):
        torch.testing.assert_close(p.grad, ref.grad, rtol=1e-6, atol=0)


def _poison_grad_at(trainer: train.Trainer, bad_step: int):
    """From outside the model: the encoder's gradient becomes NaN at one step."""
    def hook(grad):
        return grad * float("nan") if trainer.step + 1 == bad_step else grad
    trainer.model.encoder.register_hook(hook)


def _fit_with_nan(corpus, tmp_path, mode, **kw):
    trainer = make_trainer(corpus, tmp_path, max_iters=12, log_train_freq=4, on_nonfinite=mode, **kw)
    _poison_grad_at(trainer, 6)
    real = trainer.train_step

    def step_and_count(step):
        real(step)
        trainer.step = step  # fit() sets it after; the hook reads it during backward

    trainer.train_step = step_and_count
    return trainer


def test_nonfinite_stop_names_the_step_and_keeps_the_last_good_checkpoint(corpus, tmp_path):
    trainer = _fit_with_nan(corpus, tmp_path, "stop", ckpt_freq=4)
    try:
        with pytest.raises(train.UserError, match="non-finite loss or gradient norm at step 6"):
            trainer.fit()
    finally:
        trainer.close()
    state = torch.load(tmp_path / "t" / "ckpt.pt", weights_only=True)
    assert state["step"] == 4
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())  # update skipped on device
    assert max(r["step"] for r in metric_records(tmp_path / "t", key=None)) == 8  # the window was flushed


def test_nonfinite_skip_continues_with_finite_weights(corpus, tmp_path, capsys):
    trainer = _fit_with_nan(corpus, tmp_path, "skip")
    try:
        trainer.fit()
    finally:
        trainer.close()
    assert "non-finite loss or gradient norm at step 6" in capsys.readouterr().out
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    records = metric_records(tmp_path / "t")
    assert [r["step"] for r in records] == list(range(1, 13))
    assert records[5]["train/grad_norm"] is None  # non-finite values are logged (as null in JSON)


def test_a_failing_backend_never_stops_training(corpus, tmp_path, monkeypatch, capsys):
    calls = {"n": 0}
    real = backends.TensorBoardBackend.log_metrics

    def flaky(self, metrics, step):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full (injected)")
        return real(self, metrics, step)

    monkeypatch.setattr(backends.TensorBoardBackend, "log_metrics", flaky)  # in this process: a writer thread
    assert train.main(tiny_args(corpus, tmp_path, "flaky", "--max_iters", "12", "--log_writer", "thread",
                                "--log_backend", "tensorboard,jsonl")) == 0
    err = capsys.readouterr().err
    assert err.count("disk full (injected)") == 1
    assert [r["step"] for r in metric_records(tmp_path / "flaky")] == list(range(1, 13))


def test_tensorboard_has_every_metric_at_every_step_equal_to_jsonl(corpus, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert train.main(tiny_args(corpus, tmp_path, "tb", "--max_iters", "12", "--grad_clip", "1.0",
                                "--log_backend", "tensorboard,jsonl")) == 0
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    records = metric_records(tmp_path / "tb")
    names = {k for r in records for k in r if k != "step"}
    assert {"train/loss", "train/lr", "train/grad_norm", "perf/step_ms"} <= names
    for name in names:
        expected = {r["step"]: r[name] for r in records if name in r}
        got = {e.step: e.value for e in acc.Scalars(name)}
        assert got.keys() == expected.keys(), name
        for step, value in expected.items():
            assert got[step] == pytest.approx(value, rel=1e-6), (name, step)


def test_backend_none_logs_nothing_and_skips_grad_norms(corpus, tmp_path, capsys):
    trainer = make_trainer(corpus, tmp_path, max_iters=6, log_train_freq=3, log_freq=3, log_backend="none")
    try:
        # no norm pass: the step's row is the loss, its non-finite flag and the spike detector's columns
        assert trainer.telemetry.grad_norms.params == []
        assert trainer.telemetry.buffer.names == ["train/loss", "nonfinite", *SpikeDetector.COLUMNS]
        trainer.fit()
    finally:
        trainer.close()
    assert "Step: 6/6 loss" in capsys.readouterr().out
    assert not (tmp_path / "t" / "metrics.jsonl").exists()
    assert not list((tmp_path / "t").glob("events.out.tfevents.*"))


def test_sigterm_flushes_saves_and_closes(corpus, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    cmd = [sys.executable, "-m", "bdh_fast.train", *tiny_args(corpus, tmp_path, "term", "--max_iters", "100000",
                                                               "--log_train_freq", "1000", "--ckpt_freq", "0")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (tmp_path / "term" / "metrics.jsonl").exists():
        time.sleep(0.2)
    time.sleep(2.0)  # let it take some steps, all still buffered on the device
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "--resume" in err
    steps = [r["step"] for r in metric_records(tmp_path / "term")]
    assert steps and steps == list(range(1, len(steps) + 1))  # the buffered window was flushed
    state = torch.load(tmp_path / "term" / "ckpt.pt", weights_only=True)
    assert state["step"] == steps[-1]
