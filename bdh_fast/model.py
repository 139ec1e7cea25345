"""BDH ("Dragon Hatchling") language model, exactly as ../shared/docs/BDH.md states it.

Pure model code: no I/O, no logging, no CLI. Telemetry observes this module from the outside.

Shape names used in the comments:
    B batch, T time, D n_embd, nh n_head, N neurons per head, V vocab_size.

How it is computed (same equations, measured in bench/peer.py against the reference formulation):
- the (B, nh, T, N) neuron tensors are stored head-major, (nh, B*T, N), so that the three weight
  products are plain batched GEMMs over heads (no expanded copies of the weights, no transposed
  copy of x_s * y_s before the decoder); the code hands out (B, nh, T, N) views of them;
- the attention, tril(QR QR^T, -1) V, is one autograd function: the Gram matrix is computed by row
  blocks that skip the masked upper blocks, and its backward uses Q = K (one product with the
  symmetric dS + dS^T instead of two) and rotates x_s again instead of keeping the rotated copy;
- in compiled training, each layer keeps only its matrix-product outputs for the backward pass
  and recomputes the element-wise rest (selective activation checkpointing, SAC). Eager code keeps
  plain autograd: there the recomputation would cost Python dispatch on every op, and eager SAC
  cannot replay a layer under autocast (see _layer_checkpoint_contexts).
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

ROPE_THETA = 2.0**16
ATTENTION_BLOCK = 64  # rows per block of the causal Gram matrix; of 16 to 256, 64 measured fastest on CPU


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


def rope_angles(phases: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sign * sin) of the angles 2 pi frac(phases), sign = (-1, +1) per pair.  # (T, N) each"""
    angle = (phases % 1) * (2 * math.pi)  # (T, N) float32
    sign = (torch.arange(phases.size(-1), device=phases.device) % 2).float() * 2 - 1  # -1, +1, ...
    return torch.cos(angle), sign * torch.sin(angle)


