"""`python -m bdh_fast.train`: train BDH with torch.compile and near-zero-cost telemetry.

This file wires the parts together and owns the step loop. The loop never reads a tensor value on
the host between flushes (DESIGN.md invariant 1): every per-step metric is recorded into the
on-device StepBuffer, and the host sees it only at a flush, every --log_train_freq steps.
"""

from __future__ import annotations

import signal

# `python -m bdh_fast.train`: from the first moment, before the second or more of `import torch`, a
# preemption signal is only noted; run() honours it at the first step boundary (StopRequest).
_EARLY_SIGNALS: list[int] = []
if __name__ == "__main__":
    for _signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(_signum, lambda signum, frame: _EARLY_SIGNALS.append(signum))

import contextlib  # noqa: E402  (after the early signal handlers, on purpose)
import json
import os
import pathlib
import sys
import time
from typing import Any, Sequence

import torch
from torch.profiler import record_function

from bdh_fast import checkpoint, distributed, ops
from bdh_fast.config import RunConfig, parse_flags, resolve
from bdh_fast.data import ByteDataset, resolve_data_path
from bdh_fast.errors import UserError, warn_part_off
from bdh_fast.evaluate import evaluate, sample
from bdh_fast.model import BDH
from bdh_fast.optim import PARAM_GROUPS, apply_update, lr_lambda, make_optimizer
from bdh_fast.telemetry.backends import Logger, make_logger, parse_backends
from bdh_fast.telemetry.buffer import StepBuffer
from bdh_fast.telemetry.grads import GradNorms
from bdh_fast.telemetry.probes import Probes
from bdh_fast.telemetry.profiling import MemorySnapshot, Profiler
from bdh_fast.telemetry.system import GPUSampler, cuda_memory_stats
from bdh_fast.telemetry.throughput import StepTimer, flops_per_token, peak_tflops

FINAL_PROMPT = "To be or "  # the reference train.py's closing sample
FINAL_SAMPLE_TOKENS = 100
EVAL_SEED_OFFSET = 10_007  # eval batches come from their own stream, never the training one
LOG_FLUSH_TIMEOUT_S = 120.0  # how long a checkpoint waits for the backends to write what precedes it


