"""`python -m bdh_fast.train`: train BDH with torch.compile and near-zero-cost telemetry.

This file wires the parts together and owns the step loop. The loop never reads a tensor value on
the host between flushes (DESIGN.md invariant 1): every per-step metric is recorded into the
on-device StepBuffer, and the host sees it only at a flush, every --log_train_freq steps.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import signal
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


def _rank_gpu_name(name: str, rank: int) -> str:
    """system/gpu<i>/metric -> system/gpu<rank>/metric (each rank samples its own GPU)."""
    head, _, tail = name.partition("/gpu")
    return f"{head}/gpu{rank}/{tail.split('/', 1)[1]}" if tail else name


class Interrupted(Exception):
    """Raised in the main thread by SIGTERM (Ctrl-C raises KeyboardInterrupt)."""


# ---------------------------------------------------------------------------------------------
# Setup
# ---------------------------------------------------------------------------------------------


def resolve_config(argv: Sequence[str] | None) -> tuple[RunConfig, dict[str, Any] | None]:
    """Flags -> RunConfig; with --resume, the checkpoint's config is the base."""
    parser, explicit = parse_flags(argv)
    state = None
    base = None
    if "resume" in explicit:
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
    return config, state


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
    def __init__(self, config: RunConfig, resume_state: dict[str, Any] | None):
        self.config = config
        self.dist = distributed.init(use_cuda=pick_device(config).type == "cuda")
        self.device = pick_device(config, self.dist.local_rank)
        self.dtype = pick_dtype(config, self.device)
        self.start_step = resume_state["step"] if resume_state else 0
        self.run_dir = pathlib.Path(config.out_dir) / config.run_name
        self.ckpt_path = self.run_dir / checkpoint.CKPT_NAME
        if resume_state is None and self.ckpt_path.exists():
            raise UserError(f"{self.run_dir} already holds a run; pass --resume {self.run_dir} "
                            "to continue it, or another --run_name")
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
                self.model, device_ids=[self.dist.local_rank] if self.device.type == "cuda" else None)
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
        self.buffer = StepBuffer(["train/loss", *norm_names, "nonfinite"], config.log_train_freq, self.device)
        self.timer = StepTimer(self.device)
        self.tokens_per_step = config.batch_size * config.block_size * self.dist.world_size
        self.flops_per_token = flops_per_token(config.model_config(), config.block_size)
        self.peak_tflops = peak_tflops(self.device, self.dtype, config.peak_tflops)
        self.skip_nonfinite = config.on_nonfinite in ("stop", "skip") and self.scaler is None

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
        torch.set_rng_state(rng["torch"])
        if self.device.type == "cuda" and rng.get("cuda"):
            torch.cuda.set_rng_state_all(rng["cuda"])
        per_rank = rng.get("data_ranks")
        if per_rank is not None and len(per_rank) != self.dist.world_size:
            raise UserError(f"--resume: the checkpoint was saved by {len(per_rank)} ranks, this run has "
                            f"{self.dist.world_size}; resume with the same number of processes")
        self.data.load_state_dict(per_rank[self.dist.rank] if per_rank else rng["data"])

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
            if self.grad_norms is not None:
                norms = self.grad_norms.compute(self.config.grad_clip)  # (1 + params + groups,)
                nonfinite = ~(torch.isfinite(loss) & torch.isfinite(norms[:1]))  # (1,)
            else:
                norms, nonfinite = loss[:0], ~torch.isfinite(loss)
            if self.skip_nonfinite:
                self.optimizer.found_inf = nonfinite.float().squeeze()  # the fused step skips on device
        lr = self.optimizer.param_groups[0]["lr"]
        with record_function("optimizer"):
            apply_update(self.optimizer, self.scheduler, self.scaler)
        with record_function("telemetry/record"):
            self.buffer.record(step, torch.cat([loss, norms, nonfinite.float()]), {"train/lr": lr})
        self.timer.stop()

    # --- flush: the one place per window where the host reads training values ------------------

    def flush(self) -> None:
        with record_function("telemetry/flush"):
            self._flush()

    def _flush(self) -> None:
        # SYNC POINT: one copy + one wait per window; under torchrun first ONE all_reduce (mean over
        # ranks) of the whole window (skipped once a peer may be gone: then rank 0 logs its own).
        reduce = (lambda window: distributed.mean_(window, self.dist)) if self.collectives_ok else None
        rows = self.buffer.flush(reduce)
        if not rows:
            return
        times_ms = self.timer.read_ms()
        window = self.system_window() if self.telemetry else {}
        first_bad = None
        for (step, values), step_ms in zip(rows, times_ms):
            if values.pop("nonfinite") and first_bad is None:
                first_bad = step
            if step > self.measured_from or not self.config.compile:
                values["perf/step_ms"] = step_ms
                values["perf/tokens_per_sec"] = self.tokens_per_step / (step_ms / 1e3)
                if self.peak_tflops:
                    values["perf/mfu"] = (self.flops_per_token * values["perf/tokens_per_sec"]
                                          / (self.peak_tflops * 1e12))
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

    def system_window(self) -> dict[str, float]:
        """NVML means and allocator stats; under torchrun every rank's GPU, as system/gpu<rank>/..."""
        gpus = self.gpu.window_means()
        if self.dist.enabled and self.device.type == "cuda" and self.collectives_ok:
            per_rank = distributed.gather_objects(gpus, self.dist)  # CUDA only: NVML is per GPU
            gpus = {_rank_gpu_name(k, rank): v for rank, stats in enumerate(per_rank) for k, v in stats.items()}
        return {**gpus, **cuda_memory_stats(self.device)}

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

    @record_function("checkpoint")
    def save_checkpoint(self) -> None:
        self.flush()  # metrics up to here reach the host first, and non-finite steps are known
        if self.weights_suspect:
            self.console(f"not saving a checkpoint at step {self.step}: a non-finite update was applied")
            return
        rng = {"torch": torch.get_rng_state(), "data": self.data.state_dict()}
        if self.dist.enabled:  # every rank's batch stream, so each resumes its own
            rng["data_ranks"] = distributed.gather_objects(self.data.state_dict(), self.dist)
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state_all()
        if not self.dist.is_main:
            return
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

    def fit(self) -> None:
        for step in range(self.start_step + 1, self.config.max_iters + 1):
            self.run_step(step)

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


def _raise_interrupted(signum, frame):
    raise Interrupted(f"signal {signum}")


def run(argv: Sequence[str] | None = None) -> int:
    config, resume_state = resolve_config(argv)
    trainer = Trainer(config, resume_state)
    previous = signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        trainer.fit()
        trainer.save_checkpoint()
        trainer.console("Training done")
        trainer.console(trainer.final_sample())
        return 0
    except (KeyboardInterrupt, Interrupted):
        if trainer.dist.enabled:  # a peer may be gone: no collective may run now
            trainer.collectives_ok = False
            trainer.flush()
            if trainer.dist.is_main:
                print(f"interrupted at step {trainer.step}; metrics flushed; the last checkpoint is "
                      f"kept: {trainer.ckpt_path}", file=sys.stderr)
            return 130
        trainer.flush()
        trainer.save_checkpoint()
        print(f"interrupted at step {trainer.step}; checkpoint saved to {trainer.ckpt_path}; "
              f"continue with --resume {trainer.run_dir}", file=sys.stderr)
        return 130
    except Exception:
        trainer.collectives_ok = not trainer.dist.enabled  # a failed peer: close() flushes locally
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
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
