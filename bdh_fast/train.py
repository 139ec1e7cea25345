"""`python -m bdh_fast.train`: train BDH with torch.compile and near-zero-cost telemetry.

This file is the command line and the step loop. Everything that observes the run sits behind one
seam, `Telemetry` (bdh_fast/telemetry/), which the loop calls in four places per step and at its
sync points. The loop never reads a tensor value on the host between flushes (DESIGN.md invariant
1): every per-step metric stays on the device until a flush, every --log_train_freq steps.
"""

from __future__ import annotations

import signal

# `python -m bdh_fast.train`: from the first moment, before the second or more of `import torch`, a
# preemption signal is only noted; run() honours it at the first step boundary (StopRequest).
_EARLY_SIGNALS: list[int] = []
if __name__ == "__main__":
    for _signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(_signum, lambda signum, frame: _EARLY_SIGNALS.append(signum))

import os  # noqa: E402  (after the early signal handlers, on purpose)
import pathlib
import sys
from typing import Any, Sequence

import torch
from torch.profiler import record_function

from bdh_fast import checkpoint, distributed
from bdh_fast.config import RunConfig
from bdh_fast.data import ByteDataset, resolve_data_path
from bdh_fast.errors import UserError
from bdh_fast.evaluate import generate_samples
from bdh_fast.flags import announce, pick_device, pick_dtype, resolve_config
from bdh_fast.model import BDH
from bdh_fast.optim import PARAM_GROUPS, apply_update, load_optimizer_state, lr_lambda, make_optimizer
from bdh_fast.stop import StopRequest
from bdh_fast.telemetry import Telemetry
from bdh_fast.telemetry.backends import parse_backends
from bdh_fast.telemetry.throughput import flops_per_token

FINAL_PROMPT = "To be or "  # the reference train.py's closing sample
FINAL_SAMPLE_TOKENS = 100
EVAL_SEED_OFFSET = 10_007  # eval batches come from their own stream, never the training one


