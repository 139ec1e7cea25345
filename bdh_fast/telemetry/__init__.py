"""Everything that observes a training run, behind one seam: `Telemetry` (seam.py).

    from bdh_fast.telemetry import Telemetry

    telemetry = Telemetry(model, optimizer, log_dir="runs/exp1", max_iters=3000, tokens_per_step=B * T)
    for step in range(1, 3001):
        ...
        loss.backward()
        telemetry.after_backward(loss)   # gradient norms, reduced on the device
        optimizer.step()
        telemetry.step(step)             # into the device buffer; one copy to the host per window
    telemetry.close()

    seam.py        Telemetry: what the loop calls, and the order of everything it does
    device side    buffer.py (StepBuffer), grads.py (GradNorms, get_grad_norm), timer.py (StepTimer)
    host side      metrics.py (MetricsProcessor: perf, MFU, console line, non-finite policy; Console),
                   throughput.py (FLOPs per token, peak TFLOP/s)
    observers      probes.py (norms, histograms; BDH's neuron statistics), system.py (NVML, allocator),
                   profiling.py (torch.profiler, CUDA memory snapshots)
    backends/      tensorboard, wandb, jsonl, and the background writer (the public Logger's base)

`Telemetry` is imported on first use: bdh_fast.logger imports the backends from this package, and
the seam imports bdh_fast.logger.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Telemetry"]


def __getattr__(name: str) -> Any:
    if name == "Telemetry":
        from bdh_fast.telemetry.seam import Telemetry

        return Telemetry
    raise AttributeError(f"module 'bdh_fast.telemetry' has no attribute {name!r}")
