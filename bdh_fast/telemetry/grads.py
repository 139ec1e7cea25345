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


class SpikeDetector:
    """Loss and gradient-norm spikes, decided on the device at every step with no host sync.

    A running window of the last `window` accepted (loss, global grad norm) pairs lives in a device
    tensor; a step is a spike when, with at least `min_history` steps in the window, its loss or its
    grad norm lies more than `z` standard deviations above the window's mean (upward only: a loss
    that drops is no spike). A spike, or a non-finite value, does not enter the window. With
    `loss_votes` False (data parallel: each rank sees its own loss) only the grad norm, the same on
    every rank, decides, so that every rank skips the same steps. `state_dict` travels in the
    checkpoint: a resumed run decides as the uninterrupted one would have.
    """

    COLUMNS = ["spike", "train/loss_zscore", "train/grad_norm_zscore"]

    def __init__(self, device: torch.device, window: int = 128, z: float = 6.0, min_history: int = 32,
                 loss_votes: bool = True):
        self.window, self.z, self.min_history, self.loss_votes = window, z, min_history, loss_votes
        self.history = torch.zeros(2, window, device=device)  # (loss, grad norm) x window
        self.count = torch.zeros((), dtype=torch.long, device=device)  # accepted steps so far
        self.slots = torch.arange(window, device=device)  # the window's positions, made once

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"history": self.history.cpu(), "count": self.count.cpu()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if tuple(state["history"].shape) == tuple(self.history.shape):
            self.history.copy_(state["history"])
            self.count.copy_(state["count"])


