"""The public logger; the training CLI logs through this same class.

    from bdh_fast.logger import Logger

    logger = Logger(backend="tensorboard,jsonl", project_name="bdh", config={"lr": 1e-3}, log_dir="runs/exp1")
    logger.log_metrics({"train/loss": 2.31, "train/lr": 1e-3}, step=10)
    logger.log_text("notes", "warm-up done", step=10)
    logger.log_histogram("model/weights/encoder", model.encoder, step=10)  # reduced on the device
    logger.finish()

`backend` is "tensorboard", "wandb", "jsonl", "none" or a comma list of them; `log_dir` is the run's
directory (TensorBoard event files, metrics.jsonl, wandb/); `project_name` is the W&B project and
`config` the run's configuration (TensorBoard text and hparams, W&B config). A backend that cannot
start is left out with one warning.

Every log call only puts a record on a bounded queue: one background thread writes it to every
backend (bdh_fast/telemetry/backends/writer.py), so the caller never waits for TensorBoard, W&B or
the disk. Values are host numbers: the training loop keeps its per-step values on the device and
logs them once per window (bdh_fast.telemetry). `flush()` waits until everything logged so far is
durable; `finish()` writes the rest and closes every backend.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch

from bdh_fast.ops import STATS_SIZE, tensor_stats
from bdh_fast.telemetry.backends import Histogram, Writer, make_backends, parse_backends


class Logger(Writer):
    def __init__(
        self,
        backend: str | Sequence[str] = "tensorboard,jsonl",
        project_name: str = "bdh-training",
        config: dict | None = None,
        log_dir: str | os.PathLike = "runs",
        *,
        run_name: str | None = None,
        resume_step: int | None = None,
        wandb_entity: str | None = None,
        wandb_mode: str = "auto",
        log_checkpoints: bool = False,
        hist_bins: int = 64,
        **writer_options,
    ):
        """run_name: the W&B run's name; resume_step: the first step a resumed run logs (each
        backend drops or skips what it already holds from there on, so no step appears twice);
        wandb_mode: auto (online with an API key, else offline), online, offline or disabled;
        log_checkpoints: upload `log_artifact` files to W&B; hist_bins: buckets of the histograms
        `log_histogram` computes; writer_options: the Writer's queue bound and timeouts."""
        names = parse_backends(backend if isinstance(backend, str) else ",".join(backend))
        backends, failed = make_backends(
            names, os.fspath(log_dir), dict(config or {}), resume_step, wandb_project=project_name,
            wandb_entity=wandb_entity, wandb_mode=wandb_mode, run_name=run_name,
            wandb_log_checkpoints=log_checkpoints)
        super().__init__(backends, **writer_options)
        self.failed.extend(failed)
        self.hist_bins = hist_bins

    def log_histogram(self, name: str, values: torch.Tensor | Histogram, step: int) -> None:
        """A histogram of a tensor's values (any shape, on any device; NaN and Inf counted apart).

        Its statistics and `hist_bins` buckets are computed where the tensor lives, by the fused
        `tensor_stats` op; only those numbers come to the host, never the tensor. A Histogram
        (already reduced, as the model probes make them in bulk) is logged as it is."""
        if isinstance(values, torch.Tensor):
            stats, counts = tensor_stats(values, self.hist_bins)
            # SYNC POINT (histogram): one read of STATS_SIZE + hist_bins numbers.
            flat = torch.cat([stats, counts.double()]).tolist()
            values = Histogram.from_stats(flat[:STATS_SIZE], flat[STATS_SIZE:])
        super().log_histogram(name, values, step)
