"""The optimizer side of training: AdamW over named parameter groups, the LR schedule, the update."""

from __future__ import annotations

import math

import torch

from bdh_fast.config import RunConfig
from bdh_fast.model import BDH

PARAM_GROUPS = {  # parameters whose gradient norms are also logged per group (train/grad_norm/group_<name>)
    "embeddings": ["embed.weight", "lm_head"],
    "neurons": ["encoder", "encoder_v", "decoder"],
}


def lr_lambda(config: RunConfig):
    """Multiplier of --lr at each step: linear warmup, then constant, cosine or linear decay to
    --min_lr over the remaining steps."""
    floor = config.min_lr / config.lr

    def factor(it: int) -> float:
        if it < config.warmup_iters:
            return (it + 1) / config.warmup_iters
        if config.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (it - config.warmup_iters) / max(1, config.max_iters - config.warmup_iters))
        if config.lr_schedule == "cosine":
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0 - (1 - floor) * progress

    return factor


def make_optimizer(model: BDH, config: RunConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over one parameter group: every parameter has the same hyper-parameters, and each group
    of a fused optimizer is a kernel launch of its own. The per-group norms come from PARAM_GROUPS."""
    params = dict(model.named_parameters())
    ordered = [params[n] for names in PARAM_GROUPS.values() for n in names]
    # fused: one kernel for the whole update, and it honours `found_inf` (skip on device, no sync).
    return torch.optim.AdamW(ordered, lr=config.lr, weight_decay=config.weight_decay, fused=True)


def load_optimizer_state(optimizer: torch.optim.Optimizer, scheduler, state: dict) -> None:
    """Restore the optimizer and LR schedule from a checkpoint, also one saved when the optimizer had
    one group per PARAM_GROUPS entry (same hyper-parameters, same parameter order): merged into one."""
    optim_state, sched_state = state["optimizer"], dict(state["scheduler"])
    groups = optim_state["param_groups"]
    if len(groups) > 1 and len(optimizer.param_groups) == 1:
        merged = {**groups[0], "params": [i for g in groups for i in g["params"]]}
        merged.pop("name", None)
        optim_state = {**optim_state, "param_groups": [merged]}
        for key in ("base_lrs", "_last_lr"):
            if isinstance(sched_state.get(key), list):
                sched_state[key] = sched_state[key][:1]
    optimizer.load_state_dict(optim_state)
    scheduler.load_state_dict(sched_state)


def apply_update(optimizer: torch.optim.Optimizer, scheduler, scaler: torch.amp.GradScaler | None) -> None:
    """The optimizer step (through the GradScaler for float16), zero_grad, then the LR schedule."""
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
