"""Durable checkpoint writes and the sane range of every flag.

Each bad value must be one line naming the flag, exit status 2, and nothing on disk (DESIGN.md
invariant 7); each write that replaces a file must survive a power loss: the temporary file is
fsynced before os.replace and the directory after it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import stat
import subprocess
import sys

import pytest
import torch

from bdh_fast import checkpoint, train
from bdh_fast.config import PRESETS, RunConfig, resolve
from bdh_fast.flags import build_parser
from bdh_fast.errors import UserError

# --- durability --------------------------------------------------------------------------------


@pytest.fixture
def disk_events(monkeypatch):
    """Records os.fsync (what it synced: a file or a directory, by inode) and os.replace, in order."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        st = os.fstat(fd)
        events.append(("fsync", "dir" if stat.S_ISDIR(st.st_mode) else "file", st.st_ino))
        real_fsync(fd)

    def replace(src, dst, **kw):
        events.append(("replace", os.stat(src).st_ino, os.fspath(dst)))
        real_replace(src, dst, **kw)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


def assert_durable_replace(events, path):
    """The file's bytes were synced before the rename, and its directory after it."""
    ino, dir_ino = path.stat().st_ino, path.parent.stat().st_ino
    expected = [("fsync", "file", ino), ("replace", ino, str(path)), ("fsync", "dir", dir_ino)]
    mine = [e for e in events if e in expected]
    assert mine == expected, events