class StopRequest:
    """SIGTERM and SIGINT (what a scheduler sends before preemption, and Ctrl-C) only set this flag.

    The loop honours it at the next step boundary, after everything due at that step (flush,
    evaluation, samples, checkpoint), so the checkpoint it then writes holds one consistent step:
    weights, optimizer, data stream and RNG all after update s, and every record up to s. Under
    torchrun the ranks agree on the stop through the flush's one all_reduce. A second Ctrl-C stops
    at once, as a crash would: the last checkpoint stands.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __call__(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def install(self) -> StopRequest:
        for signum in self.SIGNALS:
            self._previous[signum] = signal.signal(signum, self)
        return self

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}


# ---------------------------------------------------------------------------------------------
# Setup
# ---------------------------------------------------------------------------------------------


# What a run leaves in its directory; a fresh run refuses a directory holding any of them.
RUN_FILES = ("ckpt.pt", "config.json", "metrics.jsonl", "wandb_id.txt", "events.out.tfevents.*", "*.pt.trace.json*")


def earlier_run_files(run_dir: pathlib.Path) -> list[str]:
    return sorted({p.name for pattern in RUN_FILES for p in run_dir.glob(pattern)})


def resolve_config(argv: Sequence[str] | None) -> tuple[RunConfig, dict[str, Any] | None]:
    """Flags -> RunConfig; with --resume, the checkpoint's config is the base.

    `--resume DIR` on a run directory that has no checkpoint yet (preempted before its first one, or
    before it even made the directory) starts that run over from step 0, in that directory, with
    its earlier logs removed: so a preemption script can always pass the same flags plus --resume.
    A fresh run refuses a directory with run files.
    """
    parser, explicit = parse_flags(argv)
    state = None
    base = None
    restart_dir = None
    if "resume" in explicit:
        resume = pathlib.Path(explicit["resume"]).expanduser()
        if resume.resolve().name in ("", ".", ".."):
            raise UserError(f"--resume: {resume} is not a run directory; pass runs/<run_name> or its ckpt.pt")
        never_saved = resume.is_dir() and not (resume / checkpoint.CKPT_NAME).exists()
        never_started = not resume.exists() and resume.suffix != ".pt"  # killed before it made its directory
        if never_saved or never_started:
            restart_dir = resume
            base = _saved_run_config(resume) or None  # the crashed segment's config, if it wrote one
            explicit = {**explicit, "out_dir": str(resume.parent), "run_name": resume.name}
        else:
            path = checkpoint.locate(explicit["resume"])
            state = checkpoint.load(path)
            checkpoint.check_model_flags(state["config"], explicit, path)
            # The run continues in the checkpoint's own directory, under its own name.
            base = {**state["config"], "out_dir": str(path.parent.parent), "run_name": path.parent.name}
            explicit = {k: v for k, v in explicit.items() if k not in ("out_dir", "run_name")}
    try:
        config = resolve(explicit, cuda_available=torch.cuda.is_available(), base=base)
    except UserError as e:
        parser.error(str(e))
    run_dir = pathlib.Path(config.out_dir) / config.run_name
    if restart_dir is not None and restart_dir.is_dir():
        print(f"--resume: {restart_dir} has no checkpoint yet; starting it over from step 0 "
              f"(its earlier logs are removed)", flush=True)
        _remove_run_files(restart_dir)
    elif restart_dir is not None:
        print(f"--resume: {restart_dir} does not exist yet (no run started there); starting it from step 0",
              flush=True)
    elif state is None and run_dir.is_dir() and earlier_run_files(run_dir):
        raise UserError(f"{run_dir} already holds a run ({', '.join(earlier_run_files(run_dir)[:4])}); pass "
                        f"--resume {run_dir} to continue it, or another --run_name")
    return config, state


def _saved_run_config(run_dir: pathlib.Path) -> dict[str, Any]:
    """The RunConfig fields of a run's config.json (none if it never wrote one, or it is unreadable)."""
    try:
        saved = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    fields = RunConfig.__dataclass_fields__
    return {k: v for k, v in saved.items() if k in fields} if isinstance(saved, dict) else {}


def _remove_run_files(run_dir: pathlib.Path) -> None:
    for pattern in RUN_FILES:
        for path in run_dir.glob(pattern):
            path.unlink()
    if (run_dir / "wandb").is_dir():  # the crashed segment's W&B run: kept aside, not synced with the new one
        (run_dir / "wandb").rename(run_dir / f"wandb.before-restart-{int(time.time())}")


def pick_device(config: RunConfig, local_rank: int = 0) -> torch.device:
    if config.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda, but no CUDA GPU is visible; use --device cpu")
    if config.device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


def pick_dtype(config: RunConfig, device: torch.device) -> str:
    if config.dtype != "auto":
        return config.dtype
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bfloat16"
    return "float32"


def announce(config: RunConfig, device: torch.device, dtype: str, resumed_step: int | None,
             world_size: int = 1) -> str:
    why = "" if config.device != "auto" else (" (CUDA GPU found)" if device.type == "cuda" else " (no CUDA GPU found)")
    preset = f"preset {config.preset}" if config.preset else "custom"
    line = (f"bdh_fast: {device.type}{why}, {preset}: L{config.n_layer} D{config.n_embd} "
            f"H{config.n_head} m{config.mlp_mult}, B{config.batch_size} T{config.block_size}, "
            f"{config.max_iters} iters, {dtype}, compile {'on' if config.compile else 'off'}")
    if world_size > 1:
        line += (f", {world_size} data-parallel ranks: effective batch {config.batch_size * world_size} "
                 f"x {config.block_size} tokens")
    if resumed_step is not None:
        line += f", resuming from step {resumed_step}"
    return line


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


