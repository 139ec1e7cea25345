"""Model probes, every --probe_freq steps: parameter norms, update-to-weight ratios, weight and
gradient histograms computed on the device (any nn.Module), and, for BDH only, neuron statistics on
a fixed probe batch.

Everything is reduced on the device (one foreach pass for norms, the fused `tensor_stats` op for
histograms and sparsity); the host reads the results once per probe. No full tensor goes to the
host. The model is observed from outside: the neuron statistics come from a probe-only forward
under a TorchFunctionMode that sees each layer's two ReLU outputs (x_s, then y_s), so the model
code knows nothing of it and other steps pay nothing.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from bdh_fast.model import BDH, NEURON_STATS
from bdh_fast.ops import STATS_FIELDS, tensor_stats
from bdh_fast.telemetry.backends.base import Histogram

_COUNT, _SUM, _NONZERO = (STATS_FIELDS.index(f) for f in ("count", "sum", "nonzero"))
_RELUS = (F.relu, torch.relu)


class _NeuronStats(TorchFunctionMode):
    """Sees every ReLU of a BDH forward: per layer x_s (B, nh, T, N), then y_s. Keeps only small
    device reductions, never the activations."""

    def __init__(self):
        super().__init__()
        self.pending_x: torch.Tensor | None = None
        self.layers: list[torch.Tensor] = []  # per layer: (8,) on the device, as NEURON_NAMES

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in _RELUS:
            if self.pending_x is None:
                self.pending_x = out
            else:
                self.layers.append(self._layer_stats(self.pending_x, out))
                self.pending_x = None
        return out

    @staticmethod
    def _layer_stats(x_s: torch.Tensor, y_s: torch.Tensor) -> torch.Tensor:
        rows = []
        for t in (x_s, y_s, x_s * y_s):  # xy as the model forms it (dropout is off in eval mode)
            s, _ = tensor_stats(t.detach(), 1)
            nonzero_frac = s[_NONZERO] / s[_COUNT]
            mean_active = s[_SUM] / s[_NONZERO].clamp(min=1)
            rows += [nonzero_frac, mean_active]
        for t in (x_s, y_s):  # a neuron (head, index) never active anywhere on the batch
            ever = (t.detach() > 0).any(dim=2).any(dim=0)  # (nh, N)
            rows.append(1.0 - ever.double().mean())
        return torch.stack([r.double() for r in rows])


NEURON_NAMES = [*NEURON_STATS, "dead/x", "dead/y"]  # the training forward's six, then the dead fractions


class Probes:
    """The probes of `model` (the uncompiled module). The neuron statistics attach only to a BDH
    given a probe batch `probe_x`; the norms, ratios and histograms work for any module. With
    `histograms` False (--metrics standard) no weight or gradient histogram is computed or logged."""

    def __init__(self, model: torch.nn.Module, probe_x: torch.Tensor | None, bins: int,
                 autocast: Callable[[], contextlib.AbstractContextManager], histograms: bool = True):
        self.model = model
        self.named = [(n.removesuffix(".weight"), p) for n, p in model.named_parameters()]
        self.params = [p for _, p in self.named]
        self.probe_x = probe_x if isinstance(model, BDH) else None  # (B, T) fixed probe batch
        self.bins = bins
        self.histograms = histograms
        self.autocast = autocast
        self.grad_stats: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.weights_before: list[torch.Tensor] | None = None

    def before_update(self) -> None:
        """Call after backward, before clipping and the optimizer step, on probe steps only:
        gradient histograms (device) and a copy of the weights for the update ratio."""
        if self.histograms:
            self.grad_stats = [tensor_stats(p.grad, self.bins) for p in self.params if p.grad is not None]
        self.weights_before = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def collect(self) -> tuple[dict[str, float], dict[str, Histogram]]:
        """All probe values; ONE host read. Call after the optimizer step."""
        weights = [p.detach() for p in self.params]
        values: list[torch.Tensor] = [torch.stack(torch._foreach_norm(weights)).double()]
        if self.weights_before is not None:
            updates = torch._foreach_sub(weights, self.weights_before)
            values.append(torch.stack(torch._foreach_norm(updates)).double() / values[0].clamp(min=1e-30))
        weight_stats = [tensor_stats(w, self.bins) for w in weights] if self.histograms else []
        neuron = self._neuron_stats()
        hists = weight_stats + (self.grad_stats or [])
        values += [torch.cat([s, h.double()]) for s, h in hists] + neuron
        # SYNC POINT (probe): one device->host read of every probe value.
        flat = torch.cat([v.flatten() for v in values]).tolist()
        return self._unpack(flat, bool(self.weights_before), len(neuron))

    def _neuron_stats(self) -> list[torch.Tensor]:
        if self.probe_x is None:
            return []
        mode = _NeuronStats()
        was_training = self.model.training
        self.model.eval()
        try:
            with self.autocast(), mode:
                self.model(self.probe_x)
        finally:
            self.model.train(was_training)
        return mode.layers

    def _unpack(self, flat: list[float], with_updates: bool, n_layers: int):
        names = [n for n, _ in self.named]
        metrics: dict[str, float] = {}
        pos = 0

        def take(n: int) -> list[float]:
            nonlocal pos
            pos += n
            return flat[pos - n:pos]

        metrics.update({f"model/param_norm/{n}": v for n, v in zip(names, take(len(names)))})
        if with_updates:
            metrics.update({f"model/update_ratio/{n}": v for n, v in zip(names, take(len(names)))})
        histograms: dict[str, Histogram] = {}
        kinds = (["weights"] * len(names) if self.histograms else []) + (["grads"] * len(names) if self.grad_stats else [])
        for kind, name in zip(kinds, names * 2):
            chunk = take(len(STATS_FIELDS) + self.bins)
            histograms[f"model/{kind}/{name}"] = Histogram.from_stats(chunk[:len(STATS_FIELDS)],
                                                                      chunk[len(STATS_FIELDS):])
        for layer in range(n_layers):
            for key, value in zip(NEURON_NAMES, take(len(NEURON_NAMES))):
                metrics[f"model/{key}/layer{layer}"] = value
        self.grad_stats, self.weights_before = None, None
        return metrics, histograms
