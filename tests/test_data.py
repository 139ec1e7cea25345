"""Tests for bdh_fast.data: corpus location, splits, batches, RNG streams and error messages."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bdh_fast import data as data_mod
from bdh_fast.data import ByteDataset, decode, encode, resolve_data_path
from bdh_fast.errors import UserError

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared/data/tinyshakespeare.txt"


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """10,000 random bytes: any 16-byte window occurs once, so a batch row pins down its offset."""
    path = tmp_path / "corpus.bin"
    rng = np.random.default_rng(0)
    path.write_bytes(rng.integers(0, 256, size=10_000, dtype=np.uint8).tobytes())
    return path


def assert_one_line_user_error(excinfo: pytest.ExceptionInfo[UserError], *needles: str) -> str:
    message = str(excinfo.value)
    assert message and "\n" not in message
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    return message


# --- splits ---------------------------------------------------------------------------------


def test_default_split_is_90_10(corpus: Path) -> None:
    ds = ByteDataset(corpus, block_size=16, batch_size=4)
    assert (ds.train_len, ds.val_len) == (9_000, 1_000)
    assert ds.block_size == 16 and ds.batch_size == 4
    assert ds.path == corpus and ds.device == torch.device("cpu")


def test_custom_val_fraction(corpus: Path) -> None:
    ds = ByteDataset(corpus, block_size=16, batch_size=4, val_fraction=0.25)
    assert (ds.train_len, ds.val_len) == (7_500, 2_500)


@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason="no shared/data/tinyshakespeare.txt")
def test_real_corpus_split_and_batch() -> None:
    ds = ByteDataset(SHAKESPEARE, block_size=64, batch_size=8)
    assert ds.train_len + ds.val_len == 1_115_394
    assert (ds.train_len, ds.val_len) == (1_003_854, 111_540)
    x, y = ds.get_batch("val")
    assert x.shape == y.shape == (8, 64)
    # Tiny Shakespeare is plain ASCII.
    assert int(x.max()) < 128 and int(y.max()) < 128


# --- batch contents -------------------------------------------------------------------------


@pytest.mark.parametrize("split", ["train", "val"])
def test_batch_shapes_and_contents(corpus: Path, split: str) -> None:
    ds = ByteDataset(corpus, block_size=16, batch_size=8)
    raw = corpus.read_bytes()
    split_bytes = raw[: ds.train_len] if split == "train" else raw[ds.train_len :]
    x, y = ds.get_batch(split)
    assert x.shape == y.shape == (8, 16)
    assert x.dtype == y.dtype == torch.int64
    assert x.is_contiguous() and y.is_contiguous()
    assert torch.equal(x[:, 1:], y[:, :-1])
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        offset = split_bytes.find(bytes(row_x))
        assert offset >= 0, "x row is not a window of its split"
        assert offset + 16 < len(split_bytes)  # room for the target byte, inside the split
        assert bytes(row_y) == split_bytes[offset + 1 : offset + 17]


def test_unknown_split_is_rejected(corpus: Path) -> None:
    ds = ByteDataset(corpus, block_size=16, batch_size=2)
    with pytest.raises(ValueError, match="split"):
        ds.get_batch("test")


def test_block_size_filling_the_split_exactly(tmp_path: Path) -> None:
    # 110 bytes, val_fraction 0.1 -> val has 11 bytes: exactly block_size + 1 for T = 10.
    path = tmp_path / "small.txt"
    path.write_bytes(bytes(range(110)))
    ds = ByteDataset(path, block_size=10, batch_size=3)
    x, y = ds.get_batch("val")
    assert x.tolist() == [list(range(99, 109))] * 3
    assert y.tolist() == [list(range(100, 110))] * 3


# --- reproducibility ------------------------------------------------------------------------


def draw(ds: ByteDataset, n: int = 3) -> list[torch.Tensor]:
    return [ds.get_batch("train")[0] for _ in range(n)]


def test_same_seed_same_batches_different_seed_different(corpus: Path) -> None:
    a = draw(ByteDataset(corpus, block_size=16, batch_size=4, seed=7))
    b = draw(ByteDataset(corpus, block_size=16, batch_size=4, seed=7))
    c = draw(ByteDataset(corpus, block_size=16, batch_size=4, seed=8))
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert not all(torch.equal(p, q) for p, q in zip(a, c))


def test_global_rng_does_not_affect_stream(corpus: Path) -> None:
    torch.manual_seed(0)
    a = draw(ByteDataset(corpus, block_size=16, batch_size=4))
    torch.manual_seed(12345)
    ds = ByteDataset(corpus, block_size=16, batch_size=4)
    torch.rand(100)  # someone else consuming the global RNG between batches
    b = draw(ds)
    assert all(torch.equal(p, q) for p, q in zip(a, b))


def test_state_dict_resumes_exact_stream(corpus: Path) -> None:
    ds = ByteDataset(corpus, block_size=16, batch_size=4)
    draw(ds, 2)
    state = ds.state_dict()
    assert isinstance(state["generator_state"], torch.ByteTensor)
    expected = draw(ds, 3)

    resumed = ByteDataset(corpus, block_size=16, batch_size=4, seed=999)
    resumed.load_state_dict(state)
    assert all(torch.equal(p, q) for p, q in zip(expected, draw(resumed, 3)))


def test_load_state_dict_without_generator_state(corpus: Path) -> None:
    ds = ByteDataset(corpus, block_size=16, batch_size=4)
    with pytest.raises(UserError) as excinfo:
        ds.load_state_dict({})
    assert_one_line_user_error(excinfo, "generator_state")


def test_fixed_batches_are_stable_and_leave_main_stream_alone(corpus: Path) -> None:
    reference = draw(ByteDataset(corpus, block_size=16, batch_size=4), 4)

    ds = ByteDataset(corpus, block_size=16, batch_size=4)
    first = draw(ds, 2)
    eval_a = ds.fixed_batches("val", n=3, seed=42)
    eval_b = ds.fixed_batches("val", n=3, seed=42)
    rest = draw(ds, 2)

    assert len(eval_a) == 3
    for (xa, ya), (xb, yb) in zip(eval_a, eval_b):
        assert xa.shape == ya.shape == (4, 16) and xa.dtype == torch.int64
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(eval_a[0][0], ds.fixed_batches("val", n=1, seed=43)[0][0])
    assert all(torch.equal(p, q) for p, q in zip(reference, first + rest))


# --- bad input ------------------------------------------------------------------------------


def test_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"
    with pytest.raises(UserError) as excinfo:
        resolve_data_path(str(missing))
    assert_one_line_user_error(excinfo, "does not exist", "--data")
    with pytest.raises(UserError) as excinfo:
        ByteDataset(missing, block_size=4, batch_size=1)
    assert_one_line_user_error(excinfo, "does not exist")


def test_directory_path(tmp_path: Path) -> None:
    with pytest.raises(UserError) as excinfo:
        resolve_data_path(str(tmp_path))
    assert_one_line_user_error(excinfo, "directory", "--data")


def test_empty_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.touch()
    with pytest.raises(UserError) as excinfo:
        resolve_data_path(empty)
    assert_one_line_user_error(excinfo, "empty", "--data")
    with pytest.raises(UserError) as excinfo:
        ByteDataset(empty, block_size=4, batch_size=1)
    assert_one_line_user_error(excinfo, "empty")


def test_split_too_short_names_the_split(tmp_path: Path) -> None:
    path = tmp_path / "short.txt"
    path.write_bytes(b"a" * 100)  # train 90 bytes, val 10 bytes
    with pytest.raises(UserError) as excinfo:
        ByteDataset(path, block_size=20, batch_size=1)
    assert_one_line_user_error(excinfo, "val split", "10 bytes", "--block_size", "--val_fraction")
    with pytest.raises(UserError) as excinfo:
        ByteDataset(path, block_size=95, batch_size=1)
    assert_one_line_user_error(excinfo, "train split", "90 bytes", "--block_size")


@pytest.mark.parametrize("val_fraction", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_bad_val_fraction(corpus: Path, val_fraction: float) -> None:
    with pytest.raises(UserError) as excinfo:
        ByteDataset(corpus, block_size=4, batch_size=1, val_fraction=val_fraction)
    assert_one_line_user_error(excinfo, "val_fraction")


@pytest.mark.parametrize("kwargs, flag", [({"block_size": 0, "batch_size": 1}, "block_size"),
                                          ({"block_size": 4, "batch_size": 0}, "batch_size")])
def test_bad_sizes(corpus: Path, kwargs: dict[str, int], flag: str) -> None:
    with pytest.raises(UserError) as excinfo:
        ByteDataset(corpus, **kwargs)
    assert_one_line_user_error(excinfo, flag)


# --- the packaged default corpus ----------------------------------------------------------------


def _block_network(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every socket connect and name lookup fails (and is recorded), as on a machine offline."""
    attempts: list[str] = []

    def refuse(*args: object, **kwargs: object) -> None:
        attempts.append(repr(args))
        raise OSError("network is blocked in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    return attempts


def test_default_is_the_packaged_corpus_offline_with_empty_cache(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    attempts = _block_network(monkeypatch)
    for var in ("HOME", "XDG_CACHE_HOME", "BDH_FAST_CACHE"):
        monkeypatch.setenv(var, str(tmp_path / "empty"))
    path = resolve_data_path(None)
    assert path == data_mod.DEFAULT_CORPUS
    assert path.is_relative_to(Path(data_mod.__file__).parent)  # inside the installed package
    assert path.stat().st_size == 1_115_394
    assert path.read_bytes().startswith(b"First Citizen:\nBefore we proceed any further")
    assert attempts == [] and not (tmp_path / "empty").exists()  # no network, nothing written
    dataset = ByteDataset(path, block_size=8, batch_size=2)
    assert dataset.train_len + dataset.val_len == 1_115_394


@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason="no shared/data/tinyshakespeare.txt")
def test_packaged_corpus_is_the_reference_corpus() -> None:
    assert data_mod.DEFAULT_CORPUS.read_bytes() == SHAKESPEARE.read_bytes()


def test_missing_packaged_corpus_is_user_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data_mod, "DEFAULT_CORPUS", tmp_path / "gone.txt")
    with pytest.raises(UserError) as excinfo:
        resolve_data_path(None)
    assert_one_line_user_error(excinfo, "--data", "reinstall")