class Trainer:
    def __init__(self, config: RunConfig, resume_state: dict[str, Any] | None, stop: StopRequest | None = None):
        self.config = config
        self.stop = stop or StopRequest()  # installed by run(); a library caller may install its own
        self.stop_agreed = False  # under torchrun: every rank has seen a stop request (set at a flush)
        self.dist = distributed.init(use_cuda=pick_device(config).type == "cuda")
        self.device = pick_device(config, self.dist.local_rank)
        self.dtype = pick_dtype(config, self.device)
        self.start_step = resume_state["step"] if resume_state else 0
        self.run_dir = pathlib.Path(config.out_dir) / config.run_name
        self.ckpt_path = self.run_dir / checkpoint.CKPT_NAME
        backend_names = parse_backends(config.log_backend)
        self.data = ByteDataset(resolve_data_path(config.data), config.block_size, config.batch_size,
                                config.val_fraction, self.device, config.seed + self.dist.rank)
        if self.dist.is_main:
            print(announce(config, self.device, self.dtype, resume_state and self.start_step,
                           self.dist.world_size), flush=True)
        torch.manual_seed(config.seed)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.model = BDH(config.model_config()).to(self.device)
        self.n_params = sum(p.numel() for p in self.model.parameters())
        wrapped: torch.nn.Module = self.model
        if self.dist.enabled:
            torch.manual_seed(config.seed + self.dist.rank)  # each rank its own dropout stream
            wrapped = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.dist.local_rank] if self.device.type == "cuda" else None,
                **distributed.NO_PER_STEP_BUFFER_SYNC)
        # Train the compiled module (DDP inside, as torch documents); keep `self.model` for
        # state_dict() and generation.
        self.train_model = torch.compile(wrapped, dynamic=False) if config.compile else wrapped
        self.optimizer = make_optimizer(self.model, config, self.device)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(config))
        self.autocast_dtype = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[self.dtype]
        self.scaler = torch.amp.GradScaler(self.device.type) if self.dtype == "float16" else None
        if resume_state is not None:
            self._restore(resume_state)

        # With --log_backend none nothing reads the norms: compute them only to clip.
        self.telemetry = backend_names != ["none"]
        self.grad_norms = None
        if self.telemetry or config.grad_clip > 0:
            self.grad_norms = GradNorms(list(self.model.named_parameters()), PARAM_GROUPS, self.device)
        norm_names = self.grad_norms.names if self.grad_norms else []
        scaler_names = ["train/grad_scale", "train/scaler_skipped"] if self.scaler is not None else []
        self.buffer = StepBuffer(["train/loss", *norm_names, "nonfinite", *scaler_names], config.log_train_freq,
                                 self.device)
        self.timer = StepTimer(self.device)
        self.tokens_per_step = config.batch_size * config.block_size * self.dist.world_size
        self.flops_per_token = flops_per_token(config.model_config(), config.block_size)
        self.peak_tflops = peak_tflops(self.device, self.dtype, config.peak_tflops)
        # Is a non-finite step's update left out? Always under fp16 (the GradScaler skips it, NaN
        # gradients included); otherwise as --on_nonfinite says.
        self.skip_nonfinite = self.scaler is not None or config.on_nonfinite in ("stop", "skip")

        self.resolved = {**config.to_dict(), "resolved_device": str(self.device),
                         "resolved_dtype": self.dtype, "n_params": self.n_params,
                         "data_path": str(self.data.path), "world_size": self.dist.world_size,
                         "effective_batch_size": config.batch_size * self.dist.world_size,
                         "flops_per_token": self.flops_per_token}
        if self.dist.is_main:  # only rank 0 writes files, backends, console and checkpoints
            self.run_dir.mkdir(parents=True, exist_ok=True)
            checkpoint.save_json(self.run_dir / "config.json", self.resolved)
        self.logger: Logger = make_logger(
            backend_names if self.dist.is_main else ["none"], str(self.run_dir), self.resolved,
            self.start_step + 1 if resume_state else None,
            wandb_project=config.wandb_project, wandb_entity=config.wandb_entity,
            wandb_mode=config.wandb_mode, run_name=config.run_name,
            wandb_log_checkpoints=config.wandb_log_checkpoints)
        self.gpu = GPUSampler(config.nvml_interval if self.device.type == "cuda" and self.telemetry else 0.0,
                              device_indices=[self.device.index] if self.device.type == "cuda" else None)
        self.gpu.start()

        self.eval_batches = {}
        if config.eval_freq:
            # The same fixed batches on every rank; each evaluates its share, then one sum.
            self.eval_batches = {
                split: self.data.fixed_batches(split, config.eval_iters, config.seed + EVAL_SEED_OFFSET)
                [self.dist.rank::self.dist.world_size] for split in ("val", "train")}
        self.profiler = Profiler(self.run_dir, self.device, enabled=config.profile, wait=config.profile_wait,
                                 warmup=config.profile_warmup, active=config.profile_active,
                                 repeat=config.profile_repeat)
        self.memory_snapshot = MemorySnapshot(self.run_dir, self.device, config.memory_snapshot, print)
        self.probes = None
        if config.probe_freq and self.telemetry and self.dist.is_main:
            probe_x = self.data.fixed_batches("val", 1, config.seed + EVAL_SEED_OFFSET)[0][0]  # (B, T)
            self.probes = Probes(self.model, probe_x, config.hist_bins, self.autocast)
            if self.device.type == "cuda":
                # Decide now whether Triton serves the probes' statistics (one self-check per dtype, a
                # sync at start-up), not at the first probe step; a failing kernel means the reference.
                ops.check_cuda_kernels(self.device, tuple({torch.float32, self.autocast_dtype or torch.float32}),
                                       config.hist_bins)
        self.step = self.start_step
        self.console_losses: list[float] = []
        self.weights_suspect = False  # a non-finite update was applied (--on_nonfinite warn)
        self.saved_step: int | None = None
        self.log_flush_timeout = LOG_FLUSH_TIMEOUT_S
        self.measured_from = self.start_step + 1  # first step (compile) is timed apart
        self.compile_s: float | None = None
        self.progress = None
        self.console_closed = False
        self.collectives_ok = True  # False once a peer rank may be gone (interrupt under torchrun)
        if config.progress and sys.stdout.isatty():
            from tqdm import tqdm
            self.progress = tqdm(total=config.max_iters, initial=self.start_step, unit="step",
                                 dynamic_ncols=True, leave=False)

    def _restore(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        rng = state["rng"]
        saved_ranks = len(rng.get("ranks") or [None])
        if saved_ranks != self.dist.world_size:
            raise UserError(f"--resume: the checkpoint was saved by {saved_ranks} rank(s), this run has "
                            f"{self.dist.world_size}; resume with the same number of processes")
        mine = rng["ranks"][self.dist.rank] if rng.get("ranks") else rng  # each rank its own streams
        torch.set_rng_state(mine["torch"])
        cuda_state = mine.get("cuda")
        if self.device.type == "cuda" and isinstance(cuda_state, list):  # older checkpoints: every device
            torch.cuda.set_rng_state_all(cuda_state)
        elif self.device.type == "cuda" and cuda_state is not None:
            torch.cuda.set_rng_state(cuda_state, self.device)
        self.data.load_state_dict(mine["data"])

    # --- one step: no host sync anywhere in here ------------------------------------------------

    def train_step(self, step: int) -> None:
        self.timer.start()
        with record_function("data"):
            x, y = self.data.get_batch("train")
        with record_function("forward"), self.autocast():
            _, loss = self.train_model(x, y)
        with record_function("backward"):
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                self.scaler.unscale_(self.optimizer)
            else:
                loss.backward()
        if self.is_probe_step(step):
            with record_function("telemetry/probe"):
                try:
                    self.probes.before_update()  # gradient histograms + weights copy, on the device
                except Exception as e:
                    self.probes_failed(e, step)
        with record_function("telemetry/grad_norms"):
            loss = loss.detach().float().view(1)
            extra: list[torch.Tensor] = []
            if self.grad_norms is not None:
                norms = self.grad_norms.compute(self.config.grad_clip)  # (1 + params + groups,)
                grads_finite = torch.isfinite(norms[:1])  # (1,)
            else:
                norms, grads_finite = loss[:0], torch.ones_like(loss, dtype=torch.bool)
            if self.scaler is not None:
                # A non-finite gradient under fp16 is the scaler's search for a scale: it skips that
                # update and lowers the scale itself. Only a non-finite loss is a real divergence.
                nonfinite = ~torch.isfinite(loss)
                extra = [self.scaler._scale.view(1).clone(), (~grads_finite).float()]  # the scale used; skipped?
            else:
                nonfinite = ~(torch.isfinite(loss) & grads_finite)  # (1,)
                if self.skip_nonfinite:
                    self.optimizer.found_inf = nonfinite.float().squeeze()  # the fused step skips on device
        lr = self.optimizer.param_groups[0]["lr"]
        with record_function("optimizer"):
            apply_update(self.optimizer, self.scheduler, self.scaler)
        with record_function("telemetry/record"):
            self.buffer.record(step, torch.cat([loss, norms, nonfinite.float(), *extra]), {"train/lr": lr})
        self.timer.stop()

    # --- flush: the one place per window where the host reads training values ------------------

    def flush(self) -> None:
        with record_function("telemetry/flush"):
            self._flush()

    def _flush(self) -> None:
        # SYNC POINT: one copy + one wait per window; under torchrun first ONE all_reduce of the whole
        # window packed with each rank's stop request and GPU stats (skipped once a peer may be gone:
        # then rank 0 logs its own).
        gpus = self.gpu.window_means() if self.telemetry else {}
        exchange = None
        if self.dist.enabled and self.collectives_ok and len(self.buffer):
            exchange = distributed.FlushExchange(self.dist, self.stop.requested,
                                                 gpus if self.device.type == "cuda" else None)
        rows = self.buffer.flush(exchange)
        if not rows:
            return
        if exchange is not None:
            self.stop_agreed |= exchange.stop_requested  # the same answer on every rank
            if self.device.type == "cuda":
                gpus = exchange.gpu_means
        times_ms = self.timer.read_ms()
        window = {**gpus, **cuda_memory_stats(self.device)} if self.telemetry else {}
        first_bad = None
        for (step, values), step_ms in zip(rows, times_ms):
            if values.pop("nonfinite") and first_bad is None:
                first_bad = step
            if step > self.measured_from or not self.config.compile:
                values["perf/step_ms"] = step_ms
                values["perf/tokens_per_sec"] = self.tokens_per_step / (step_ms / 1e3)
                if self.peak_tflops:  # per GPU: all ranks' tokens over all ranks' peak
                    values["perf/mfu"] = (self.flops_per_token * values["perf/tokens_per_sec"]
                                          / (self.peak_tflops * 1e12 * self.dist.world_size))
            if step == rows[-1][0]:
                values.update(window)
            self.logger.log_metrics(values, step)
            self.console_losses.append(values["train/loss"])
            if step % self.config.log_freq == 0 or step == self.config.max_iters:
                mean = sum(self.console_losses) / len(self.console_losses)
                self.console(f"Step: {step}/{self.config.max_iters} loss {mean:.3}")
                self.console_losses = []
        if self.progress is not None:
            self.progress.update(rows[-1][0] - self.progress.n)
        if first_bad is not None:
            message = f"non-finite loss or gradient norm at step {first_bad}"
            if self.config.on_nonfinite == "stop":
                raise UserError(f"{message}; stopping (--on_nonfinite stop). "
                                f"The last good checkpoint is kept: {self.ckpt_path}")
            self.weights_suspect |= not self.skip_nonfinite
            self.console(f"warning: {message} ({'update skipped' if self.skip_nonfinite else 'update applied'})")

    def console(self, line: str) -> None:
        if self.console_closed or not self.dist.is_main:
            return
        try:
            if self.progress is not None:
                self.progress.write(line)
            else:
                print(line, flush=True)
        except BrokenPipeError:  # `... | head`: keep training, stop printing
            self.console_closed = True

    # --- evaluation, samples, probes (each a named sync point) ------------------------------------

    def is_probe_step(self, step: int) -> bool:
        return self.probes is not None and (step % self.config.probe_freq == 0 or step == self.config.max_iters)

    @record_function("telemetry/probe")
    def probe(self) -> None:
        try:
            metrics, histograms = self.probes.collect()  # SYNC POINT (probe), one read
        except Exception as e:
            self.probes_failed(e, self.step)
            return
        self.logger.log_metrics(metrics, self.step)
        for name, histogram in histograms.items():
            self.logger.log_histogram(name, histogram, self.step)

    def probes_failed(self, error: Exception, step: int) -> None:
        """A probe or histogram raised: one warning, probes off, training and its metrics go on."""
        self.probes = None
        warn_part_off(f"model probes at step {step}", error, "probes are off for the rest of the run")

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)

    @record_function("eval")
    def evaluate(self) -> dict[str, float]:
        reduce = lambda totals: distributed.sum_(totals, self.dist)  # noqa: E731  (each rank did its share)
        val = evaluate(self.train_model, self.model, self.eval_batches["val"], self.autocast, reduce)
        train = evaluate(self.train_model, self.model, self.eval_batches["train"], self.autocast, reduce)
        metrics = {"val/loss": val["loss"], "val/perplexity": val["perplexity"],
                   "val/accuracy": val["accuracy"], "train/loss_eval": train["loss"]}
        self.logger.log_metrics(metrics, self.step)
        self.console(f"eval: step {self.step} val loss {val['loss']:.4f} perplexity "
                     f"{val['perplexity']:.3f} accuracy {val['accuracy']:.3f} "
                     f"(train loss {train['loss']:.4f})")
        return metrics

    @record_function("sample")
    def log_samples(self) -> list[str]:
        config = self.config
        if not self.dist.is_main:
            return []
        texts = sample(self.model, config.prompts, config.sample_tokens, temperature=config.temperature,
                       top_k=config.top_k or None, seed=config.seed + self.step, autocast=self.autocast)
        rows = [[self.step, prompt, text] for prompt, text in zip(config.prompts, texts)]
        self.logger.log_table("samples", ["step", "prompt", "sample"], rows, self.step)
        return texts

    # --- checkpoints ----------------------------------------------------------------------------

    def rng_state(self) -> dict[str, Any]:
        """This rank's random streams: torch (dropout on CPU), CUDA (dropout on the GPU), batches."""
        rng = {"torch": torch.get_rng_state(), "data": self.data.state_dict()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return rng

    @record_function("checkpoint")
    def save_checkpoint(self) -> None:
        self.flush()  # metrics up to here reach the host first, and non-finite steps are known
        if self.weights_suspect:
            self.console(f"not saving a checkpoint at step {self.step}: a non-finite update was applied")
            return
        if self.saved_step == self.step:
            return  # e.g. a stop right after a periodic checkpoint
        rng = self.rng_state()
        if self.dist.enabled:  # every rank's streams (dropout and batches), so each resumes its own
            rng["ranks"] = distributed.gather_objects(rng, self.dist)
        if not self.dist.is_main:
            self.saved_step = self.step
            return
        # Durable logs first (invariant 8): a checkpoint at step s claims every record up to s.
        if not self.logger.flush(timeout=self.log_flush_timeout):
            self.console(f"warning: the logging backends did not finish writing step {self.step} within "
                         f"{self.log_flush_timeout:.0f} s; saving the checkpoint anyway (a resume may miss "
                         "some of their records)")
            self.log_flush_timeout = 5.0  # a stalled backend: later checkpoints do not wait as long
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "step": self.step,
                 "config": self.config.to_dict(), "rng": rng}
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        checkpoint.save(self.ckpt_path, state)
        self.saved_step = self.step
        if self.config.wandb_log_checkpoints:
            self.logger.log_artifact(str(self.ckpt_path), f"{self.config.run_name}-ckpt", "model")

    # --- the loop -------------------------------------------------------------------------------

    def fit(self) -> bool:
        """Train to max_iters; False when a stop request ended the run early, at a step boundary."""
        for step in range(self.start_step + 1, self.config.max_iters + 1):
            if self.should_stop():
                return False
            self.run_step(step)
        return True

    def should_stop(self) -> bool:
        # One process: at once. Under torchrun: once every rank knows (a flush shares the request),
        # so all ranks leave the loop after the same step and meet at the same collectives.
        return self.stop_agreed if self.dist.enabled else self.stop.requested

    def run_step(self, step: int) -> None:
        """One iteration of the loop: the training step, then whatever is due at this step."""
        config = self.config
        t0 = time.perf_counter()
        self.train_step(step)
        self.step = step
        if step == self.measured_from and config.compile:
            self.flush()  # SYNC POINT: the first step includes compilation; time it apart
            self.compile_s = time.perf_counter() - t0
            self.console(f"compile: {self.compile_s:.1f} s (first step, compilation included)")
        if len(self.buffer) == config.log_train_freq or step % config.log_freq == 0 or step == config.max_iters:
            self.flush()
        if self.is_probe_step(step):
            self.probe()
        if config.eval_freq and (step % config.eval_freq == 0 or step == config.max_iters):
            self.evaluate()
        if config.generate_freq and (step % config.generate_freq == 0 or step == config.max_iters):
            self.log_samples()
        if config.ckpt_freq and step % config.ckpt_freq == 0 and step != config.max_iters:
            self.save_checkpoint()
        self.memory_snapshot.step()
        self.profiler.step()

    def final_sample(self) -> str:
        """The reference's closing line: the prompt and 100 sampled bytes, top_k=3."""
        text = sample(self.model, [FINAL_PROMPT], FINAL_SAMPLE_TOKENS, temperature=1.0, top_k=3,
                      seed=self.config.seed, autocast=self.autocast)[0]
        return FINAL_PROMPT + text

    def close(self) -> None:
        """Every exit path: flush what is buffered, close backends and the sampler."""
        with contextlib.suppress(Exception):
            self.flush()  # empty after a non-finite stop: that flush already logged its window
        if self.progress is not None:
            self.progress.close()
        self.profiler.close()
        self.gpu.close()
        self.logger.finish()


