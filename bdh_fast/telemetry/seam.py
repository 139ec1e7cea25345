"""The telemetry seam: the one object a training loop talks to, for any nn.Module.

Per step, four calls, none of which reads a tensor on the host (DESIGN.md invariant 1):

    telemetry.step_start(step)                  # the step is timed from here
    ...forward, backward (and GradScaler.unscale_)...
    found_inf = telemetry.after_backward(loss)  # grad norms (+ clipping) on the device, probe gradients
    ...optimizer step...
    telemetry.step_end(step)                    # the step's values into the device buffer
    telemetry.due(step)                         # the sync points that fall on this step, by name

then, at their cadence, the sync points, the only places the host reads training values: flush()
(the whole window in one copy), probe(), evaluate(), log_samples(). A plain loop calls step(step)
after its optimizer step instead of step_end and due: it records the step and runs what is due.

A BDH loop also passes the model's optional statistics channel through, when `telemetry.neuron_stats`
(the default --metrics standard and full): `logits, loss, stats = model(x, y, neuron_stats=True)`,
then `after_backward(loss, neuron_stats=stats)`; every step's neuron sparsity per layer then goes
into the step buffer with the rest (train/sparsity/*, train/active_mean/*).

--metrics decides what is logged (config.py's help says it per level; the README's table in full).

Device side: StepBuffer (buffer.py), GradNorms (grads.py), StepTimer (timer.py). Host side:
MetricsProcessor and Console (metrics.py), the Logger (bdh_fast/logger.py) over the backends.
Observers: Probes (probes.py, the neuron statistics for BDH only), GPUSampler (system.py), Profiler
and MemorySnapshot (profiling.py). The settings are RunConfig's telemetry fields, by the names of
the command-line flags (`python -m bdh_fast.train --help`).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import math
import os
import pathlib
import statistics
import time
from typing import Callable

import torch
from torch.profiler import record_function

from bdh_fast import distributed, ops
from bdh_fast import evaluate as evaluation
from bdh_fast.config import RunConfig
from bdh_fast.data import decode, encode
from bdh_fast.errors import warn_part_off
from bdh_fast.logger import Logger
from bdh_fast.model import BDH, NEURON_STATS
from bdh_fast.telemetry import quality
from bdh_fast.telemetry.backends import parse_backends
from bdh_fast.telemetry.buffer import StepBuffer
from bdh_fast.telemetry.grads import GradNorms, SpikeDetector
from bdh_fast.telemetry.metrics import Console, MetricsProcessor
from bdh_fast.telemetry.probes import Probes
from bdh_fast.telemetry.profiling import MemorySnapshot, Profiler
from bdh_fast.telemetry.system import GPUSampler, cuda_memory_stats, host_rss_gb
from bdh_fast.telemetry.throughput import peak_tflops
from bdh_fast.telemetry.timer import StepTimer

# A plain loop brings no evaluation batches, prompts or compiled model: those parts start off.
LIBRARY_DEFAULTS = dict(compile=False, progress=False, eval_freq=0, generate_freq=0, probe_freq=0)
# How long a checkpoint waits for the backends to write what precedes it.
LOG_FLUSH_TIMEOUT_S = 120.0


class Telemetry:
    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        run_config: RunConfig | None = None,
        *,
        log_dir: str | os.PathLike,
        tokens_per_step: int | None = None,
        flops_per_token: float | None = None,
        dtype: str = "float32",
        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
        hparams: dict | None = None,
        resumed_from: int | None = None,
        eval_model: torch.nn.Module | None = None,
        eval_batches: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] | None = None,
        probe_batch: torch.Tensor | None = None,
        dist: distributed.DistInfo = distributed.DistInfo(),
        stop_requested: Callable[[], bool] = lambda: False,
        checkpoint_path: str | os.PathLike | None = None,
        norm_groups: dict[str, list[str]] | None = None,
        sample_vocabulary: Callable[[], bytes] | None = None,
        **flags,
    ):
        """model: the uncompiled module (gradients, probes, samples). optimizer: its first group's
        LR is logged; groups with a "name" get a norm each. run_config, then `flags` (RunConfig
        field names: max_iters, log_freq, log_train_freq, log_backend, grad_clip, on_nonfinite,
        probe_freq, ...): the settings. log_dir: the run's directory. tokens_per_step (all ranks'):
        tokens/s; with flops_per_token: MFU. dtype: the autocast dtype; "float16" means
        after_backward gets the GradScaler. hparams: the configuration the backends show.
        resumed_from: the checkpoint's step, when resuming. eval_model (default: model) is what
        evaluate() calls on eval_batches {"val": [(x, y), ...], "train": [...]}. probe_batch: the
        fixed (B, T) batch of BDH's neuron statistics. dist, stop_requested: under torchrun, the
        ranks share stop requests at a flush. checkpoint_path: named when a non-finite step stops
        the run. norm_groups: {name: parameter names}, each logged as train/grad_norm/group_<name>
        (default: the optimizer's groups that carry a "name"). sample_vocabulary: returns the training
        text whose words judge the samples (samples/valid_word_rate); read once, off this thread."""
        config = dataclasses.replace(RunConfig(**LIBRARY_DEFAULTS) if run_config is None else run_config, **flags)
        self.config, self.model, self.optimizer, self.dist = config, model, optimizer, dist
        self.device = next(model.parameters()).device
        self.autocast, self.stop_requested = autocast, stop_requested
        self.enabled = parse_backends(config.log_backend) != ["none"]
        start_step = resumed_from or 0

        # Device side. With --log_backend none nothing reads the norms: compute them only to clip.
        # After the fused norm pass, one function makes the step's row.
        level = config.metrics  # basic < standard < full
        named = list(model.named_parameters()) if self.enabled or config.grad_clip > 0 else []
        if norm_groups is None:
            norm_groups = {} if optimizer is None else _named_groups(model, optimizer)
        # Compiled on CUDA only, where launches bound small steps: on a CPU the eager ops cost ~0.2 ms a
        # step and compiling them 10-30 s at start-up.
        self.grad_norms = GradNorms(named, norm_groups if named and level != "basic" else {}, self.device,
                                    compile=config.compile and self.device.type == "cuda",
                                    per_param=level == "full")
        norm_names = self.grad_norms.names if named else []
        self.scaler_columns = dtype == "float16"  # the GradScaler's scale, and whether it skipped the step
        scaler_names = ["train/grad_scale", "train/scaler_skipped"] if self.scaler_columns else []
        # Spikes: decided on the device at every step; under data parallel by the (shared) grad norm only.
        self.spikes = None
        if config.on_spike != "off":
            self.spikes = SpikeDetector(self.device, config.spike_window, config.spike_zscore,
                                        min_history=max(2, config.spike_window // 4), loss_votes=not dist.enabled)
        spike_names = SpikeDetector.COLUMNS if self.spikes is not None else []
        # BDH's neurons at every step, from the training forward's optional channel: the row's last columns.
        layers = model.config.n_layer if isinstance(model, BDH) and self.enabled and level != "basic" else 0
        self.neuron_stats = layers > 0  # does the loop pass model(..., neuron_stats=True)'s stats in?
        neuron_names = [f"train/{stat}/layer{i}" for i in range(layers) for stat in NEURON_STATS]
        self.buffer = StepBuffer(["train/loss", *norm_names, "nonfinite", *scaler_names, *spike_names, *neuron_names],
                                 config.log_train_freq, self.device)
        self.timer = StepTimer(self.device)
        # Is a non-finite step's update left out? Always under fp16 (the GradScaler skips it, NaN
        # gradients included); otherwise as on_nonfinite says.
        self.skip_nonfinite = self.scaler_columns or config.on_nonfinite in ("stop", "skip")

        # Host side: only rank 0 writes backends and the console.
        self.logger = Logger(config.log_backend if dist.is_main else "none", config.wandb_project, hparams or {},
                             log_dir, run_name=config.run_name,
                             resume_step=None if resumed_from is None else resumed_from + 1,
                             wandb_entity=config.wandb_entity, wandb_mode=config.wandb_mode,
                             log_checkpoints=config.wandb_log_checkpoints, hist_bins=config.hist_bins,
                             writer=config.log_writer)
        self.console = Console(dist.is_main, config.progress, config.max_iters, start_step)
        self.measured_from = start_step + 1  # the first step of a compiled run includes compilation
        self.metrics = MetricsProcessor(
            self.logger, self.console, max_iters=config.max_iters, log_freq=config.log_freq,
            tokens_per_step=tokens_per_step, flops_per_token=flops_per_token,
            peak_tflops=peak_tflops(self.device, dtype, config.peak_tflops), world_size=dist.world_size,
            timed_from=self.measured_from + 1 if config.compile else start_step,
            on_nonfinite=config.on_nonfinite, skip_nonfinite=self.skip_nonfinite, checkpoint_path=checkpoint_path,
            on_spike=config.on_spike)

        # Observers.
        cuda = self.device.type == "cuda"
        self.gpu = GPUSampler(config.nvml_interval if cuda and self.enabled else 0.0,
                              device_indices=[self.device.index] if cuda else None).start()
        self.eval_model = model if eval_model is None else eval_model
        self.eval_batches = (eval_batches or {}) if config.eval_freq else {}
        log_dir = pathlib.Path(log_dir)
        self.profiler = Profiler(log_dir, self.device, enabled=config.profile, wait=config.profile_wait,
                                 warmup=config.profile_warmup, active=config.profile_active,
                                 repeat=config.profile_repeat)
        self.memory_snapshot = MemorySnapshot(log_dir, self.device, config.memory_snapshot, print)
        self.probes = None
        if config.probe_freq and self.enabled and dist.is_main and level != "basic":
            self.probes = Probes(model, probe_batch, config.hist_bins, autocast, histograms=level == "full")
            if cuda:
                # Decide now whether Triton serves the probes' statistics (one self-check per dtype, a
                # sync at start-up), not at the first probe step; a failing kernel means the reference.
                ops.check_cuda_kernels(self.device, tuple({torch.float32, getattr(torch, dtype)}), config.hist_bins)

        # The samples' text figures are computed on a worker thread, against the training split's words.
        self._quality_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="bdh-sample-quality")
        self._quality_jobs: list[concurrent.futures.Future] = []
        self._vocabulary_source, self._vocabulary = sample_vocabulary, None
        self.current_step = start_step  # the last step recorded
        self.compile_s: float | None = None
        self.stop_agreed = False  # under torchrun: every rank has seen a stop request (set at a flush)
        self.collectives_ok = True  # False once a peer rank may be gone (interrupt under torchrun)
        self.log_flush_timeout = LOG_FLUSH_TIMEOUT_S
        self._step_in_progress: int | None = None  # the step between step_start and step_end
        self._step_open = False  # a step was recorded and the profiler has not yet been told it ended
        self._pending: torch.Tensor | None = None  # after_backward's row, recorded by step_end
        self._lr: float | None = None
        self._first_step_t0 = time.perf_counter()
        self.timer.start()  # without step_start, a plain loop's first step is timed from here

    # --- the step: nothing here reads a tensor on the host ----------------------------------------

    def step_start(self, step: int) -> None:
        """A step begins: it is timed from here, and the previous one ends for the profiler."""
        self._end_open_step()
        self._step_in_progress = step
        if step == self.measured_from:
            self._first_step_t0 = time.perf_counter()
        self.timer.start()

    def after_backward(self, loss: torch.Tensor, scaler: torch.amp.GradScaler | None = None,
                       neuron_stats: torch.Tensor | None = None) -> torch.Tensor | None:
        """After backward (and GradScaler.unscale_), before the optimizer step: the gradient norms,
        reduced on the device and reused to clip (--grad_clip) in place; on a probe step the
        gradient statistics; the step's learning rate. neuron_stats: what BDH's forward returned
        with neuron_stats=True (ignored unless `self.neuron_stats`; a step without it logs none).

        Returns the flag a fused torch.optim optimizer skips a non-finite update on, on the device
        (`optimizer.found_inf = flag`), or None when the update is not ours to skip (on_nonfinite
        warn, or a GradScaler, which skips by itself)."""
        step = self._step_in_progress or self.current_step + 1
        if self._probe_due(step):
            with record_function("telemetry/probe"):
                try:
                    self.probes.before_update()  # gradient histograms + weights copy, on the device
                except Exception as e:
                    self.probes_failed(e, step)
        with record_function("telemetry/grad_norms"):
            scale = scaler._scale if self.scaler_columns else None  # the scale this step's loss used
            row, found_inf = self.grad_norms.step_row(loss, self.config.grad_clip, scale, self.skip_nonfinite,
                                                      self.spikes, skip_spikes=self.config.on_spike == "skip",
                                                      tail=neuron_stats if self.neuron_stats else None)
        self._pending = row
        self._lr = self.optimizer.param_groups[0]["lr"] if self.optimizer is not None else None
        return found_inf

    def step_end(self, step: int) -> None:
        """The step's update is done: its values go into the device buffer."""
        with record_function("telemetry/record"):
            self.buffer.record(step, self._pending, {} if self._lr is None else {"train/lr": self._lr})
        self.timer.stop()
        self.current_step, self._step_in_progress, self._step_open = step, None, True

    def due(self, step: int) -> list[str]:
        """The sync points that fall on `step`, by method name, in the order they run."""
        config, last = self.config, step == self.config.max_iters
        due = []
        if (len(self.buffer) == config.log_train_freq or step % config.log_freq == 0 or last
                or (config.compile and step == self.measured_from)):  # the compile step is timed apart
            due.append("flush")
        if self._probe_due(step):
            due.append("probe")
        if self.eval_batches and (step % config.eval_freq == 0 or last):
            due.append("evaluate")
        if config.generate_freq and (step % config.generate_freq == 0 or last):
            due.append("log_samples")
        return due

    def step(self, step: int) -> None:
        """What a plain loop calls after its optimizer step: step_end, then every sync point due.
        Without step_start the next step is timed from here, the loop's own work included."""
        self.step_end(step)
        for sync_point in self.due(step):
            getattr(self, sync_point)()
        self._end_open_step()
        self.timer.start()

    def _probe_due(self, step: int) -> bool:
        return self.probes is not None and (step % self.config.probe_freq == 0 or step == self.config.max_iters)

    def _end_open_step(self) -> None:
        """The last recorded step is over, its sync points included: the profiler's step boundary."""
        if self._step_open:
            self._step_open = False
            self.memory_snapshot.step()
            self.profiler.step()

    # --- the sync points ---------------------------------------------------------------------------

    def flush(self) -> None:
        with record_function("telemetry/flush"):
            self._flush()
        if self.compile_s is None and self.config.compile and self.current_step >= self.measured_from:
            self.compile_s = time.perf_counter() - self._first_step_t0
            self.console(f"compile: {self.compile_s:.1f} s (first step, compilation included)")

    def _flush(self) -> None:
        # SYNC POINT: one copy + one wait per window; under torchrun first ONE all_reduce of the whole
        # window packed with each rank's stop request and GPU stats (skipped once a peer may be gone:
        # then rank 0 logs its own).
        cuda = self.device.type == "cuda"
        gpus = self.gpu.window_means() if self.enabled else {}
        exchange = None
        if self.dist.enabled and self.collectives_ok and len(self.buffer):
            exchange = distributed.FlushExchange(self.dist, self.stop_requested(), gpus if cuda else None)
        rows = self.buffer.flush(exchange)
        if not rows:
            return
        if exchange is not None:
            self.stop_agreed |= exchange.stop_requested  # the same answer on every rank
            if cuda:
                gpus = exchange.gpu_means
        window = {**gpus, **cuda_memory_stats(self.device), **_host_memory()} if self.enabled else {}
        self.metrics.process(rows, self.timer.read_ms(), window)

    @record_function("telemetry/probe")
    def probe(self) -> None:
        try:
            metrics, histograms = self.probes.collect()  # SYNC POINT (probe), one read
        except Exception as e:
            self.probes_failed(e, self.current_step)
            return
        self.logger.log_metrics(metrics, self.current_step)
        for name, histogram in histograms.items():
            self.logger.log_histogram(name, histogram, self.current_step)

    def probes_failed(self, error: Exception, step: int) -> None:
        """A probe or histogram raised: one warning, probes off, training and its metrics go on."""
        self.probes = None
        warn_part_off(f"model probes at step {step}", error, "probes are off for the rest of the run")

    @record_function("eval")
    def evaluate(self) -> dict[str, float]:
        reduce = lambda totals: distributed.sum_(totals, self.dist)  # noqa: E731  (each rank did its share)
        val, train = (evaluation.evaluate(self.eval_model, self.eval_batches[split], autocast=self.autocast,
                                          reduce=reduce) for split in ("val", "train"))
        metrics = {"val/loss": val["loss"], "val/perplexity": val["perplexity"],
                   "val/bpb": val["loss"] / math.log(2),  # bits per byte: a token is a byte
                   "val/accuracy": val["accuracy"], "train/loss_eval": train["loss"]}
        self.logger.log_metrics(metrics, self.current_step)
        self.console(f"eval: step {self.current_step} val loss {val['loss']:.4f} perplexity "
                     f"{val['perplexity']:.3f} accuracy {val['accuracy']:.3f} (train loss {train['loss']:.4f})")
        return metrics

    @record_function("sample")
    def log_samples(self) -> list[str]:
        """Sample every prompt (--samples_per_prompt times), log the texts as a table, and their quality:
        the model's NLL of its own samples here (one forward each), the text figures (quality.py) on a
        worker thread, logged as samples/<figure> (mean) and samples/<figure>/p<i> (per prompt)."""
        config, step = self.config, self.current_step
        if not self.dist.is_main:
            return []
        prompts = [encode(p) for p in config.prompts]
        drawn = evaluation.sample_ids(self.model, prompts, config.sample_tokens,
                                      samples_per_prompt=config.samples_per_prompt, temperature=config.temperature,
                                      top_k=config.top_k or None, seed=config.seed + step, autocast=self.autocast)
        rows = [[step, prompt, decode(ids)] for prompt, samples in zip(config.prompts, drawn) for ids in samples]
        self.logger.log_table("samples", ["step", "prompt", "sample"], rows, step)
        nll = [[evaluation.sample_nll(self.model, p, ids, autocast=self.autocast) for ids in samples]
               for p, samples in zip(prompts, drawn)]
        self._quality_jobs = [job for job in self._quality_jobs if not job.done()]
        self._quality_jobs.append(self._quality_pool.submit(self._log_sample_quality, step, drawn, nll))
        return [decode(samples[0]) for samples in drawn]

    def _log_sample_quality(self, step: int, drawn: list[list[list[int]]], nll: list[list[float]]) -> None:
        """On the worker thread: the text figures of every sample, per prompt and their means."""
        try:
            if self._vocabulary is None and self._vocabulary_source is not None:
                self._vocabulary = quality.vocabulary(self._vocabulary_source())  # once, ~0.1 s per MB
            per_prompt = []
            for samples, nlls in zip(drawn, nll):
                texts = [bytes(ids) for ids in samples]
                figures = [quality.sample_quality(t, self._vocabulary) for t in texts]
                merged = {k: statistics.fmean(f[k] for f in figures) for k in figures[0] if all(k in f for f in figures)}
                merged["self_nll"] = statistics.fmean(nlls)
                merged["unique_per_prompt"] = len(set(texts)) / len(texts)
                per_prompt.append(merged)
            metrics = {} if self.config.metrics == "basic" else {
                f"samples/{k}/p{i}": v for i, figures in enumerate(per_prompt) for k, v in figures.items()}
            for key in {k for figures in per_prompt for k in figures}:
                values = [figures[key] for figures in per_prompt if key in figures]
                metrics[f"samples/{key}"] = statistics.fmean(values)
            words = [quality.words(bytes(ids)) for samples in drawn for ids in samples]
            metrics["samples/distinct_2"] = quality.distinct(words, 2)
            self.logger.log_metrics(metrics, step)
        except Exception as e:  # an observer: never the run's end
            warn_part_off(f"sample quality at step {step}", e, "this step's quality figures are missing")

    def _wait_for_sample_quality(self) -> None:
        for job in self._quality_jobs:
            job.result()
        self._quality_jobs = []

    # --- around checkpoints, and the end ----------------------------------------------------------

    @property
    def weights_suspect(self) -> bool:
        """A non-finite update was applied (on_nonfinite warn): no checkpoint should keep it."""
        return self.metrics.weights_suspect

    def make_durable(self) -> None:
        """Before a checkpoint at this step: every record up to it durably written by every
        backend (DESIGN.md invariant 8). A stalled backend delays only the first checkpoint."""
        self._wait_for_sample_quality()  # its figures are records up to this step too
        if not self.logger.flush(timeout=self.log_flush_timeout):
            self.console(f"warning: the logging backends did not finish writing step {self.current_step} within "
                         f"{self.log_flush_timeout:.0f} s; saving the checkpoint anyway (a resume may miss "
                         "some of their records)")
            self.log_flush_timeout = 5.0

    def state_dict(self) -> dict:
        """What a checkpoint keeps of the telemetry: the spike detector's window and the spike count."""
        return {"spikes": self.spikes.state_dict() if self.spikes is not None else None,
                "spike_total": self.metrics.spike_total}

    def load_state_dict(self, state: dict | None) -> None:
        if not state:
            return  # a checkpoint from before the detector: it starts empty
        if self.spikes is not None and state.get("spikes"):
            self.spikes.load_state_dict(state["spikes"])
        self.metrics.spike_total = int(state.get("spike_total", 0))

    def checkpoint_saved(self, path: str | os.PathLike) -> None:
        if self.config.wandb_log_checkpoints:
            self.logger.log_artifact(str(path), f"{self.config.run_name}-ckpt", "model")

    def close(self) -> None:
        """Every exit path: the last step ends, what is buffered is flushed, every part closes."""
        self._end_open_step()
        with contextlib.suppress(Exception):
            self.flush()  # empty after a non-finite stop: that flush already logged its window
        self._wait_for_sample_quality()
        self._quality_pool.shutdown()
        self.console.close()
        self.profiler.close()
        self.gpu.close()
        self.logger.finish()


def _named_groups(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, list[str]]:
    """{group name: its parameters' names} for the optimizer's groups that carry a "name"."""
    names = {id(p): n for n, p in model.named_parameters()}
    return {g["name"]: [names[id(p)] for p in g["params"]] for g in optimizer.param_groups if "name" in g}


def _host_memory() -> dict[str, float]:
    rss = host_rss_gb()
    return {} if rss is None else {"system/host_rss_gb": rss}
