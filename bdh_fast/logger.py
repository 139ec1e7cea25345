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

Every log call only puts a record on a bounded queue: one background thread hands it to a writer
process that runs the backends (bdh_fast/telemetry/backends/process.py, writer.py), so the caller
never waits for TensorBoard, W&B or the disk, and their work never holds this interpreter's lock.
`writer="thread"` runs the backends on that thread in this process instead. Values are host numbers: the training loop keeps its per-step values on the device and
logs them once per window (bdh_fast.telemetry). `flush()` waits until everything logged so far is
durable; `finish()` writes the rest and closes every backend.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch

from bdh_fast.errors import UserError, warn_part_off
from bdh_fast.ops import STATS_SIZE, tensor_stats
from bdh_fast.telemetry.backends import Histogram, Writer, make_backends, parse_backends
from bdh_fast.telemetry.backends.process import ProcessBackend
from bdh_fast.telemetry.backends.writer import FINISH_TIMEOUT_S


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
        writer: str = "process",
        **writer_options,
    ):
        """run_name: the W&B run's name; resume_step: the first step a resumed run logs (each
        backend drops or skips what it already holds from there on, so no step appears twice);
        wandb_mode: auto (online with an API key, else offline), online, offline or disabled;
        log_checkpoints: upload `log_artifact` files to W&B; hist_bins: buckets of the histograms
        `log_histogram` computes; writer: "process" (the backends in a writer process) or "thread"
        (in this one); writer_options: the Writer's queue bound and timeouts."""
        if writer not in ("process", "thread"):
            raise UserError(f"writer {writer!r} is not one of process, thread")
        names = parse_backends(backend if isinstance(backend, str) else ",".join(backend))
        names = [n for n in names if n != "none"]
        options = dict(wandb_project=project_name, wandb_entity=wandb_entity, wandb_mode=wandb_mode,
                       run_name=run_name, wandb_log_checkpoints=log_checkpoints)
        args = (names, os.fspath(log_dir), dict(config or {}), resume_step)
        self._process: ProcessBackend | None = None
        failed: list[str] = []  # the backends that could not start in this process
        if names and writer == "process":
            try:
                self._process = ProcessBackend(*args, options,
                                               writer_options.get("finish_timeout_s", FINISH_TIMEOUT_S))
            except UserError:
                raise
            except Exception as e:  # no second interpreter here (a frozen app, a sandbox): this one, then
                warn_part_off("the writer process", e, "the backends run in this process")
        if self._process is not None:
            backends = [self._process]
        else:
            backends, failed = make_backends(*args, **options)
        super().__init__(backends, **writer_options)
        self.failed.extend(failed)
        if self._process is not None:
            self._process.on_failed = self._backends_failed
            self._backends_failed(self._process.failed)
        self.hist_bins = hist_bins

    def _backends_failed(self, names: list[str]) -> None:
        """What the writer process reports (at start-up, each flush and finish): its dropped backends."""
        self.failed.extend(n for n in names if n not in self.failed)

    @property
    def backend_names(self) -> list[str]:
        """The backends that started."""
        if self._process is not None:
            return list(self._process.started)
        return [b.name for b in self.backends]

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