@pytest.mark.skipif(os.name == "nt", reason="directories cannot be fsynced on Windows")
def test_checkpoint_and_json_are_synced_around_the_replace(tmp_path, disk_events):
    ckpt = tmp_path / "ckpt.pt"
    checkpoint.save(ckpt, {"w": torch.arange(3.0)})
    assert_durable_replace(disk_events, ckpt)
    disk_events.clear()
    checkpoint.save(ckpt, {"w": torch.ones(3)})  # replacing an existing checkpoint: the same order
    assert_durable_replace(disk_events, ckpt)
    assert torch.equal(torch.load(ckpt, weights_only=True)["w"], torch.ones(3))

    disk_events.clear()
    config = tmp_path / "config.json"
    checkpoint.save_json(config, {"lr": 1e-3})
    assert_durable_replace(disk_events, config)
    assert json.loads(config.read_text()) == {"lr": 1e-3}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt", "config.json"]  # no temp file left


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    checkpoint.save(ckpt, {"step": 1})
    before = ckpt.read_bytes()

    def half_written(tmp):
        tmp.write_bytes(before[: len(before) // 2])
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        checkpoint.atomic_write_bytes(ckpt, half_written)
    assert ckpt.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


# --- every flag has a sane range ---------------------------------------------------------------


def test_every_numeric_flag_has_a_range_and_help_shows_it():
    numeric = [f for f in dataclasses.fields(RunConfig) if str(f.type).split(" ")[0] in ("int", "float")]
    assert len(numeric) > 30
    assert [f.name for f in numeric if "allowed" not in f.metadata] == []
    helps = {a.dest: a.help for a in build_parser()._actions}
    assert helps["hist_bins"].endswith("; in [1, 4096]") and helps["dropout"].endswith("; in [0, 1)")


@pytest.mark.parametrize("preset", [None, *PRESETS])
def test_defaults_and_presets_are_in_range(preset):
    explicit = {"preset": preset} if preset else {}
    config = resolve(explicit, cuda_available=False)
    assert 1 <= config.hist_bins <= 4096 and config.run_name


def test_values_at_the_bounds_are_accepted():
    config = resolve(dict(hist_bins=4096, run_name="lr3e-3 run", nvml_interval=0.1, top_k=256, seed=2**32 - 1,
                          dropout=0.0, lr=1.0, min_lr=1.0, lr_schedule="cosine", log_train_freq=100_000,
                          eval_iters=1000, temperature=1e-3, weight_decay=0.0), cuda_available=False)
    assert config.hist_bins == 4096 and config.run_name == "lr3e-3 run"
    assert resolve({"top_k": None}, cuda_available=False).top_k is None  # from code: no top-k at all


@pytest.mark.parametrize("values, expected", [
    ({"lr": float("inf")}, "--lr must be a finite number"),
    ({"weight_decay": float("nan")}, "--weight_decay must be a finite number"),
    ({"batch_size": 8.5}, "--batch_size must be an integer"),
    ({"max_iters": True}, "--max_iters must be an integer"),
    ({"dropout": "0.1"}, "--dropout must be a number"),
    ({"out_dir": "runs\0x"}, "--out_dir contains a NUL"),
    ({"prompts": "To be"}, "--prompts"),
])
def test_values_from_code_or_a_saved_config_are_checked_too(values, expected):
    # a resumed run's config comes from its checkpoint, not through argparse
    with pytest.raises(UserError, match=expected):
        RunConfig(**values)


def _fails_with_one_line(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        sys.exit(train.main(argv))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    return err[0]


BAD_FLAGS = [
    (["--hist_bins", "1000000000"], "--hist_bins must be in [1, 4096]"),
    (["--hist_bins", "0"], "--hist_bins"),
    (["--run_name", ""], "--run_name is empty"),
    (["--run_name", "   "], "--run_name is empty"),
    (["--run_name", "."], "--run_name '.'"),
    (["--run_name", ".."], "--run_name '..'"),
    (["--run_name", "../escape"], "contains '/'"),
    (["--run_name", "a/b"], "contains '/'"),
    (["--run_name", "a\0b"], "--run_name contains a NUL"),
    (["--run_name", "a\nb"], "control character"),
    (["--run_name", " lr3"], "white space"),
    (["--run_name", "x" * 256], "at most 255"),
    (["--out_dir", ""], "--out_dir is empty"),
    (["--batch_size", "1000000000"], "--batch_size"),
    (["--block_size", "10000000"], "--block_size"),
    (["--n_layer", "100000"], "--n_layer"),
    (["--n_embd", "1000000"], "--n_embd"),
    (["--n_head", "0"], "--n_head"),
    (["--mlp_mult", "1000000"], "--mlp_mult"),
    (["--max_iters", "1000000000000"], "--max_iters"),
    (["--warmup_iters", "-1"], "--warmup_iters"),
    (["--log_freq", "0"], "--log_freq"),
    (["--log_train_freq", "1000000000"], "--log_train_freq"),
    (["--eval_iters", "1000000"], "--eval_iters"),
    (["--eval_iters", "0"], "--eval_iters"),
    (["--sample_tokens", "0"], "--sample_tokens"),
    (["--sample_tokens", "100000000"], "--sample_tokens"),
    (["--ckpt_freq", "-1"], "--ckpt_freq"),
    (["--probe_freq", "-5"], "--probe_freq"),
    (["--eval_freq", "-1"], "--eval_freq"),
    (["--generate_freq", "-1"], "--generate_freq"),
    (["--nvml_interval", "0.001"], "--nvml_interval must be 0 (off) or at least 0.1"),
    (["--nvml_interval", "-1"], "--nvml_interval"),
    (["--nvml_interval", "1e9"], "--nvml_interval"),
    (["--profile_wait", "-1"], "--profile_wait"),
    (["--profile_warmup", "100000"], "--profile_warmup"),
    (["--profile_active", "0"], "--profile_active"),
    (["--profile_active", "1000000"], "--profile_active"),
    (["--profile_repeat", "1000000"], "--profile_repeat"),
    (["--memory_snapshot", "1000000"], "--memory_snapshot"),
    (["--top_k", "-1"], "--top_k"),
    (["--top_k", "100000"], "--top_k must be in [0, 256]"),
    (["--seed", "-1"], "--seed"),
    (["--seed", str(2**64)], "--seed"),
    (["--lr", "inf"], "--lr"),
    (["--lr", "2"], "--lr must be in (0, 1]"),
    (["--lr", "0"], "--lr"),
    (["--min_lr", "-1e-4"], "--min_lr"),
    (["--min_lr", "nan"], "--min_lr"),
    (["--lr_schedule", "cosine", "--lr", "1e-5"], "--min_lr 0.0001 is above --lr 1e-05"),
    (["--dropout", "1"], "--dropout must be in [0, 1)"),
    (["--dropout", "-0.1"], "--dropout"),
    (["--weight_decay", "-0.1"], "--weight_decay must be >= 0"),
    (["--weight_decay", "inf"], "--weight_decay"),
    (["--grad_clip", "-1"], "--grad_clip must be >= 0"),
    (["--temperature", "0"], "--temperature must be > 0"),
    (["--temperature", "nan"], "--temperature"),
    (["--val_fraction", "1"], "--val_fraction"),
    (["--val_fraction", "-inf"], "--val_fraction"),
    (["--peak_tflops", "0"], "--peak_tflops"),
    (["--wandb_project", "team/project"], "--wandb_project"),
    (["--wandb_project", ""], "--wandb_project"),
    (["--wandb_entity", ""], "--wandb_entity"),
]


@pytest.mark.parametrize("flags, expected", BAD_FLAGS, ids=[" ".join(f).encode("unicode_escape").decode()[:40] for f, _ in BAD_FLAGS])
def test_absurd_values_get_one_line_status_2_and_write_nothing(corpus, tmp_path, capsys, flags, expected):
    out_dir = tmp_path / "out"
    argv = ["--preset", "tiny", "--no-compile", "--data", str(corpus), "--out_dir", str(out_dir),
            "--run_name", "r", "--no_progress", "--nvml_interval", "0", *flags]
    line = _fails_with_one_line(argv, capsys)
    assert expected in line, line
    assert not out_dir.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # not even the parent of a '..' name


def test_command_line_rejects_a_huge_histogram_before_touching_memory(corpus, tmp_path):
    out = subprocess.run([sys.executable, "-m", "bdh_fast.train", "--preset", "tiny", "--data", str(corpus),
                          "--out_dir", str(tmp_path / "out"), "--hist_bins", "1000000000"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stdout == "" and len(out.stderr.strip().splitlines()) == 1
    assert "--hist_bins must be in [1, 4096] (got 1000000000)" in out.stderr
    assert not (tmp_path / "out").exists()
