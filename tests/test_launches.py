"""The telemetry's launches per step (bdh_fast/telemetry/launches.py), counted with the profiler, and
the one optimizer parameter group (each group of a fused optimizer is a launch of its own)."""

from __future__ import annotations

import io

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from bdh_fast.config import RunConfig
from bdh_fast.model import BDH
from bdh_fast.optim import PARAM_GROUPS, load_optimizer_state, lr_lambda, make_optimizer
from bdh_fast.telemetry.launches import count_launches, telemetry_launches_per_step


def test_the_counter_counts_what_runs_and_leaves_out_views():
    x = torch.randn(8)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with record_function("telemetry/grad_norms"):
            y = x.view(2, 4).reshape(8)  # views: nothing launched
            x.view(2, 4).t().reshape(8)  # 1: reshaping a transposed view copies
            z = torch.isfinite(y)  # 1 (a composite counts once)
            w = (y * 2 + 1).float()  # 2; float() of float32 is a no-op
            torch.cat([w, z.float()])  # 2: the cast and the cat
        x.sum()  # outside the ranges
    assert count_launches(prof.events()) == 6


def test_at_most_six_launches_per_step_compiled():
    result = telemetry_launches_per_step(device="cpu", compile=True)
    assert result["launches_per_step"] <= 6, result
    assert result["optimizer_groups"] == 1
    clipped = telemetry_launches_per_step(device="cpu", compile=True, grad_clip=1.0)
    assert clipped["launches_per_step"] <= result["launches_per_step"] + 1, clipped  # + the foreach multiply
    eager = telemetry_launches_per_step(device="cpu", compile=False)
    assert eager["launches_per_step"] > result["launches_per_step"], eager  # what compiling folds away


def test_a_checkpoint_of_the_two_group_optimizer_resumes_into_one_group():
    """Checkpoints written when the optimizer had one group per PARAM_GROUPS entry still resume, and
    the next update is the one the two-group optimizer would have made."""
    config = RunConfig(preset="tiny", device="cpu", compile=False, lr_schedule="cosine", warmup_iters=2, max_iters=10)
    torch.manual_seed(0)
    model = BDH(config.model_config())
    params = dict(model.named_parameters())
    old = torch.optim.AdamW([{"params": [params[n] for n in names], "name": g} for g, names in PARAM_GROUPS.items()],
                            lr=config.lr, weight_decay=config.weight_decay)
    old_schedule = torch.optim.lr_scheduler.LambdaLR(old, lr_lambda(config))
    x = torch.randint(0, 256, (2, 16))
    for _ in range(3):
        model(x, x)[1].backward()
        old.step()
        old.zero_grad()
        old_schedule.step()
    saved = io.BytesIO()  # through bytes, as a checkpoint file: the loaded state shares no tensor with `old`
    torch.save({"optimizer": old.state_dict(), "scheduler": old_schedule.state_dict()}, saved)
    state = torch.load(io.BytesIO(saved.getvalue()), weights_only=True)
    weights = {n: p.detach().clone() for n, p in params.items()}

    new = make_optimizer(model, config, torch.device("cpu"))
    new_schedule = torch.optim.lr_scheduler.LambdaLR(new, lr_lambda(config))
    load_optimizer_state(new, new_schedule, state)
    assert len(new.param_groups) == 1 and new.param_groups[0]["lr"] == old.param_groups[0]["lr"]
    model(x, x)[1].backward()
    grads = {n: p.grad.clone() for n, p in params.items()}
    new.step()
    after_new = {n: p.detach().clone() for n, p in params.items()}
    with torch.no_grad():  # the same update through the old optimizer, from the same weights
        for n, p in params.items():
            p.copy_(weights[n])
            p.grad = grads[n]
    old.step()
    for n, p in params.items():
        torch.testing.assert_close(after_new[n], p.detach(), rtol=1e-6, atol=1e-7, msg=n)
