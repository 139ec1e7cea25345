"""Byte corpus: locate the text (the packaged tiny Shakespeare by default), memory-map it, split
it, draw batches.

The corpus is read as raw bytes (vocab 256), as the reference BDH train.py does: the first
(1 - val_fraction) of the file is the train split, the rest the validation split. Batches are
random windows of block_size + 1 bytes; targets are the inputs shifted by one.

Shape names used in the comments: B batch_size, T block_size.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any, Iterable

import numpy as np
import torch

from bdh_fast.errors import UserError

DEFAULT_CORPUS = pathlib.Path(__file__).resolve().parent / "corpus" / "tinyshakespeare.txt"

SPLITS = ("train", "val")


# ---------------------------------------------------------------------------------------------
# Text <-> byte ids
# ---------------------------------------------------------------------------------------------


def encode(text: str) -> list[int]:
    """UTF-8 bytes of `text` as token ids (0..255)."""
    return list(text.encode("utf-8"))


def decode(ids: Iterable[int]) -> str:
    """Token ids back to text. A model can emit byte sequences that are not valid UTF-8 (a
    multi-byte character cut in half); backslashreplace shows them as `\\xNN` instead of failing."""
    return bytes(ids).decode("utf-8", errors="backslashreplace")


# ---------------------------------------------------------------------------------------------
# Locating the corpus
# ---------------------------------------------------------------------------------------------


def _check_corpus_file(path: pathlib.Path) -> None:
    if not path.exists():
        raise UserError(
            f"data file {path} does not exist; pass --data PATH to an existing text file"
        )
    if path.is_dir():
        raise UserError(
            f"data path {path} is a directory; pass --data PATH to a text file, not a folder"
        )
    if path.stat().st_size == 0:
        # np.memmap cannot map an empty file, and there would be nothing to train on anyway.
        raise UserError(f"data file {path} is empty; pass --data PATH to a non-empty text file")


def default_corpus_path() -> pathlib.Path:
    """tiny Shakespeare (1,115,394 bytes), shipped inside the package: the default needs no network,
    no cache and no write access, so the first run works anywhere the package is installed."""
    path = DEFAULT_CORPUS
    if not path.is_file():
        raise UserError(
            f"the packaged corpus {path} is missing (a broken install?); reinstall bdh_fast "
            "or pass --data PATH to a local text file"
        )
    return path


def resolve_data_path(path: str | os.PathLike[str] | None) -> pathlib.Path:
    """The corpus file to train on: `path` checked to be a non-empty file, or with None the
    packaged tiny Shakespeare."""
    if path is None:
        return default_corpus_path()
    resolved = pathlib.Path(path).expanduser()
    _check_corpus_file(resolved)
    return resolved


# ---------------------------------------------------------------------------------------------
# Dataset
# ---------------------------------------------------------------------------------------------


class ByteDataset:
    """A byte corpus split into train/val, drawing random (x, y) batches of shape (B, T).

    The file is memory-mapped once: the OS pages in only the windows a batch touches, so a corpus
    far larger than RAM costs nothing to open. Batch offsets come from the dataset's own CPU
    generator, never the global RNG, so evaluation and sampling elsewhere cannot shift the batch
    stream, and `state_dict()` lets a resumed run continue the exact same stream.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        block_size: int,
        batch_size: int,
        val_fraction: float = 0.1,
        device: str | torch.device = "cpu",
        seed: int = 1337,
    ) -> None:
        if block_size < 1:
            raise UserError(
                f"block_size must be >= 1, got {block_size}; pass a positive --block_size"
            )
        if batch_size < 1:
            raise UserError(
                f"batch_size must be >= 1, got {batch_size}; pass a positive --batch_size"
            )
        # `not (0 < x < 1)` rather than `x <= 0 or x >= 1` so that NaN is rejected too.
        if not 0.0 < val_fraction < 1.0:
            raise UserError(
                f"val_fraction must be strictly between 0 and 1, got {val_fraction}; "
                "pass e.g. --val_fraction 0.1"
            )
        self.path = pathlib.Path(path)
        _check_corpus_file(self.path)
        self.block_size = int(block_size)
        self.batch_size = int(batch_size)
        self.val_fraction = float(val_fraction)
        self.device = torch.device(device)
        self.seed = int(seed)

        # The one mapping of the file; the splits are views of it (slicing maps nothing new).
        self._data = np.memmap(self.path, dtype=np.uint8, mode="r")
        split_at = int(len(self._data) * (1.0 - self.val_fraction))
        self._splits: dict[str, np.ndarray] = {
            "train": self._data[:split_at],
            "val": self._data[split_at:],
        }
        for name, split in self._splits.items():
            if len(split) < self.block_size + 1:
                raise UserError(
                    f"the {name} split of {self.path} has {len(split)} bytes, fewer than "
                    f"block_size + 1 = {self.block_size + 1}; use a smaller --block_size, "
                    "or a different --val_fraction or --data"
                )

        # Windows are block_size + 1 long: x is the first T bytes, y the last T.
        self._window = np.arange(self.block_size + 1, dtype=np.int64)  # (T+1,)
        self._generator = torch.Generator(device="cpu")
        self._generator.manual_seed(self.seed)
        self._pin = self.device.type == "cuda"

    @property
    def train_len(self) -> int:
        return len(self._splits["train"])

    @property
    def val_len(self) -> int:
        return len(self._splits["val"])

    def split_bytes(self, split: str) -> bytes:
        """The whole split as bytes (the training split's words judge generated samples)."""
        return self._split(split).tobytes()

    def _split(self, split: str) -> np.ndarray:
        try:
            return self._splits[split]
        except KeyError:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}") from None

    def _draw(self, split: str, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        data = self._split(split)
        T = self.block_size
        # Largest valid offset is len - T - 1 (windows are T + 1 long); randint's high is exclusive.
        offsets = torch.randint(0, len(data) - T, (self.batch_size,), generator=generator)  # (B,)
        index = offsets.numpy()[:, None] + self._window  # (B, T+1)
        # One gather from the memmap and one dtype conversion for the whole batch.
        windows = torch.from_numpy(np.asarray(data[index]).astype(np.int64))  # (B, T+1)
        if self._pin:
            # Pinned host memory lets the copy run asynchronously with the compute stream.
            windows = windows.pin_memory().to(self.device, non_blocking=True)
        elif windows.device != self.device:
            windows = windows.to(self.device)
        x = windows[:, :-1].contiguous()  # (B, T)
        y = windows[:, 1:].contiguous()  # (B, T)  next byte of every position in x
        return x, y

    def get_batch(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A random batch (x, y) from `split` ("train" or "val"): int64, (B, T), on `device`."""
        return self._draw(split, self._generator)

    def fixed_batches(
        self, split: str, n: int, seed: int
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """`n` batches from a separate generator seeded with `seed`: the same batches on every call,
        so successive evaluations are comparable, and the main batch stream is left untouched."""
        generator = torch.Generator(device="cpu")
        generator.manual_seed(int(seed))
        return [self._draw(split, generator) for _ in range(n)]

    def state_dict(self) -> dict[str, Any]:
        """The batch-stream position, for checkpoints."""
        return {"generator_state": self._generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the batch stream exactly where `state_dict()` was taken."""
        try:
            generator_state = state["generator_state"]
        except (KeyError, TypeError):
            raise UserError(
                "the checkpoint has no data-loader state (generator_state); "
                "resume from a checkpoint written by bdh_fast"
            ) from None
        self._generator.set_state(generator_state)

    def __repr__(self) -> str:
        return (
            f"ByteDataset(path={str(self.path)!r}, train_len={self.train_len}, "
            f"val_len={self.val_len}, block_size={self.block_size}, "
            f"batch_size={self.batch_size}, device={str(self.device)!r})"
        )
