"""How many kernel launches the telemetry adds to a training step, counted with torch.profiler.

The telemetry's per-step work runs inside two profiler ranges, `telemetry/grad_norms` (after
backward) and `telemetry/record` (after the update). What is counted inside them:

- CUDA: the runtime's launch calls (cudaLaunchKernel, cuLaunchKernel for Triton, memcpy/memset),
  one per kernel or copy the GPU runs.
- CPU: each aten operator the range calls directly (not those nested in another operator) that
  does work (views, `empty` and no-op conversions launch nothing on a GPU and are left out), plus
  each kernel of a torch.compile'd graph (inductor's C++ kernels, profiled one by one). A composite
  operator (isfinite: abs, ne, eq, mul) counts once, so eager code counts low on a CPU; the fused
  norm pass counts once, as on CUDA, where it is one multi-tensor kernel (two with its cleanup).

The optimizer's own launches are not the telemetry's and are not counted; `optimizer_groups`
reports how many parameter groups the fused AdamW steps over (each group is a launch of its own).
"""

from __future__ import annotations

import contextlib
import tempfile

import torch

RANGES = ("telemetry/grad_norms", "telemetry/record")
CUDA_LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx",
                 "cudaMemcpyAsync", "cudaMemsetAsync")
NO_LAUNCH = {  # aten operators that only make views, allocate, or return their input as it is
    "aten::view", "aten::_unsafe_view", "aten::as_strided", "aten::detach", "aten::detach_", "aten::alias",
    "aten::squeeze", "aten::unsqueeze", "aten::slice", "aten::select", "aten::t", "aten::transpose",
    "aten::expand", "aten::reshape", "aten::_reshape_alias", "aten::lift_fresh", "aten::empty",
    "aten::empty_like", "aten::empty_strided", "aten::resize_", "aten::to", "aten::contiguous",
}
MAY_COPY = {"aten::to", "aten::contiguous", "aten::reshape"}  # a view or a no-op, or else one copy
COPIES = {"aten::copy_", "aten::clone", "aten::_to_copy"}


def count_launches(events, ranges: tuple[str, ...] = RANGES) -> int:
    """Launches inside every occurrence of `ranges` among a profiler's FunctionEvents."""
    total = 0
    for event in events:
        if event.name in ranges:
            total += _launches_under(event)
    return total


def _launches_under(event) -> int:
    count = 0
    for child in event.cpu_children:
        name = child.name
        if name in CUDA_LAUNCHES or "cpp_fused" in name or name.startswith("triton_"):
            count += 1  # a launch call, or an inductor kernel (profiled one by one)
        elif name.startswith("aten::"):
            if _cuda_launches(child):
                count += _cuda_launches(child)
            elif name not in NO_LAUNCH or (name in MAY_COPY and _copies(child)):
                count += 1
        else:  # a range of our own, or a compiled region: look inside
            count += _launches_under(child)
    return count


def _copies(event) -> bool:
    return any(c.name in COPIES or _copies(c) for c in event.cpu_children)


def _cuda_launches(event) -> int:
    return sum(1 if c.name in CUDA_LAUNCHES else _cuda_launches(c) for c in event.cpu_children)


def telemetry_launches_per_step(device: str | None = None, compile: bool | None = None, steps: int = 6,
                                grad_clip: float = 0.0) -> dict:
    """Train a tiny BDH under the Trainer's own optimizer and Telemetry for a few steps and count the
    launches the telemetry adds per step (no flush in the counted steps). Defaults: CUDA when
    available, compiled on CUDA."""
    from torch.profiler import ProfilerActivity, profile

    from bdh_fast.model import BDH
    from bdh_fast.optim import PARAM_GROUPS, make_optimizer
    from bdh_fast.telemetry.seam import Telemetry

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    compile = dev.type == "cuda" if compile is None else compile
    config = _tiny(dev, compile=compile, grad_clip=grad_clip, eval_freq=0, generate_freq=0, probe_freq=0,
                   progress=False, nvml_interval=0.0, log_backend="jsonl", log_train_freq=4 * steps,
                   log_freq=4 * steps, max_iters=4 * steps)
    torch.manual_seed(0)
    model = BDH(config.model_config()).to(dev)
    optimizer = make_optimizer(model, config, dev)
    x = torch.randint(0, 256, (2, 16), device=dev)
    with tempfile.TemporaryDirectory() as log_dir, _kernel_profile(compile):
        telemetry = Telemetry(model, optimizer, config, log_dir=log_dir, norm_groups=PARAM_GROUPS)
        telemetry.grad_norms.compile = compile  # the Telemetry compiles its row function on CUDA only
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])

        def step(i: int) -> None:
            telemetry.step_start(i)
            _, loss, stats = model(x, x, neuron_stats=True)  # as the Trainer's step: BDH's channel on
            loss.backward()
            found_inf = telemetry.after_backward(loss, neuron_stats=stats)
            if found_inf is not None:
                optimizer.found_inf = found_inf
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            telemetry.step_end(i)

        for i in range(1, 3):  # compile and warm up outside the profile
            step(i)
        with profile(activities=activities) as prof:
            for i in range(3, 3 + steps):
                step(i)
        telemetry.close()
    return {"launches_per_step": count_launches(prof.events()) / steps, "device": dev.type, "compiled": compile,
            "grad_clip": grad_clip, "optimizer_groups": len(optimizer.param_groups), "steps": steps}


def model_launches_per_step(neuron_stats: bool, config=None, device: str | None = None,
                            compile: bool | None = None, steps: int = 2) -> float:
    """Launches of BDH's forward and backward per training step, with or without the model's
    neuron-statistics channel: the difference is what the every-step statistics add to the model's
    own kernels (0 when inductor fuses their reductions into the kernels that produce x_s, y_s and
    x_s * y_s). `config`: a RunConfig (default: the tiny preset); its batch and block sizes."""
    from torch.profiler import ProfilerActivity, profile, record_function

    from bdh_fast.model import BDH

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    compile = dev.type == "cuda" if compile is None else compile
    config = config or _tiny(dev)
    torch.manual_seed(0)
    model = BDH(config.model_config()).to(dev)
    run = torch.compile(model, dynamic=False) if compile else model
    x = torch.randint(0, config.vocab_size, (config.batch_size, config.block_size), device=dev)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])

    def step() -> None:
        with record_function("model"):
            out = run(x, x, neuron_stats=True) if neuron_stats else run(x, x)
            out[1].backward()
        model.zero_grad(set_to_none=True)

    with _kernel_profile(compile):
        step()  # compile and warm up outside the profile
        with profile(activities=activities) as prof:
            for _ in range(steps):
                step()
    return count_launches(prof.events(), ("model",)) / steps


def _tiny(device: torch.device, **fields):
    """The tiny preset's RunConfig, as `--preset tiny` resolves it (RunConfig(preset=...) alone keeps
    the dataclass defaults, the reference sizes)."""
    from bdh_fast.config import resolve

    return resolve({"preset": "tiny", "device": device.type, "run_name": "launches", **fields},
                   cuda_available=torch.cuda.is_available())


@contextlib.contextmanager
def _kernel_profile(on: bool):
    """Have inductor's C++ kernels show in the profiler one by one (they are one range otherwise)."""
    if not on:
        yield
        return
    import torch._inductor.config as inductor_config

    with inductor_config.patch({"cpp.enable_kernel_profile": True}):
        yield