def test_main_job_trains_offline_with_no_data_flag(tmp_path: Path) -> None:
    """The README's first line on a machine with no network: no --data, an empty HOME and cache,
    and every socket refused in the training process itself (a sitecustomize patches them)."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(
        "import socket\n"
        "def _refuse(*a, **k):\n"
        "    raise OSError('network is blocked in this test')\n"
        "socket.socket.connect = _refuse\n"
        "socket.getaddrinfo = _refuse\n"
        "socket.create_connection = _refuse\n")
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("BDH_FAST_CACHE", "XDG_CACHE_HOME")}
    env.update(HOME=str(home), PYTHONPATH=os.pathsep.join([str(hooks), env.get("PYTHONPATH", "")]))
    out = subprocess.run(
        [sys.executable, "-m", "bdh_fast.train", "--preset", "tiny", "--max_iters", "3", "--log_freq", "3",
         "--no-compile", "--out_dir", str(tmp_path / "runs"), "--run_name", "offline", "--eval_freq", "0",
         "--generate_freq", "0"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Step: 3/3" in out.stdout
    config = json.loads((tmp_path / "runs" / "offline" / "config.json").read_text())
    assert Path(config["data_path"]) == data_mod.DEFAULT_CORPUS
    assert list(home.iterdir()) == []  # no cache written


# --- encode / decode ------------------------------------------------------------------------


def test_encode_decode_round_trip() -> None:
    text = "To be or — naïve 🐉"
    assert encode("Ab") == [65, 98]
    assert decode(encode(text)) == text


def test_decode_invalid_utf8_uses_backslashreplace() -> None:
    assert decode([104, 105, 0xFF, 0xE2, 0x80]) == "hi\\xff\\xe2\\x80"


# --- memmap ---------------------------------------------------------------------------------


def test_memmap_opened_once(corpus: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_memmap = np.memmap
    calls: list[object] = []

    def counting_memmap(*args: object, **kwargs: object) -> np.memmap:
        calls.append(args[0] if args else kwargs.get("filename"))
        return real_memmap(*args, **kwargs)

    monkeypatch.setattr(np, "memmap", counting_memmap)
    ds = ByteDataset(corpus, block_size=16, batch_size=4)
    for _ in range(50):
        ds.get_batch("train")
        ds.get_batch("val")
    ds.fixed_batches("val", n=5, seed=1)
    assert len(calls) == 1


# --- CUDA -----------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_batches_match_cpu(corpus: Path) -> None:
    cpu = ByteDataset(corpus, block_size=16, batch_size=4)
    gpu = ByteDataset(corpus, block_size=16, batch_size=4, device="cuda")
    for _ in range(3):
        (xc, yc), (xg, yg) = cpu.get_batch("train"), gpu.get_batch("train")
        assert xg.is_cuda and yg.is_cuda and xg.is_contiguous()
        assert torch.equal(xc, xg.cpu()) and torch.equal(yc, yg.cpu())
