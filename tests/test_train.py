"""End-to-end tests of `python -m bdh_fast.train` (in-process, tiny preset, mostly eager)."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest
import torch

from bdh_fast import flags, train
from bdh_fast.config import RunConfig, resolve
from bdh_fast.optim import lr_lambda


def tiny_args(corpus, out_dir, name, *extra) -> list[str]:
    return ["--preset", "tiny", "--no-compile", "--data", str(corpus), "--out_dir", str(out_dir),
            "--run_name", name, "--no_progress", "--nvml_interval", "0", *extra]


def metric_records(run_dir: pathlib.Path, key: str | None = "train/loss") -> list[dict]:
    """metrics.jsonl's metric records (not events) holding `key` (None: all of them)."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "event" not in r and (key is None or key in r)]


def test_run_writes_config_checkpoint_metrics_and_reference_console(corpus, tmp_path, capsys):
    assert train.main(tiny_args(corpus, tmp_path, "r", "--max_iters", "20", "--log_freq", "10")) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("bdh_fast: cpu") and "preset tiny" in out[0]
    assert [l.split(" loss")[0] for l in out if l.startswith("Step:")] == ["Step: 10/20", "Step: 20/20"]
    assert "Training done" in out
    assert out[-1].startswith("To be or ") and len(out[-1].encode()) >= 100

    run_dir = tmp_path / "r"
    config = json.loads((run_dir / "config.json").read_text())
    assert config["n_layer"] == 2 and config["max_iters"] == 20 and config["n_params"] > 0
    ckpt = torch.load(run_dir / "ckpt.pt", weights_only=True)
    assert {"model", "optimizer", "scheduler", "step", "config", "rng"} <= set(ckpt)
    assert ckpt["step"] == 20 and not any(k.startswith("_orig_mod") for k in ckpt["model"])

    records = metric_records(run_dir)
    assert [r["step"] for r in records] == list(range(1, 21))  # every step, at its own number
    for r in records:
        assert {"train/loss", "train/lr", "train/grad_norm", "train/grad_norm/group_neurons",
                "train/sparsity/x/layer1", "perf/step_ms", "perf/tokens_per_sec"} <= set(r)
    # the console mean is computed from the same flushed rows
    console_first = float(next(l for l in out if l.startswith("Step: 10/")).split("loss ")[1])
    mean_first = sum(r["train/loss"] for r in records[:10]) / 10
    assert console_first == pytest.approx(mean_first, abs=6e-3)
    assert records[-1]["train/loss"] < records[0]["train/loss"]  # it learns


def test_resume_is_exact_and_logs_each_step_once(corpus, tmp_path):
    assert train.main(tiny_args(corpus, tmp_path, "straight", "--max_iters", "30", "--dropout", "0.1")) == 0
    assert train.main(tiny_args(corpus, tmp_path, "split", "--max_iters", "15", "--dropout", "0.1")) == 0
    assert train.main(["--resume", str(tmp_path / "split"), "--max_iters", "30", "--no_progress"]) == 0
    a = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "ckpt.pt", weights_only=True)
    assert a["step"] == b["step"] == 30
    for name, tensor in a["model"].items():
        torch.testing.assert_close(b["model"][name], tensor, rtol=0, atol=1e-6)
    steps = [r["step"] for r in metric_records(tmp_path / "split")]
    assert steps == list(range(1, 31))
    losses_a = [r["train/loss"] for r in metric_records(tmp_path / "straight")]
    losses_b = [r["train/loss"] for r in metric_records(tmp_path / "split")]
    assert losses_b == pytest.approx(losses_a, abs=1e-6)


def test_resume_accepts_a_checkpoint_file(corpus, tmp_path):
    assert train.main(tiny_args(corpus, tmp_path, "f", "--max_iters", "4")) == 0
    assert train.main(["--resume", str(tmp_path / "f" / "ckpt.pt"), "--max_iters", "6", "--no_progress"]) == 0
    assert torch.load(tmp_path / "f" / "ckpt.pt", weights_only=True)["step"] == 6


