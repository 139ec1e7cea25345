"""The host side of the telemetry: what a flushed window becomes, and where console lines go.

`MetricsProcessor.process` takes the rows one flush brought to the host (every step with its own
values) and the steps' times. It adds the performance metrics (step time, tokens/s, MFU), logs each
step, prints the reference console line with the mean loss since the previous one, and applies the
non-finite policy. Nothing here touches a device tensor.
"""

from __future__ import annotations

import os
import sys

from bdh_fast.errors import UserError
from bdh_fast.telemetry.backends import Writer


class Console:
    """The run's console: rank 0 prints, through the tqdm bar when there is one (only in an
    interactive terminal); a closed pipe (`... | head`) stops the printing, never the training."""

    def __init__(self, is_main: bool, progress: bool, total: int, initial: int):
        self.is_main = is_main
        self.closed = False
        self.progress = None
        if progress and sys.stdout.isatty():
            from tqdm import tqdm
            self.progress = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, leave=False)

    def __call__(self, line: str) -> None:
        if self.closed or not self.is_main:
            return
        try:
            if self.progress is not None:
                self.progress.write(line)
            else:
                print(line, flush=True)
        except BrokenPipeError:  # `... | head`: keep training, stop printing
            self.closed = True

    def advance(self, step: int) -> None:
        if self.progress is not None:
            self.progress.update(step - self.progress.n)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()


class MetricsProcessor:
    """Per-step metrics from flushed rows. tokens_per_step counts every rank's tokens; MFU needs
    flops_per_token and a peak (TFLOP/s per accelerator). Steps before `timed_from` (the first step
    of a compiled run, which includes compilation) get no perf metrics."""

    def __init__(self, logger: Writer, console: Console, *, max_iters: int, log_freq: int,
                 tokens_per_step: int | None, flops_per_token: float | None, peak_tflops: float | None,
                 world_size: int, timed_from: int, on_nonfinite: str, skip_nonfinite: bool,
                 checkpoint_path: str | os.PathLike | None, on_spike: str = "off"):
        self.logger, self.console = logger, console
        self.max_iters, self.log_freq = max_iters, log_freq
        self.tokens_per_step = tokens_per_step
        self.flops_per_token, self.peak_tflops, self.world_size = flops_per_token, peak_tflops, world_size
        self.timed_from = timed_from
        self.on_nonfinite = on_nonfinite
        self.skip_nonfinite = skip_nonfinite  # is a non-finite step's update left out (on the device)?
        self.checkpoint_path = checkpoint_path
        self.console_losses: list[float] = []
        self.weights_suspect = False  # a non-finite update was applied (on_nonfinite warn)
        self.on_spike = on_spike
        self.spike_total = 0  # spikes so far (kept in the checkpoint): logged as train/spikes

    def process(self, rows: list[tuple[int, dict[str, float]]], times_ms: list[float],
                window: dict[str, float]) -> None:
        """Log every row (step, values), with its step time; `window` (GPU and memory stats of the
        whole window) goes with the last one. Raises UserError at a non-finite step under "stop"."""
        first_bad = None
        for (step, values), step_ms in zip(rows, times_ms):
            if values.pop("nonfinite") and first_bad is None:
                first_bad = step
            if "spike" in values:
                if values.pop("spike"):
                    self._spike(step, values)
                values["train/spikes"] = self.spike_total
            if step >= self.timed_from:
                values["perf/step_ms"] = step_ms
                if self.tokens_per_step:
                    values["perf/tokens_per_sec"] = self.tokens_per_step / (step_ms / 1e3)
                    if self.peak_tflops and self.flops_per_token:  # per GPU: all ranks' tokens over all ranks' peak
                        values["perf/mfu"] = (self.flops_per_token * values["perf/tokens_per_sec"]
                                              / (self.peak_tflops * 1e12 * self.world_size))
            if step == rows[-1][0]:
                values.update(window)
            self.logger.log_metrics(values, step)
            self.console_losses.append(values["train/loss"])
            if step % self.log_freq == 0 or step == self.max_iters:
                mean = sum(self.console_losses) / len(self.console_losses)
                self.console(f"Step: {step}/{self.max_iters} loss {mean:.3}")
                self.console_losses = []
        self.console.advance(rows[-1][0])
        if first_bad is not None:
            self._nonfinite(first_bad)

    def _spike(self, step: int, values: dict[str, float]) -> None:
        self.spike_total += 1
        what = "skipped" if self.on_spike == "skip" else "applied"
        text = (f"loss or grad-norm spike at step {step}: loss {values['train/loss']:.4g} "
                f"(z {values['train/loss_zscore']:.1f}), grad norm {values.get('train/grad_norm', float('nan')):.4g} "
                f"(z {values['train/grad_norm_zscore']:.1f}); update {what}")
        self.console(f"warning: {text}")
        self.logger.log_alert("loss spike", text, step)

    def _nonfinite(self, step: int) -> None:
        message = f"non-finite loss or gradient norm at step {step}"
        if self.on_nonfinite == "stop":
            kept = f" The last good checkpoint is kept: {self.checkpoint_path}" if self.checkpoint_path else ""
            raise UserError(f"{message}; stopping (--on_nonfinite stop).{kept}")
        self.weights_suspect |= not self.skip_nonfinite
        self.console(f"warning: {message} ({'update skipped' if self.skip_nonfinite else 'update applied'})")
