"""Where records go: one module per backend behind one small interface, fed by one background writer.

    base.py           Backend (the interface the writer calls) and Histogram (buckets, never values)
    tensorboard.py    TensorBoard event files: scalars, text, histograms, hparams, a custom-scalar layout
    wandb.py          a W&B run, each step exactly once across resumes (wandb_history.py)
    jsonl.py          metrics.jsonl: one JSON object per step and per event
    writer.py         Writer: the bounded queue and the thread that hands every record to every backend

`make_backends` builds the backends a `--log_backend` list names; the public `bdh_fast.logger.Logger`
is a Writer over them. tensorboard and wandb are imported inside the backends that use them, so an
unused backend costs nothing.
"""

from __future__ import annotations

import sys

from bdh_fast.errors import UserError
from bdh_fast.telemetry.backends.base import Backend, Histogram
from bdh_fast.telemetry.backends.jsonl import JsonlBackend
from bdh_fast.telemetry.backends.tensorboard import TensorBoardBackend
from bdh_fast.telemetry.backends.wandb import WandbBackend, wandb_api_key_configured
from bdh_fast.telemetry.backends.writer import Writer

__all__ = ["BACKEND_NAMES", "Backend", "Histogram", "JsonlBackend", "TensorBoardBackend", "WandbBackend",
           "Writer", "make_backends", "parse_backends", "wandb_api_key_configured"]

BACKEND_NAMES = ("tensorboard", "wandb", "jsonl", "none")


def parse_backends(spec: str) -> list[str]:
    """'tensorboard,jsonl' -> ['tensorboard', 'jsonl']: validated, deduplicated, order kept."""
    names = []
    for raw in spec.split(","):
        name = raw.strip().lower()
        if not name:
            continue
        if name not in BACKEND_NAMES:
            raise UserError(f"unknown logging backend {raw.strip()!r}; choose from {', '.join(BACKEND_NAMES)}")
        if name not in names:
            names.append(name)
    if not names:
        raise UserError(f"no logging backend given; choose from {', '.join(BACKEND_NAMES)} (comma-separated)")
    if "none" in names and len(names) > 1:
        raise UserError("logging backend 'none' cannot be combined with others; drop 'none' or the others")
    return names


def make_backends(
    names: list[str],
    run_dir: str,
    config: dict,
    resume_step: int | None = None,
    *,
    wandb_project: str = "bdh-training",
    wandb_entity: str | None = None,
    wandb_mode: str = "auto",
    run_name: str | None = None,
    wandb_log_checkpoints: bool = False,
) -> tuple[list[Backend], list[str]]:
    """The backends named in `names` (as parse_backends returns them), and the names of those that
    failed to start: each is left out with one warning, and training goes on without it."""
    factories = {
        "tensorboard": lambda: TensorBoardBackend(run_dir, config, resume_step),
        "wandb": lambda: WandbBackend(
            run_dir, config, project=wandb_project, entity=wandb_entity, run_name=run_name,
            mode=wandb_mode, resume_step=resume_step, log_checkpoints=wandb_log_checkpoints,
        ),
        "jsonl": lambda: JsonlBackend(run_dir, resume_step),
    }
    backends, failed = [], []
    for name in names:
        if name == "none":
            continue
        try:
            backends.append(factories[name]())
        except UserError:
            raise
        except Exception as e:
            failed.append(name)
            print(f"warning: logging backend {name} could not start and is off: {type(e).__name__}: {e}",
                  file=sys.stderr, flush=True)
    return backends, failed
