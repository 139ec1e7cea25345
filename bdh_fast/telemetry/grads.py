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
        buckets: dict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
        for i, p in enumerate(self.params):
            buckets[(p.device, p.dtype)].append(i)
        self.buckets = list(buckets.values())
        self.order = torch.tensor([i for b in self.buckets for i in b], device=device)

    def compute(self, max_norm: float = 0.0) -> torch.Tensor:
        """Norms of the current gradients (params without a gradient count as zero); with
        max_norm > 0 the gradients are then scaled in place so the global norm is <= max_norm."""
        per_bucket = []
        for bucket in self.buckets:
            grads = [self._grad(i) for i in bucket]
            norms = torch._foreach_norm(grads)  # one fused pass per (device, dtype)
            per_bucket.append(torch.stack(norms).to(self.device, torch.float32))
        stacked = torch.cat(per_bucket)  # (n_params,) in bucket order
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

    def _grad(self, i: int) -> torch.Tensor:
        grad = self.params[i].grad
        return grad if grad is not None else torch.zeros((), device=self.params[i].device)
