"""Data-parallel training under torchrun, on torch.distributed (NCCL on CUDA, Gloo on CPU).

`torchrun --nproc_per_node N -m bdh_fast.train ...` sets RANK / WORLD_SIZE / LOCAL_RANK; without
them (or with WORLD_SIZE=1) everything here is a no-op and the run is a plain single process.
Telemetry values stay on each rank's device; a flush makes ONE collective over the whole window.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


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