class Trainer:
    """One run: data, the model (compiled; DDP under torchrun), optimizer, a checkpoint's state when
    resuming, and the loop. Everything that observes the run is `self.telemetry`."""

    def __init__(self, config: RunConfig, resume_state: dict[str, Any] | None, stop: StopRequest | None = None):
        self.config = config
        self.stop = stop or StopRequest()  # installed by run(); a library caller may install its own
        parse_backends(config.log_backend)  # a bad list fails before anything is built or written
        self.dist = distributed.init(use_cuda=pick_device(config).type == "cuda")
        self.device = pick_device(config, self.dist.local_rank)
        self.dtype = pick_dtype(config, self.device)
        self.start_step = resume_state["step"] if resume_state else 0
        self.run_dir = pathlib.Path(config.out_dir) / config.run_name
        self.ckpt_path = self.run_dir / checkpoint.CKPT_NAME
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

        flops = flops_per_token(config.model_config(), config.block_size)
        resolved = {**config.to_dict(), "resolved_device": str(self.device), "resolved_dtype": self.dtype,
                    "n_params": sum(p.numel() for p in self.model.parameters()), "data_path": str(self.data.path),
                    "world_size": self.dist.world_size,
                    "effective_batch_size": config.batch_size * self.dist.world_size, "flops_per_token": flops}
        if self.dist.is_main:  # only rank 0 writes files, backends, console and checkpoints
            self.run_dir.mkdir(parents=True, exist_ok=True)
            checkpoint.save_json(self.run_dir / "config.json", resolved)
        # The same fixed batches on every rank; each evaluates its share, then one sum.
        fixed = lambda split, n: self.data.fixed_batches(split, n, config.seed + EVAL_SEED_OFFSET)  # noqa: E731
        self.telemetry = Telemetry(
            self.model, self.optimizer, config, log_dir=self.run_dir, hparams=resolved,
            tokens_per_step=config.batch_size * config.block_size * self.dist.world_size, flops_per_token=flops,
            dtype=self.dtype, autocast=self.autocast, resumed_from=resume_state and self.start_step,
            eval_model=self.train_model, probe_batch=fixed("val", 1)[0][0] if config.probe_freq else None,
            eval_batches={split: fixed(split, config.eval_iters)[self.dist.rank::self.dist.world_size]
                          for split in ("val", "train")} if config.eval_freq else None,
            dist=self.dist, stop_requested=lambda: self.stop.requested, checkpoint_path=self.ckpt_path,
            norm_groups=PARAM_GROUPS, sample_vocabulary=lambda: self.data.split_bytes("train"))
        if resume_state is not None:
            self.telemetry.load_state_dict(resume_state.get("telemetry"))
        self.step = self.start_step
        self.saved_step: int | None = None

    def _restore(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        load_optimizer_state(self.optimizer, self.scheduler, state)
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

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)

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
        return self.telemetry.stop_agreed if self.dist.enabled else self.stop.requested

    def run_step(self, step: int) -> None:
        """One iteration of the loop: the training step, then the sync points due at this step."""
        self.train_step(step)
        self.step = step
        for sync_point in self.telemetry.due(step):  # flush, probe, evaluate, log_samples: in that order
            getattr(self, sync_point)()
        if self.config.ckpt_freq and step % self.config.ckpt_freq == 0 and step != self.config.max_iters:
            self.save_checkpoint()

    def train_step(self, step: int) -> None:
        """One update. No host sync anywhere in here."""
        self.telemetry.step_start(step)
        with record_function("data"):
            x, y = self.data.get_batch("train")
        with record_function("forward"), self.autocast():
            if self.telemetry.neuron_stats:  # BDH's optional channel: every step's neuron statistics
                _, loss, neuron_stats = self.train_model(x, y, neuron_stats=True)
            else:
                (_, loss), neuron_stats = self.train_model(x, y), None
        with record_function("backward"):
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                self.scaler.unscale_(self.optimizer)
            else:
                loss.backward()
        found_inf = self.telemetry.after_backward(loss, self.scaler, neuron_stats)
        if found_inf is not None:
            self.optimizer.found_inf = found_inf  # the fused step skips a non-finite update on the device
        with record_function("optimizer"):
            apply_update(self.optimizer, self.scheduler, self.scaler)
        self.telemetry.step_end(step)

    # The loop's sync points (DESIGN.md invariant 1), named here so that a harness can wrap each one
    # as the loop calls it (bench/gpu_proof.py's sync check does); each is the telemetry's own.
    def flush(self) -> None:
        self.telemetry.flush()

    def probe(self) -> None:
        self.telemetry.probe()

    def evaluate(self) -> dict[str, float]:
        return self.telemetry.evaluate()

    def log_samples(self) -> list[str]:
        return self.telemetry.log_samples()

    # What harnesses reach through the Trainer (bench/gpu_proof.py wraps probes.before_update and
    # memory_snapshot.step as sync points, and reads compile_s): the telemetry's own parts.
    @property
    def probes(self):
        return self.telemetry.probes

    @property
    def memory_snapshot(self):
        return self.telemetry.memory_snapshot

    @property
    def compile_s(self) -> float | None:
        return self.telemetry.compile_s

    # --- checkpoints and the end ----------------------------------------------------------------

    def rng_state(self) -> dict[str, Any]:
        """This rank's random streams: torch (dropout on CPU), CUDA (dropout on the GPU), batches."""
        rng = {"torch": torch.get_rng_state(), "data": self.data.state_dict()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return rng

    @record_function("checkpoint")
    def save_checkpoint(self) -> None:
        self.flush()  # metrics up to here reach the host first, and non-finite steps are known
        if self.telemetry.weights_suspect:
            self.telemetry.console(f"not saving a checkpoint at step {self.step}: a non-finite update was applied")
            return
        if self.saved_step == self.step:
            return  # e.g. a stop right after a periodic checkpoint
        rng = self.rng_state()
        if self.dist.enabled:  # every rank's streams (dropout and batches), so each resumes its own
            rng["ranks"] = distributed.gather_objects(rng, self.dist)
        if not self.dist.is_main:
            self.saved_step = self.step
            return
        self.telemetry.make_durable()  # a checkpoint at step s claims every record up to s
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "step": self.step,
                 "config": self.config.to_dict(), "rng": rng, "telemetry": self.telemetry.state_dict()}
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        checkpoint.save(self.ckpt_path, state)
        self.saved_step = self.step
        self.telemetry.checkpoint_saved(self.ckpt_path)

    def final_sample(self) -> str:
        """The reference's closing line: the prompt and 100 sampled bytes, top_k=3."""
        return FINAL_PROMPT + generate_samples(self.model, [FINAL_PROMPT], max_tokens=FINAL_SAMPLE_TOKENS, top_k=3,
                                               seed=self.config.seed, autocast=self.autocast)[0]

    def close(self) -> None:
        """Every exit path: flush what is buffered, close the backends and the samplers."""
        self.telemetry.close()


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
            trainer.telemetry.console("Training done")
            trainer.telemetry.console(trainer.final_sample())
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
            trainer.telemetry.collectives_ok = not trainer.dist.enabled  # a peer may be mid-collective
            if trainer.dist.is_main:
                print(f"interrupted at step {trainer.step}; metrics flushed; the last checkpoint is kept: "
                      f"{trainer.ckpt_path}", file=sys.stderr)
        return 130
    except Exception:
        if trainer is not None:
            trainer.telemetry.collectives_ok = not trainer.dist.enabled  # a failed peer: close() flushes locally
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
