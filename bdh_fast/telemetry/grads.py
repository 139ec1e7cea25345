"""Gradient norms in one fused pass, reduced on the device, and clipping that reuses them.

Per (device, dtype) bucket of parameters, one `torch._foreach_norm` gives every tensor's L2 norm;
the per-group and global norms are reduced from those on the device. Clipping multiplies the
gradients by clamp(max_norm / (global + eps), max=1) with one foreach multiply per bucket: no host
branch, no second norm pass. Nothing here reads a tensor value on the host.
"""

from __future__ import annotations

from collections import defaultdict

import torch

CLIP_EPS = 1e-6  # the eps torch.nn.utils.clip_grad_norm_ uses


class GradNorms:
    """Norms of the gradients of `named_params`, grouped as `groups` (group name -> param names).

    `compute()` returns one float32 vector on `device`, laid out as `self.names`:
    [global, one per parameter..., one per group...].
    """

    def __init__(
        self,
        named_params: list[tuple[str, torch.nn.Parameter]],
        groups: dict[str, list[str]],
        device: torch.device,
    ):
        self.device = device
        self.params = [p for _, p in named_params]
        param_names = [n for n, _ in named_params]
        index = {n: i for i, n in enumerate(param_names)}
        # (n_groups, n_params) 0/1 matrix: group squared norms = membership @ squared param norms.
        self.membership = torch.zeros(len(groups), len(param_names), device=device)
        for g, members in enumerate(groups.values()):
            for name in members:
                self.membership[g, index[name]] = 1.0
        self.names = (
            ["train/grad_norm"]
            + [f"train/grad_norm/{n.removesuffix('.weight')}" for n in param_names]
            + [f"train/grad_norm/group_{g}" for g in groups]
        )
        self.buckets = _buckets(self.params)
        self.order = torch.tensor([i for b in self.buckets for i in b], device=device)

    def compute(self, max_norm: float = 0.0) -> torch.Tensor:
        """Norms of the current gradients (params without a gradient count as zero); with
        max_norm > 0 the gradients are then scaled in place so the global norm is <= max_norm."""
        stacked = _norms_in_bucket_order(self.params, self.buckets, self.device)  # (n_params,)
        per_param = torch.empty_like(stacked).index_copy_(0, self.order, stacked)
        squared = per_param.square()
        total = squared.sum().sqrt()
        per_group = (self.membership @ squared).sqrt()
        if max_norm > 0:
            coef = (max_norm / (total + CLIP_EPS)).clamp(max=1.0)
            for bucket in self.buckets:
                grads = [self.params[i].grad for i in bucket if self.params[i].grad is not None]
                if grads:
                    torch._foreach_mul_(grads, coef.to(grads[0].device))
        return torch.cat([total.view(1), per_param, per_group])


def get_grad_norm(model: torch.nn.Module) -> torch.Tensor:
    """The global L2 norm of `model`'s gradients, as a 0-dim float32 tensor on the device of its
    first parameter. Reduced there with the same fused pass the training loop logs (GradNorms), and
    never read: no host sync (read it at a sync point of your own, or log it through a buffer).
    Parameters without a gradient count as zero."""
    params = list(model.parameters())
    norms = _norms_in_bucket_order(params, _buckets(params), params[0].device)  # (n_params,)
    return norms.square().sum().sqrt()


def _buckets(params: list[torch.Tensor]) -> list[list[int]]:
    """Indices of `params` grouped by (device, dtype), in first-seen order: one fused pass each."""
    buckets: dict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
    for i, p in enumerate(params):
        buckets[(p.device, p.dtype)].append(i)
    return list(buckets.values())


def _norms_in_bucket_order(params: list[torch.Tensor], buckets: list[list[int]], device: torch.device) -> torch.Tensor:
    """Every parameter's gradient norm, float32 on `device`, ordered bucket by bucket."""
    per_bucket = []
    for bucket in buckets:
        grads = [params[i].grad if params[i].grad is not None else torch.zeros((), device=params[i].device)
                 for i in bucket]
        norms = torch._foreach_norm(grads)  # one fused pass per (device, dtype)
        per_bucket.append(torch.stack(norms).to(device, torch.float32))
    return torch.cat(per_bucket)
