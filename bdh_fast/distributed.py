"""Data-parallel training under torchrun, on torch.distributed (NCCL on CUDA, Gloo on CPU).

`torchrun --nproc_per_node N -m bdh_fast.train ...` sets RANK / WORLD_SIZE / LOCAL_RANK; without
them (or with WORLD_SIZE=1) everything here is a no-op and the run is a plain single process.
Telemetry values stay on each rank's device; a flush makes ONE collective over the whole window.
"""

from __future__ import annotations

import inspect
import math
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


# DDP broadcasts module buffers from rank 0 before every forward by default: a hidden collective per
# step. BDH's only buffer is RoPE's constant frequency table, so that sync is turned off (torch 2.13
# renamed the switch; the old one still works there, with a deprecation warning).
NO_PER_STEP_BUFFER_SYNC = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters
    else {"broadcast_buffers": False}
)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init(use_cuda: bool) -> DistInfo:
    """Join the process group torchrun describes (if any); pins each rank to its local GPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistInfo(rank, world_size, local_rank)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def mean_(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """In-place mean over ranks: one all_reduce."""
    if info.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= info.world_size
    return tensor


def sum_(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """In-place sum over ranks: one all_reduce."""
    if info.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's `obj`, in rank order (a list of one without torchrun)."""
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


# Per-GPU NVML metrics, as bdh_fast.telemetry.system.GPUSampler names them (system/gpu<i>/<metric>).
GPU_METRICS = ("util", "mem_used_gb", "mem_total_gb", "power_w", "temp_c", "sm_clock_mhz",
               "throttle_reasons", "throttled")


class FlushExchange:
    """Everything the ranks share at a flush, in ONE all_reduce (DESIGN.md invariant 10).

    Called by StepBuffer.flush on the device window (n, M). It packs the window with this rank's stop
    request and, on CUDA, its GPU's NVML means in this rank's own slots (zeros elsewhere), sums
    over ranks, and unpacks: the window becomes the mean over ranks, the stop flag is set when any
    rank asked to stop, and every rank's GPU stats come back as system/gpu<rank>/<metric>.
    Read `stop_requested` and `gpu_means` after the flush (the buffer has already waited).
    """

    def __init__(self, info: DistInfo, stop_requested: bool, gpu_means: dict[str, float] | None):
        self.info = info
        self.local_stop = stop_requested
        self.local_gpu = gpu_means
        self._extras: torch.Tensor | None = None  # (1 + world_size * len(GPU_METRICS),) after the sum
        self._host: list[float] | None = None

    def _gpu_slots(self) -> list[float]:
        if self.local_gpu is None:
            return []
        by_metric = {name.rsplit("/", 1)[1]: value for name, value in self.local_gpu.items()}
        mine = [float(by_metric.get(metric, math.nan)) for metric in GPU_METRICS]  # NaN: not measured
        slots = [0.0] * (self.info.world_size * len(GPU_METRICS))
        slots[self.info.rank * len(GPU_METRICS):(self.info.rank + 1) * len(GPU_METRICS)] = mine
        return slots

    def __call__(self, window: torch.Tensor) -> None:
        extras = torch.tensor([float(self.local_stop), *self._gpu_slots()], dtype=window.dtype,
                              device=window.device)
        packed = torch.cat([window.reshape(-1), extras])  # (n * M + extras,)
        dist.all_reduce(packed, op=dist.ReduceOp.SUM)
        window.copy_(packed[:window.numel()].view_as(window) / self.info.world_size)
        self._extras = packed[window.numel():]

    def _read(self) -> list[float]:
        if self._host is None:
            # Flush sync point: the buffer has already waited for the stream; this is a small copy.
            self._host = self._extras.tolist() if self._extras is not None else []
        return self._host

    @property
    def stop_requested(self) -> bool:
        values = self._read()
        return bool(values and values[0] > 0)

    @property
    def gpu_means(self) -> dict[str, float]:
        values = self._read()[1:]
        out = {}
        for index, value in enumerate(values):
            rank, metric = divmod(index, len(GPU_METRICS))
            if not math.isnan(value):
                out[f"system/gpu{rank}/{GPU_METRICS[metric]}"] = value
        return out