def _spike_columns(values: torch.Tensor, history: torch.Tensor, count: torch.Tensor, slots: torch.Tensor,
                   z_max: float, min_history: int, loss_votes: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """values: (2,) this step's loss and grad norm. Updates history and count in place; returns the
    (3,) columns [spike, loss z, grad norm z] and the spike flag (0-dim bool)."""
    window = history.size(1)
    n = count.clamp(max=window).float()
    filled = (slots < n).float()  # (W,)
    mean = (history * filled).sum(1) / n.clamp(min=1)  # (2,)
    var = ((history - mean[:, None]).square() * filled).sum(1) / (n - 1).clamp(min=1)
    std = var.sqrt().clamp(min=1e-8)
    ready = count >= min_history
    zs = torch.where(ready, (values - mean) / std, torch.zeros_like(values))  # (2,)
    finite = torch.isfinite(values).all()
    above = zs > z_max
    spike = ready & finite & (above.any() if loss_votes else above[1])
    accept = finite & ~spike
    slot = (count % window).view(1)
    kept = history.index_select(1, slot).squeeze(1)  # (2,)
    history.index_copy_(1, slot, torch.where(accept, values, kept).view(2, 1))
    count.add_(accept.long())
    return torch.cat([spike.float().view(1), zs]), spike


class GradNorms:
    """Norms of the gradients of `named_params`, grouped as `groups` (group name -> param names).

    `compute()` returns one float32 vector on `device`, laid out as `self.names`:
    [global, one per parameter (when `per_param`)..., one per group...]. `step_row()` is what the
    training step uses: the same norms and the step's other values in one vector, with every launch
    after the fused norm pass folded into one function (compiled when `compile`: one or two kernels).
    Every parameter's norm is computed either way (the global norm is reduced from them); `per_param`
    decides only whether they are columns of the row.
    """

    def __init__(
        self,
        named_params: list[tuple[str, torch.nn.Parameter]],
        groups: dict[str, list[str]],
        device: torch.device,
        compile: bool = False,
        per_param: bool = True,
    ):
        self.device = device
        self.params = [p for _, p in named_params]
        param_names = [n for n, _ in named_params]
        index = {n: i for i, n in enumerate(param_names)}
        self.names = (
            ["train/grad_norm"]
            + ([f"train/grad_norm/{n.removesuffix('.weight')}" for n in param_names] if per_param else [])
            + [f"train/grad_norm/group_{g}" for g in groups]
        )
        self.buckets = _buckets(self.params)
        bucket_order = [i for b in self.buckets for i in b]
        position = {param: pos for pos, param in enumerate(bucket_order)}
        self._order = tuple(position[i] for i in range(len(self.params)))  # param -> its norm's position
        self._groups = tuple(tuple(index[name] for name in members) for members in groups.values())
        self._one_device = len({p.device for p in self.params}) <= 1
        self.per_param = per_param
        self.compile = compile  # the row function, built at its first call
        self._row_fns: dict[tuple, object] = {}

    def compute(self, max_norm: float = 0.0) -> torch.Tensor:
        """Norms of the current gradients (params without a gradient count as zero); with
        max_norm > 0 the gradients are then scaled in place so the global norm is <= max_norm."""
        loss = torch.zeros((), device=self.device)
        row, _ = self.step_row(loss, max_norm)
        return row[1:len(self.names) + 1]

    def step_row(self, loss: torch.Tensor, max_norm: float = 0.0, scale: torch.Tensor | None = None,
                 skip_nonfinite: bool = False, spikes: SpikeDetector | None = None,
                 skip_spikes: bool = False, tail: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One float32 vector on the device, [loss, *norms (as `names`), nonfinite], then given the
        GradScaler's `scale` (float16) [scale, scaler_skipped], then given `spikes` its COLUMNS, then
        `tail` flattened (more of the step's values, e.g. BDH's neuron statistics); and the flag a
        fused optimizer skips an update on (a non-finite step with `skip_nonfinite`, a
        spike with `skip_spikes`; no scaler), else None. Clips in place when max_norm > 0. Launches:
        one fused norm pass per (device, dtype), one function for the rest, one foreach multiply per
        bucket when clipping. Never syncs."""
        norms = _norms_in_bucket_order(self.params, self.buckets)
        if not self._one_device:
            norms = [n.to(self.device) for n in norms]
        spike_rule = None if spikes is None else (spikes.z, spikes.min_history, spikes.loss_votes, skip_spikes)
        key = (max_norm, scale is not None, skip_nonfinite, spike_rule)
        fn = self._row_fns.get(key)
        if fn is None:
            fn = self._row_fns[key] = _row_function(self._order, self._groups, self.device, *key, self.per_param,
                                                    self.compile)
        state = (spikes.history, spikes.count, spikes.slots) if spikes is not None else None
        row, found_inf, coef = fn(loss.detach(), norms, scale, state, tail)
        if coef is not None:
            for bucket in self.buckets:
                grads = [self.params[i].grad for i in bucket if self.params[i].grad is not None]
                if grads:
                    torch._foreach_mul_(grads, coef.to(grads[0].device))
        return row, found_inf


def _row_function(order: tuple[int, ...], groups: tuple[tuple[int, ...], ...], device: torch.device,
                  max_norm: float, scaled: bool, skip_nonfinite: bool, spike_rule: tuple | None, per_param: bool,
                  compile: bool):
    """The math after the norm pass, as one function of (loss, norms in bucket order, scale): the
    per-parameter, global and group norms, the non-finite flags, the clip coefficient and the row.
    The layout is fixed here, so that compiled it is one graph whose guards never change."""
    index = torch.tensor(order, dtype=torch.long, device=device)  # param -> its norm in bucket order
    # (n_groups, n_params) 0/1 matrix: group squared norms = membership @ squared param norms.
    membership = torch.zeros(len(groups), len(order), device=device)
    for g, members in enumerate(groups):
        membership[g, list(members)] = 1.0

    def row(loss: torch.Tensor, norms: list[torch.Tensor], scale: torch.Tensor | None,
            spike_state: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None, tail: torch.Tensor | None):
        loss = loss.float().reshape(1)
        if order:
            param_norms = torch.stack(norms).float()[index]  # (n_params,)
            squared = param_norms.square()
            total = squared.sum().sqrt()
            columns = [total.reshape(1), *([param_norms] if per_param else []), (membership @ squared).sqrt()]
            grads_finite = torch.isfinite(total).reshape(1)
        else:
            total, columns, grads_finite = None, [], torch.ones_like(loss, dtype=torch.bool)
        if scaled:
            # A non-finite gradient under fp16 is the scaler's search for a scale: it skips that update
            # and lowers the scale itself. Only a non-finite loss is a real divergence.
            nonfinite = (~torch.isfinite(loss)).float()
            extra = [scale.float().reshape(1), (~grads_finite).float()]  # the scale used; skipped?
        else:
            nonfinite = (~(torch.isfinite(loss) & grads_finite)).float()
            extra = []
        skip = nonfinite.squeeze() if skip_nonfinite and not scaled else None
        if spike_rule is not None:
            z_max, min_history, loss_votes, skip_spikes = spike_rule
            grad_norm = total if total is not None else torch.zeros((), device=loss.device)
            values = torch.stack([loss[0], grad_norm.reshape(())])
            spike_columns, spike = _spike_columns(values, *spike_state, z_max, min_history, loss_votes)
            extra = [*extra, spike_columns]
            if skip_spikes and not scaled:
                skip = spike.float() if skip is None else torch.maximum(skip, spike.float())
        coef = (max_norm / (total + CLIP_EPS)).clamp(max=1.0) if max_norm > 0 and total is not None else None
        if tail is not None:
            extra = [*extra, tail.detach().float().flatten()]
        return torch.cat([loss, *columns, nonfinite, *extra]), skip, coef

    return torch.compile(row, fullgraph=True, dynamic=False) if compile else row


def get_grad_norm(model: torch.nn.Module) -> torch.Tensor:
    """The global L2 norm of `model`'s gradients, as a 0-dim float32 tensor on the device of its
    first parameter. Reduced there with the same fused pass the training loop logs (GradNorms), and
    never read: no host sync (read it at a sync point of your own, or log it through a buffer).
    Parameters without a gradient count as zero."""
    params = list(model.parameters())
    device = params[0].device
    norms = [n.to(device, torch.float32) for n in _norms_in_bucket_order(params, _buckets(params))]
    return torch.stack(norms).square().sum().sqrt()


def _buckets(params: list[torch.Tensor]) -> list[list[int]]:
    """Indices of `params` grouped by (device, dtype), in first-seen order: one fused pass each."""
    buckets: dict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
    for i, p in enumerate(params):
        buckets[(p.device, p.dtype)].append(i)
    return list(buckets.values())


def _norms_in_bucket_order(params: list[torch.Tensor], buckets: list[list[int]]) -> list[torch.Tensor]:
    """Every parameter's gradient norm (0-dim, on its device, in its dtype), bucket by bucket."""
    norms: list[torch.Tensor] = []
    for bucket in buckets:
        grads = [params[i].grad if params[i].grad is not None else torch.zeros((), device=params[i].device)
                 for i in bucket]
        norms.extend(torch._foreach_norm(grads))  # one fused pass per (device, dtype)
    return norms