def _fails_with_one_line(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        sys.exit(train.main(argv))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    return err[0]


@pytest.mark.parametrize("flags, expected", [
    (["--n_layer", "0"], "--n_layer"),
    (["--n_layer", "two"], "--n_layer"),
    (["--lr", "nan"], "--lr"),
    (["--lr", "-1"], "--lr"),
    (["--dropout", "1.5"], "--dropout"),
    (["--val_fraction", "0"], "--val_fraction"),
    (["--n_head", "3"], "divisible"),
    (["--lr_schedule", "step"], "--lr_schedule"),
    (["--dtype", "int8"], "--dtype"),
    (["--log_backend", "tensorboard,mlflow"], "mlflow"),
    (["--device", "cuda"] if not torch.cuda.is_available() else ["--n_embd", "-4"], "cu" if not torch.cuda.is_available() else "--n_embd"),
])
def test_bad_flags_get_one_line_and_status_2(corpus, tmp_path, capsys, flags, expected):
    line = _fails_with_one_line(tiny_args(corpus, tmp_path, "bad", *flags), capsys)
    assert expected in line
    assert not (tmp_path / "bad" / "ckpt.pt").exists()


def test_bad_data_gets_one_line(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    short = tmp_path / "short.txt"
    short.write_bytes(b"abc" * 30)
    for path, expected in [(tmp_path / "missing.txt", "does not exist"), (tmp_path, "directory"),
                           (empty, "empty"), (short, "split")]:
        line = _fails_with_one_line(tiny_args(path, tmp_path, "d"), capsys)
        assert expected in line, line


def test_bad_resume_gets_one_line_and_damages_nothing(corpus, tmp_path, capsys):
    assert train.main(tiny_args(corpus, tmp_path, "good", "--max_iters", "3")) == 0
    capsys.readouterr()
    ckpt = tmp_path / "good" / "ckpt.pt"
    before = ckpt.read_bytes()
    line = _fails_with_one_line(["--resume", str(tmp_path / "good"), "--n_layer", "3", "--n_embd", "32"], capsys)
    assert "n_layer (checkpoint 2, flag 3)" in line and "n_embd (checkpoint 64, flag 32)" in line
    assert ckpt.read_bytes() == before

    assert "does not exist" in _fails_with_one_line(["--resume", str(tmp_path / "nope" / "ckpt.pt")], capsys)
    assert "not a run directory" in _fails_with_one_line(["--resume", "/"], capsys)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(before[: len(before) // 2])
    assert "not a readable checkpoint" in _fails_with_one_line(["--resume", str(corrupt)], capsys)
    # a fresh run into an existing run directory would overwrite it: refused
    assert "--resume" in _fails_with_one_line(tiny_args(corpus, tmp_path, "good"), capsys)
    assert ckpt.read_bytes() == before


def test_resume_of_a_run_that_never_started_starts_it(corpus, tmp_path, capsys):
    """A preemption script passes the same flags plus --resume, even when the first try was killed
    before it made its directory: the run starts there, saying so."""
    run_dir = tmp_path / "later"
    assert train.main(tiny_args(corpus, tmp_path, "ignored", "--max_iters", "2", "--resume", str(run_dir))) == 0
    assert "does not exist yet" in capsys.readouterr().out
    assert torch.load(run_dir / "ckpt.pt", weights_only=True)["step"] == 2


def test_cpu_default_is_the_small_preset_announced_first():
    config = resolve({}, cuda_available=False)
    assert (config.preset, config.n_layer, config.n_embd, config.n_head, config.mlp_mult) == ("small", 3, 128, 4, 8)
    assert (config.batch_size, config.block_size, config.max_iters, config.lr_schedule) == (8, 128, 3600, "linear")
    ref = resolve({}, cuda_available=True)
    assert (ref.preset, ref.n_layer, ref.n_embd, ref.mlp_mult, ref.batch_size, ref.block_size,
            ref.max_iters, ref.lr, ref.weight_decay, ref.dropout) == \
        ("reference", 6, 256, 128, 32, 512, 3000, 1e-3, 0.1, 0.1)
    explicit = resolve({"n_layer": 3, "batch_size": 4}, cuda_available=False)
    assert explicit.n_layer == 3 and explicit.batch_size == 4 and explicit.n_embd == 128
    explicit = resolve({"n_layer": 5}, cuda_available=False)
    assert explicit.n_layer == 5 and explicit.max_iters == 3600


def test_auto_dtype_is_bf16_only_where_the_hardware_computes_it(monkeypatch):
    auto, cpu = RunConfig(), torch.device("cpu")
    assert isinstance(flags.cpu_has_native_bf16(), bool)  # the real probe answers on any torch
    monkeypatch.setattr(flags, "cpu_has_native_bf16", lambda: True)
    assert flags.pick_dtype(auto, cpu) == "bfloat16"
    monkeypatch.setattr(flags, "cpu_has_native_bf16", lambda: False)
    assert flags.pick_dtype(auto, cpu) == "float32"  # emulated bf16 is slower than float32
    assert flags.pick_dtype(RunConfig(dtype="bfloat16"), cpu) == "bfloat16"  # an explicit choice stands


def test_lr_schedules():
    def lrs(**kw):
        config = RunConfig(**{"max_iters": 10, "lr": 1.0, "min_lr": 0.1, **kw})
        factor = lr_lambda(config)
        return [factor(i) for i in range(10)]

    assert lrs() == [1.0] * 10
    warm = lrs(warmup_iters=4)
    assert warm[:4] == [0.25, 0.5, 0.75, 1.0] and warm[4:] == [1.0] * 6
    cos = lrs(lr_schedule="cosine")
    assert cos[0] == 1.0 and all(a >= b for a, b in zip(cos, cos[1:])) and cos[-1] > 0.1
    lin = lrs(lr_schedule="linear")
    assert lin[5] == pytest.approx(1 - 0.9 * 0.5)


def test_help_lists_every_flag():
    out = subprocess.run([sys.executable, "-m", "bdh_fast.train", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for flag in ["--data", "--out_dir", "--run_name", "--preset", "--n_layer", "--n_embd", "--n_head",
                 "--mlp_mult", "--dropout", "--batch_size", "--block_size", "--max_iters", "--lr",
                 "--min_lr", "--warmup_iters", "--lr_schedule", "--weight_decay", "--grad_clip",
                 "--seed", "--device", "--dtype", "--compile", "--no-compile", "--log_freq",
                 "--ckpt_freq", "--resume", "--val_fraction", "--log_train_freq", "--log_backend",
                 "--wandb_project", "--wandb_entity", "--wandb_mode", "--on_nonfinite",
                 "--peak_tflops", "--nvml_interval", "--no_progress", "--eval_freq", "--eval_iters",
                 "--generate_freq"]:
        assert flag in out, flag