def run(argv: Sequence[str] | None = None) -> int:
    stop = StopRequest().install()  # from the very start: a signal during start-up is honoured too
    if _EARLY_SIGNALS:
        stop.signum = _EARLY_SIGNALS[0]
    trainer = None
    try:
        config, resume_state = resolve_config(argv)
        trainer = Trainer(config, resume_state, stop)
        if trainer.fit():
            trainer.save_checkpoint()
            trainer.console("Training done")
            trainer.console(trainer.final_sample())
            return 0
        # A stop request, honoured at a step boundary: every rank saves the same consistent step.
        trainer.save_checkpoint()
        if trainer.dist.is_main:
            name = signal.Signals(stop.signum).name
            print(f"{name}: stopped at step {trainer.step}; checkpoint saved to {trainer.ckpt_path}; "
                  f"continue with --resume {trainer.run_dir}", file=sys.stderr, flush=True)
        return 130
    except KeyboardInterrupt:  # a second Ctrl-C: stop now; the last checkpoint stands, as after a crash
        if trainer is not None:
            trainer.collectives_ok = not trainer.dist.enabled  # a peer may be mid-collective
            if trainer.dist.is_main:
                print(f"interrupted at step {trainer.step}; metrics flushed; the last checkpoint is kept: "
                      f"{trainer.ckpt_path}", file=sys.stderr)
        return 130
    except Exception:
        if trainer is not None:
            trainer.collectives_ok = not trainer.dist.enabled  # a failed peer: close() flushes locally
        raise
    finally:
        stop.restore()
        if trainer is not None:
            trainer.close()


def main(argv: Sequence[str] | None = None) -> int:
    rank = os.environ.get("RANK") if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
    try:
        return run(argv)
    except UserError as e:
        print(f"error: {e}" if rank is None else f"error (rank {rank}): {e}", file=sys.stderr)
        return 2
    except Exception:
        if rank is not None:  # name the failing rank; torchrun then stops the others
            print(f"bdh_fast: rank {rank} failed", file=sys.stderr)
        raise
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