@torch.library.custom_op("bdh_fast::rope_tables", mutates_args=())
def rope_tables(freqs: torch.Tensor, t0: int, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """rope_angles at positions t0 .. t0+T-1.  freqs: (N,) -> two (T, N) float32 tables.

    A custom op so that torch.compile treats it as one opaque call: the tables are then computed
    once per forward and read by every layer, instead of inductor inlining cos/sin into each
    (B, nh, T, N) consumer and recomputing them B * nh times per layer, forward and backward.
    """
    positions = torch.arange(t0, t0 + T, device=freqs.device, dtype=torch.float32)
    return rope_angles(positions[:, None] * freqs)  # phases (T, N), in turns


@rope_tables.register_fake
def _rope_tables_fake(freqs: torch.Tensor, t0: int, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    return freqs.new_empty(T, freqs.size(0)), freqs.new_empty(T, freqs.size(0))


def rotate(v: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """rotate(v)[2k] = v[2k] cos - v[2k+1] sin, rotate(v)[2k+1] = v[2k+1] cos + v[2k] sin.

    v: (..., T, N); cos, sin_signed: (T, N) from rope_angles. Computed as
    v * cos + swap_pairs(v) * (sign * sin): the same IEEE products as the reference's strided
    stack (negation is exact), in a layout inductor turns into one vectorised loop. Products are
    cast back to v's dtype before the sum, as in the reference.
    """
    swapped = v.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (..., T, N): v[2k+1], v[2k], ...
    return (v * cos).to(v.dtype) + (swapped * sin_signed).to(v.dtype)


def rope(v: torch.Tensor, phases: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (2k, 2k+1) of v's last axis by 2 pi frac(phases).
    v: (..., T, N); phases: (T, N) float32, in turns."""
    return rotate(v, *rope_angles(phases))


def _row_blocks(T: int, block: int) -> list[tuple[int, int]]:
    starts = list(range(0, T, block)) + [T]
    return list(zip(starts[:-1], starts[1:]))


class _CausalAttention(torch.autograd.Function):
    """tril(QR QR^T, -1) @ V with QR = rotate(x_s), the reference's formulation computed by row blocks.

    Forward: row block [i0, i1) of the scores is QR[i0:i1] @ QR[:i1]^T, masked strictly below the
    diagonal; the blocks right of i1 are zeros and are never computed (about half the Gram FLOPs at
    T >> block). With T <= block there is one block: exactly the reference's ops.
    Backward, with dS = dout @ V^T masked like the scores: dV = S^T dout, and since Q = K,
    dQR = (dS + dS^T) @ QR (one product where autograd would do two); QR is rotated again from
    x_s rather than kept, and dx_s = rotate^T(dQR) = rotate(dQR, cos, -sin).
    Under autocast the products run in the dtype the forward used (that of S).
    """

    @staticmethod
    def forward(ctx, x_s, v, cos, sin_signed, block: int):
        # x_s (G, B, T, N), v (1 or G, B, T, D) -> (G, B, T, D)
        qr = rotate(x_s, cos, sin_signed)  # (G, B, T, N)
        T = x_s.size(-2)
        rows = []
        for i0, i1 in _row_blocks(T, block):
            s = (qr[..., i0:i1, :] @ qr[..., :i1, :].mT).tril(i0 - 1)  # (G, B, i1 - i0, i1)
            rows.append(F.pad(s, (0, T - i1)) if i1 < T else s)
        scores = torch.cat(rows, dim=-2) if len(rows) > 1 else rows[0]  # (G, B, T, T)
        ctx.save_for_backward(x_s, v, cos, sin_signed, scores)
        return scores @ v.to(scores.dtype)  # (G, B, T, D)

    @staticmethod
    def backward(ctx, dout):
        x_s, v, cos, sin_signed, scores = ctx.saved_tensors
        dout = dout.to(scores.dtype)  # (G, B, T, D)
        v_ = v.to(scores.dtype)
        dscores = (dout @ v_.mT).tril(-1)  # (G, B, T, T)
        dv = (scores.mT @ dout).sum_to_size(v.shape)  # V is shared by the heads
        qr = rotate(x_s, cos, sin_signed).to(scores.dtype)  # (G, B, T, N), recomputed
        dqr = (dscores + dscores.mT) @ qr  # (G, B, T, N)
        dx_s = rotate(dqr, cos, -sin_signed)  # the inverse rotation
        return dx_s.to(x_s.dtype), dv.to(v.dtype), None, None, None


class LinearAttention(nn.Module):
    """Q = K = rope(x_s), V = x; strictly causal scores, no softmax, no scaling."""

    def __init__(self, config: BDHConfig, block: int = ATTENTION_BLOCK):
        super().__init__()
        self.block = block
        self.register_buffer("freqs", rope_frequencies(config.neurons_per_head), persistent=False)

    def tables(self, t0: int, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        return rope_tables(self.freqs, t0, T)  # (T, N) each

    def forward(self, x_s: torch.Tensor, v: torch.Tensor,
                tables: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x_s: (B, nh, T, N), v: (B, 1, T, D) -> (B, nh, T, D). `tables` (positions 0..T-1) may be
        passed in so that all layers share one computation. Computed head-major: a view of the
        model's head-major x_s costs no copy."""
        cos, sin_signed = tables if tables is not None else self.tables(0, x_s.size(-2))
        out = _CausalAttention.apply(x_s.transpose(0, 1), v.transpose(0, 1), cos, sin_signed, self.block)
        return out.transpose(0, 1)  # (B, nh, T, D)


def _save_products(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Selective activation checkpointing: keep what the matrix products return (x D_x, a D_y, the
    Gram blocks, ... ), recompute everything element-wise (ReLU, RoPE, x_s * y_s, LayerNorm)."""
    return CheckpointPolicy.MUST_SAVE if op in _PRODUCTS else CheckpointPolicy.MUST_RECOMPUTE


def _relu_heads(pre: torch.Tensor) -> torch.Tensor:
    """ReLU of a head-major (nh, B, T, N) tensor, returned as a (B, nh, T, N) view.

    Eager, the ReLU runs on the (B, nh, T, N) view: what observers of F.relu (the neuron probes)
    and the reference see. Compiled, it runs on the head-major tensor itself: inductor lays out an
    element-wise result in its logical order, and a (B, nh, T, N) result would be copied back to
    head-major before every product that reads it, forward and backward. Same values either way.
    """
    if torch.compiler.is_compiling():
        return F.relu(pre).transpose(0, 1)
    return F.relu(pre.transpose(0, 1))


# The optional statistics channel of BDH.forward (neuron_stats=True): per layer application, in this order.
NEURON_STATS = ("sparsity/x", "active_mean/x", "sparsity/y", "active_mean/y", "sparsity/xy", "active_mean/xy")


def neuron_statistics(x_s: torch.Tensor, y_s: torch.Tensor, xy: torch.Tensor) -> torch.Tensor:
    """NEURON_STATS of one layer application, (6,) float32, without gradient: for each of x_s, y_s
    and x_s * y_s, the fraction of its entries that are non-zero ("sparsity", as BDH's paper
    reports it) and the mean of those non-zero entries. Two reductions per tensor; compiled, inductor
    fuses them with the element-wise ops that produce the tensor."""
    out = []
    for t in (x_s, y_s, xy):
        t = t.detach()
        nonzero = (t != 0).sum().float()  # counted in int64: exact at any size
        out += [nonzero / t.numel(), t.sum(dtype=torch.float32) / nonzero.clamp(min=1)]
    return torch.stack(out)


_PRODUCTS = {torch.ops.aten.mm.default, torch.ops.aten.bmm.default, torch.ops.aten.addmm.default}


def _layer_checkpoint_contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """context_fn of a layer's checkpoint: SAC with _save_products where torch.compile traces the
    layer, plain checkpointing (the whole layer recomputed) where it runs eagerly.

    Eager SAC replays the layer op by op and needs every op of the forward again, in the same
    order. Autocast breaks that: it casts each weight once per autocast region and caches the cast,
    so the forward of layer 2.. finds the cast weights of layer 1 while the replay (a fresh autocast
    region) casts them again, and SAC stops with "aten._to_copy ... not found in storage". Traced,
    the casts are graph nodes like any other, and the partitioner places them. forward() only
    checkpoints while compiling; an eager run can still reach the checkpoint when dynamo falls back
    to running the layer itself (a graph break), and then gets the plain kind.
    """
    if torch.compiler.is_compiling():
        return create_selective_checkpoint_contexts(_save_products)
    return contextlib.nullcontext(), contextlib.nullcontext()


class _NoInplaceNotice(logging.Filter):
    """Drops torch's one notice that a checkpoint with a context_fn was compiled ("make sure the
    region has no in-place ops"): the layer has none (the compiled-gradient tests check it), and a
    user of `python -m bdh_fast.train` should not read it at every start. Nothing else is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "context_fn is passed to torch.utils.checkpoint" not in record.getMessage()


logging.getLogger("torch._higher_order_ops.wrap").addFilter(_NoInplaceNotice())


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

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *, neuron_stats: bool = False):
        """idx, targets (B, T) -> (logits (B, T, V), loss or None).

        neuron_stats=True: the optional statistics channel. Returns (logits, loss, stats) with
        stats (n_layer, 6) float32, detached: per layer application the NEURON_STATS of this
        forward's x_s, y_s and x_s * y_s (before dropout). The same values and gradients otherwise;
        off (the default), nothing of it is computed. Compiled, it is part of the one graph.
        """
        B, T = idx.shape
        x = self.ln(self.embed(idx))  # (B, T, D)
        tables = self.attn.tables(0, T)  # RoPE cos / sin, (T, N) each, shared by all layers
        stats = []
        for _ in range(self.config.n_layer):
            if torch.is_grad_enabled() and torch.compiler.is_compiling():
                # compiled training: keep the products, recompute the rest in the backward
                out = checkpoint(self._layer, x, tables, neuron_stats, use_reentrant=False,
                                 context_fn=_layer_checkpoint_contexts)
            else:
                out = self._layer(x, tables, neuron_stats)
            if neuron_stats:
                x, layer_stats = out
                stats.append(layer_stats)
            else:
                x = out  # (B, T, D)
        logits = x @ self.lm_head  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        if neuron_stats:
            return logits, loss, torch.stack(stats)  # (L, 6)
        return logits, loss

    def _layer(self, x: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor], neuron_stats: bool = False):
        """One layer application: x (B, T, D) -> the next x (B, T, D) (and its (6,) statistics)."""
        x_s = self._encode(x)  # (B, nh, T, N)
        a = self.attn(x_s, x.unsqueeze(1), tables)  # (B, nh, T, D)
        return self._mix(x, x_s, a, neuron_stats)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        """x_s = relu(x @ D_x): x (B, T, D) -> (B, nh, T, N), a view of a head-major tensor."""
        B, T, D = x.shape
        nh, N = self.config.n_head, self.config.neurons_per_head
        h = torch.bmm(x.reshape(1, B * T, D).expand(nh, B * T, D), self.encoder)  # (nh, B*T, N)
        return _relu_heads(h.view(nh, B, T, N))  # (B, nh, T, N)

    def _mix(self, x: torch.Tensor, x_s: torch.Tensor, a: torch.Tensor, neuron_stats: bool = False):
        """The layer after its attention: x (B, T, D), x_s (B, nh, T, N), a (B, nh, T, D) -> the
        next layer's x (B, T, D), and with neuron_stats its (6,) statistics. Shared by forward,
        prefill and decode_step."""
        B, T, D = x.shape
        nh, N = self.config.n_head, self.config.neurons_per_head
        a = self.ln(a.transpose(0, 1)).reshape(nh, B * T, D)  # (nh, B*T, D)
        y_s = _relu_heads(torch.bmm(a, self.encoder_v).view(nh, B, T, N))  # (B, nh, T, N)
        xy = x_s.transpose(0, 1) * y_s.transpose(0, 1)  # (nh, B, T, N)
        stats = neuron_statistics(x_s, y_s, xy) if neuron_stats else None
        if self.training and self.drop.p > 0:
            if torch.compiler.is_compiling():  # inductor draws its own mask: any layout will do
                xy = self.drop(xy)
            else:  # eager: the mask in (B, nh, T, N) order, as on the reference's contiguous tensor
                xy = self.drop(xy.transpose(0, 1).contiguous()).transpose(0, 1)
        xy = xy.reshape(nh, B * T, N)
        # concat_heads(xy) @ E as a sum over heads of xy_h @ E_h (rows of E are head-major)
        m = torch.bmm(xy, self.decoder.view(nh, N, D)).sum(0)  # (B*T, D)
        x = self.ln(x + self.ln(m.view(B, T, D)))  # (B, T, D)
        return x if stats is None else (x, stats)

    # ---------------------------------------------------------------------------------------------
    # Incremental decoding. The linear attention has an exact recurrent form (BDH.md, Generation):
    #     a_t = sum_{s<t} (qr_t . qr_s) x_s = qr_t^T S_t,   S_t = sum_{s<t} qr_s (outer) x_s
    # one state S of shape (N, D) per layer application and head (the weights are shared, the
    # inputs are not). prefill() runs forward's layers (tests check it against forward bit for
    # bit) and decode_step() shares _encode and _mix with them (checked against forward).
    # ---------------------------------------------------------------------------------------------

    def state_dtype(self) -> torch.dtype:
        """float32, or float64 for a float64 model. The state is a running sum over every past
        position, so it is accumulated in float32 even under autocast or for a bf16 model."""
        return torch.promote_types(self.lm_head.dtype, torch.float32)

    def _state_of(self, x_s: torch.Tensor, x: torch.Tensor,
                  tables: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """S = rotate(x_s)^T @ x summed over all T positions: x_s (B, nh, T, N), x (B, T, D)
        -> (B, nh, N, D) in state_dtype()."""
        dtype = self.state_dtype()
        qr = rotate(x_s, *tables)  # (B, nh, T, N)
        with torch.autocast(x.device.type, enabled=False):
            return qr.to(dtype).mT @ x.to(dtype).unsqueeze(1)  # (B, nh, N, T) @ (B, 1, T, D) -> (B, nh, N, D)

    @torch.no_grad()
    def prefill(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Full forward over a prompt idx (B, T) that also returns the attention state.

        Returns (logits of the last position (B, V), state (L, B, nh, N, D)), with
        state[l] = sum over t < T of rotate(x_s)_t (outer) x_t of layer application l, in
        state_dtype() (float32 under autocast too: the outer products are formed and summed with
        autocast off). The logits equal forward(idx)[0][:, -1] bit for bit. The state holds
        L * B * nh * N * D floats: 200 MB per sequence at the reference size in float32.
        """
        B, T = idx.shape
        x = self.ln(self.embed(idx))  # (B, T, D)
        tables = self.attn.tables(0, T)  # (T, N) each, shared by all layers
        states = []
        for _ in range(self.config.n_layer):
            x_s = self._encode(x)  # (B, nh, T, N)
            a = self.attn(x_s, x.unsqueeze(1), tables)  # (B, nh, T, D), the same call as forward
            states.append(self._state_of(x_s, x, tables))  # (B, nh, N, D)
            x = self._mix(x, x_s, a)  # (B, T, D)
        logits = x @ self.lm_head  # (B, T, V): forward's shapes, so its exact bits
        return logits[:, -1], torch.stack(states)  # (B, V), (L, B, nh, N, D)

    @torch.no_grad()
    def decode_step(self, idx_next: torch.Tensor, state: torch.Tensor,
                    position: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One token per row, idx_next (B, 1), at absolute position `position` (= tokens already
        summed into `state`, from prefill or earlier steps) -> (logits (B, V), state).

        Each layer reads its S (positions < `position`: attention is strictly causal), then adds
        this token's rotate(x_s) (outer) x. `state` (L, B, nh, N, D) is updated IN PLACE and
        returned (no copy of a 200 MB state per token); clone it first to branch. The attention
        read and the update run in state_dtype() with autocast off.
        """
        B, T = idx_next.shape
        if T != 1:
            raise ValueError(f"decode_step takes one token per row, got idx_next of shape {tuple(idx_next.shape)}")
        if position < 0:
            raise ValueError(f"position must be >= 0, got {position}")
        x = self.ln(self.embed(idx_next))  # (B, 1, D)
        cos, sin_signed = self.attn.tables(position, 1)  # (1, N) each
        for S in state:  # S: (B, nh, N, D), one per layer application
            x_s = self._encode(x)  # (B, nh, 1, N)
            qr = rotate(x_s, cos, sin_signed).to(S.dtype)  # (B, nh, 1, N)
            x_state = x.to(S.dtype).unsqueeze(1)  # (B, 1, 1, D)
            with torch.autocast(x.device.type, enabled=False):
                a = qr @ S  # (B, nh, 1, N) @ (B, nh, N, D) -> (B, nh, 1, D)
                S.addcmul_(qr.mT, x_state)  # += (B, nh, N, 1) * (B, 1, 1, D)
            x = self._mix(x, x_s, a.to(x.dtype))  # (B, 1, D)
        logits = x.view(B, -1) @ self.lm_head  # (B, V)
        return logits, state

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
    ) -> torch.Tensor:
        """Sample max_new_tokens bytes after idx (B, T0) -> (B, T0 + max_new_tokens).

        use_cache=True: prefill the prompt once, then one decode_step per token (O(1) work per
        token in the prefix length). It keeps an attention state of L * B * nh * N * D floats in
        float32 (200 MB per sequence at the reference size), also under autocast, where it is
        therefore slightly more accurate than the full forward's bf16 attention.
        use_cache=False: the reference path, re-running the whole prefix for every token.

        Both paths sample the same way (sample_next, one call per token), so with a seeded
        `generator` they draw the same tokens up to float rounding of the logits. Both honour the
        module's mode: call eval() first. In training mode both apply dropout, but they cannot
        agree: the reference redraws the masks of the whole prefix for every token, the cached path
        keeps the prefix's masks fixed in its state.
        """
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not use_cache:
            for _ in range(max_new_tokens):
                logits, _ = self(idx)
                idx_next = sample_next(logits[:, -1, :], temperature, top_k, generator)
                idx = torch.cat((idx, idx_next), dim=1)  # (B, T0 + i + 1)
            return idx
        if max_new_tokens <= 0:
            return idx
        logits, state = self.prefill(idx)  # (B, V), (L, B, nh, N, D)
        tokens = [idx]
        position = idx.size(1)  # absolute position of the next token
        for i in range(max_new_tokens):
            idx_next = sample_next(logits, temperature, top_k, generator)  # (B, 1)
            tokens.append(idx_next)
            if i + 1 < max_new_tokens:  # the last token's logits are never needed
                logits, state = self.decode_step(idx_next, state, position)
                position += 1
        return torch.cat(tokens, dim=1)  # (B, T0 + max_new_tokens)


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
