"""BDH ("Dragon Hatchling") language model, exactly as ../shared/docs/BDH.md states it.

Pure model code: no I/O, no logging, no CLI. Telemetry observes this module from the outside.

Shape names used in the comments:
    B batch, T time, D n_embd, nh n_head, N neurons per head, V vocab_size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

ROPE_THETA = 2.0**16


@dataclass
class BDHConfig:
    n_layer: int = 6  # layer applications; the weights are shared by all of them
    n_embd: int = 256  # D, width of the dense stream
    dropout: float = 0.1  # applied to x_s * y_s only
    n_head: int = 4  # nh
    mlp_internal_dim_multiplier: int = 128  # N = m * D / nh neurons per head
    vocab_size: int = 256  # bytes

    def __post_init__(self) -> None:
        for name in ("n_layer", "n_embd", "n_head", "mlp_internal_dim_multiplier", "vocab_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if (self.mlp_internal_dim_multiplier * self.n_embd) % self.n_head:
            raise ValueError("mlp_internal_dim_multiplier * n_embd must be divisible by n_head")
        if self.neurons_per_head % 2:
            raise ValueError("neurons per head must be even (RoPE rotates pairs)")

    @property
    def neurons_per_head(self) -> int:  # N
        return self.mlp_internal_dim_multiplier * self.n_embd // self.n_head

    @property
    def n_neurons(self) -> int:  # n = nh * N
        return self.n_head * self.neurons_per_head


def rope_frequencies(n: int) -> torch.Tensor:
    """f_i = theta^(-q_i / n) / (2 pi) with q_i = 2 floor(i / 2), in float32.  # (n,)"""
    q = torch.div(torch.arange(n, dtype=torch.float32), 2, rounding_mode="floor") * 2
    return 1.0 / (ROPE_THETA ** (q / n)) / (2 * math.pi)


def rope(v: torch.Tensor, phases: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (2k, 2k+1) of v's last axis by the angle 2 pi frac(phases).

    v: (..., T, N); phases: (T, N) float32, in turns. Products are cast back to v's dtype before the
    sum, as in the reference. rotate(v)[2k] = v[2k] cos - v[2k+1] sin and
    rotate(v)[2k+1] = v[2k+1] cos + v[2k] sin, computed as v * cos + swap_pairs(v) * (sign * sin)
    with sign = (-1, +1) per pair: the same IEEE products (negation is exact), but a layout
    inductor turns into one vectorised loop (the strided stack of the reference does not vectorise).
    """
    angle = (phases % 1) * (2 * math.pi)  # (T, N)
    sign = 1.0 - 2.0 * (torch.arange(v.size(-1), device=v.device) % 2 == 0).float()  # (N,) -1, +1, ...
    swapped = v.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (..., T, N): v[2k+1], v[2k], ...
    return (v * torch.cos(angle)).to(v.dtype) + (swapped * (sign * torch.sin(angle))).to(v.dtype)


class LinearAttention(nn.Module):
    """Q = K = rope(x_s), V = x; strictly causal scores, no softmax, no scaling."""

    def __init__(self, config: BDHConfig):
        super().__init__()
        self.register_buffer("freqs", rope_frequencies(config.neurons_per_head), persistent=False)

    def phases(self, t0: int, T: int) -> torch.Tensor:
        positions = torch.arange(t0, t0 + T, device=self.freqs.device, dtype=torch.float32)
        return positions[:, None] * self.freqs  # (T, N)

    def forward(self, x_s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        T = x_s.size(-2)
        qr = rope(x_s, self.phases(0, T))  # (B, nh, T, N)
        scores = (qr @ qr.mT).tril(diagonal=-1)  # (B, nh, T, T)
        return scores @ v  # (B, nh, T, D)


class BDH(nn.Module):
    def __init__(self, config: BDHConfig):
        super().__init__()
        self.config = config
        nh, D, N, V = config.n_head, config.n_embd, config.neurons_per_head, config.vocab_size
        self.embed = nn.Embedding(V, D)
        self.encoder = nn.Parameter(torch.empty(nh, D, N))  # D_x
        self.encoder_v = nn.Parameter(torch.empty(nh, D, N))  # D_y
        self.decoder = nn.Parameter(torch.empty(nh * N, D))  # E
        self.lm_head = nn.Parameter(torch.empty(D, V))
        self.attn = LinearAttention(config)
        self.drop = nn.Dropout(config.dropout)
        for p in self.parameters():
            nn.init.normal_(p, mean=0.0, std=0.02)

    @staticmethod
    def ln(x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:])  # no affine weight, no bias

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        B, T = idx.shape
        nh, N, D = self.config.n_head, self.config.neurons_per_head, self.config.n_embd
        x = self.ln(self.embed(idx)).unsqueeze(1)  # (B, 1, T, D)
        for _ in range(self.config.n_layer):
            x_s = F.relu(x @ self.encoder)  # (B, nh, T, N)
            a = self.ln(self.attn(x_s, x))  # (B, nh, T, D)
            y_s = F.relu(a @ self.encoder_v)  # (B, nh, T, N)
            xy = self.drop(x_s * y_s)  # (B, nh, T, N)
            m = xy.transpose(1, 2).reshape(B, 1, T, nh * N) @ self.decoder  # (B, 1, T, D)
            x = self.ln(x + self.ln(m))  # (B, 1, T, D)
        logits = x.view(B, T, D) @ self.lm_head  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        return logits, loss

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Reference generation: re-run the whole prefix for every new token.  idx: (B, T0)."""
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        for _ in range(max_new_tokens):
            logits, _ = self(idx)
            idx_next = sample_next(logits[:, -1, :], temperature, top_k, generator)
            idx = torch.cat((idx, idx_next), dim=1)  # (B, T0 + i + 1)
        return idx


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token per row from last-position logits (B, V) -> (B, 1), as the reference samples."""
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)
