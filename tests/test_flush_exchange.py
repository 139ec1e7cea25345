"""bdh_fast.distributed.FlushExchange: everything the ranks share at a flush in ONE all_reduce —
the window (mean over ranks), any rank's stop request, every rank's GPU stats. Two Gloo processes
with fake NVML values (the Trainer passes real ones only on CUDA)."""

from __future__ import annotations

import math
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bdh_fast import distributed


def _worker(rank: int, world: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    calls = []
    real = dist.all_reduce

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    dist.all_reduce = counted
    try:
        info = distributed.DistInfo(rank, world, rank)
        window = torch.full((3, 2), float(rank + 1))  # (steps, metrics)
        gpu = {"system/gpu0/util": 10.0 * (rank + 1), "system/gpu0/power_w": 100.0 + rank}
        if rank == 1:
            gpu.pop("system/gpu0/power_w")  # a metric this GPU could not read
        exchange = distributed.FlushExchange(info, stop_requested=(rank == 1), gpu_means=gpu)
        exchange(window)
        results[rank] = (window.tolist(), exchange.stop_requested, exchange.gpu_means, len(calls))
    finally:
        dist.all_reduce = real
        dist.destroy_process_group()


def test_one_all_reduce_carries_window_stop_and_every_gpu():
    world = 2
    with mp.Manager() as manager:
        results = manager.dict()
        port = 29_000 + os.getpid() % 1000
        mp.spawn(_worker, args=(world, port, results), nprocs=world, join=True)
        results = dict(results)
    for rank in range(world):
        window, stop, gpus, n_calls = results[rank]
        assert n_calls == 1
        assert window == [[1.5, 1.5]] * 3  # mean of 1 and 2
        assert stop is True  # rank 1 asked; both know
        assert gpus == {"system/gpu0/util": 10.0, "system/gpu0/power_w": 100.0, "system/gpu1/util": 20.0}
        assert not any(math.isnan(v) for v in gpus.values())
