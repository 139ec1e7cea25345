"""The optimizer side of training: AdamW over named parameter groups, the LR schedule, the update."""

from __future__ import annotations

import math

import torch

from bdh_fast.config import RunConfig
from bdh_fast.model import BDH

PARAM_GROUPS = {  # optimizer parameter groups (same hyper-parameters; named for per-group norms)
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
    params = dict(model.named_parameters())
    groups = [{"params": [params[n] for n in names], "name": g} for g, names in PARAM_GROUPS.items()]
    # fused: one kernel for the whole update, and it honours `found_inf` (skip on device, no sync).
    return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay, fused=True)


def apply_update(optimizer: torch.optim.Optimizer, scheduler, scaler: torch.amp.GradScaler | None) -> None:
    """The optimizer step (through the GradScaler for float16), zero_grad, then the LR schedule."""
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
