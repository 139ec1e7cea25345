"""Checkpoints: atomic and durable save, weights-only load, and the checks that make --resume safe.

A checkpoint is a dict: `model` (the uncompiled module's state_dict), `optimizer`, `scheduler`,
`scaler` (float16 only), `step` (optimizer steps done), `config` (the full RunConfig as a dict) and
`rng` (torch CPU, CUDA and data-stream generator states), which together make a resumed run
continue exactly where the saved one stopped.
"""

from __future__ import annotations

import errno
import json
import os
import pathlib
from typing import Any

import torch

from bdh_fast.config import MODEL_FIELDS
from bdh_fast.errors import UserError

CKPT_NAME = "ckpt.pt"
REQUIRED_KEYS = ("model", "optimizer", "scheduler", "step", "config", "rng")


def atomic_write_bytes(path: pathlib.Path, write) -> None:
    """Write through a temporary file in the same directory, then os.replace: a crash mid-write
    leaves the previous file intact.

    `write(tmp)` writes the temporary file by its path. os.replace alone is atomic but not durable:
    after a power loss the rename may reach the disk before the data (an empty or truncated file
    under the final name), or not at all. So the temporary file is fsynced before the rename, and
    the directory after it.
    """
    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        _fsync_file(tmp)  # the bytes are on disk before any name points at them
        os.replace(tmp, path)
        _fsync_dir(path.parent)  # the new name is on disk before we go on (and report it saved)
    finally:
        tmp.unlink(missing_ok=True)


def _fsync_file(path: pathlib.Path) -> None:
    # fsync flushes the file itself, whichever descriptor asks; `write` has closed its own. Opened
    # for writing because Windows' fsync (_commit) refuses a read-only descriptor.
    with open(path, "r+b") as f:
        os.fsync(f.fileno())


def _fsync_dir(directory: pathlib.Path) -> None:
    """Make a rename in `directory` durable. Windows cannot open a directory for fsync, and a few
    file systems refuse to fsync one (EINVAL): there the rename is as durable as the system makes it."""
    if os.name == "nt":
        return
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def save(path: pathlib.Path, state: dict[str, Any]) -> None:
    atomic_write_bytes(path, lambda tmp: torch.save(state, tmp))


def save_json(path: pathlib.Path, obj: Any) -> None:
    atomic_write_bytes(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n"))


def locate(resume: str) -> pathlib.Path:
    """--resume takes a run directory (its ckpt.pt) or a checkpoint file."""
    path = pathlib.Path(resume).expanduser()
    if path.is_dir():
        path = path / CKPT_NAME
        if not path.is_file():
            raise UserError(f"--resume: no {CKPT_NAME} in {path.parent} (the run saved no checkpoint yet)")
    elif not path.is_file():
        raise UserError(f"--resume: {resume} does not exist; pass a run directory or a {CKPT_NAME} file")
    return path


def load(path: pathlib.Path) -> dict[str, Any]:
    """Load with weights_only=True (no arbitrary pickles); a corrupt file is a UserError."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a damaged file; all mean the same here
        raise UserError(f"--resume: {path} is not a readable checkpoint: damaged, truncated or not "
                        f"written by bdh_fast ({type(e).__name__})") from None
    missing = [k for k in REQUIRED_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise UserError(f"--resume: {path} is not a bdh_fast checkpoint (missing {', '.join(missing)})")
    return state


def check_model_flags(saved_config: dict[str, Any], explicit: dict[str, Any], path: pathlib.Path) -> None:
    """Flags given with --resume may not change the model: list every mismatched field."""
    mismatched = [
        f"{name} (checkpoint {saved_config.get(name)!r}, flag {explicit[name]!r})"
        for name in MODEL_FIELDS
        if name in explicit and explicit[name] != saved_config.get(name)
    ]
    if mismatched:
        raise UserError(f"--resume: {path} was trained with a different model: {'; '.join(mismatched)}")
