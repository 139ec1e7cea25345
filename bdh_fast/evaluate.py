"""Validation metrics and text samples.

`evaluate` runs the (compiled) training model in eval mode under no_grad and the training autocast
over FIXED batches — the same batches at every evaluation, drawn once from their own seed — so
curves compare across evaluations and across runs. Loss and correct-token counts accumulate on the
device; the host reads them once per evaluation.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Sequence

import torch

from bdh_fast.data import decode, encode

Batches = Sequence[tuple[torch.Tensor, torch.Tensor]]


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module):
    """module.eval() for the block, then back to its previous mode."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


@torch.no_grad()
def evaluate(model: Callable, module: torch.nn.Module, batches: Batches,
             autocast: Callable[[], contextlib.AbstractContextManager],
             reduce: Callable[[torch.Tensor], object] | None = None) -> dict[str, float]:
    """Mean cross-entropy, perplexity and top-1 accuracy over `batches`.

    model: what to call (the compiled module, so its graph is reused); module: the nn.Module whose
    train/eval mode is switched; autocast: a factory for the training autocast context; reduce: an
    in-place sum over data-parallel ranks when each rank evaluates its share of the batches.
    """
    device = next(module.parameters()).device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.float64, device=device)
    with eval_mode(module):
        for x, y in batches:
            with autocast():
                logits, loss = model(x, y)
            loss_sum += loss.double()
            correct += (logits.argmax(dim=-1) == y).sum()
    tokens = sum(y.numel() for _, y in batches)
    totals = torch.stack([loss_sum, correct, torch.tensor(float(len(batches)), dtype=torch.float64, device=device),
                          torch.tensor(float(tokens), dtype=torch.float64, device=device)])
    if reduce is not None:
        reduce(totals)
    # SYNC POINT (evaluation): one read of the accumulators.
    loss_total, correct_total, n_batches, n_tokens = totals.tolist()
    loss = loss_total / n_batches  # equal-size batches: the mean over every predicted token
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "accuracy": correct_total / n_tokens}


@torch.no_grad()
def sample(module: torch.nn.Module, prompts: Sequence[str], max_new_tokens: int, *,
           temperature: float, top_k: int | None, seed: int,
           autocast: Callable[[], contextlib.AbstractContextManager]) -> list[str]:
    """One continuation per prompt, decoded with errors="backslashreplace". Sampling draws from its
    own generator seeded with `seed`, so it never moves the training RNG streams."""
    device = next(module.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    out = []
    with eval_mode(module):
        for prompt in prompts:
            idx = torch.tensor([encode(prompt)], dtype=torch.long, device=device)  # (1, T0)
            with autocast():
                ids = module.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k,
                                      generator=generator)
            # SYNC POINT (sampling): the generated ids come to the host to be decoded.
            out.append(decode(ids[0, idx.size(1):].tolist()))
    return out
