"""Validation metrics and text samples: public functions, and what the training CLI itself runs.

    from bdh_fast.evaluate import evaluate, generate_samples

    val_batches = [get_batch("val") for _ in range(10)]   # draw once: every evaluation compares
    metrics = evaluate(model, val_batches)                 # {"loss", "perplexity", "accuracy"}
    texts = generate_samples(model, ["To be or "], max_tokens=100)

`evaluate` runs the model in eval mode under no_grad. Loss and correct-token counts accumulate on
the device; the host reads them once per call. The CLI passes FIXED batches, drawn once from their
own seed, so curves compare across evaluations and across runs. `generate_samples` draws from its
own generator, so neither function moves the training RNG streams.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Protocol, Sequence

import torch
import torch.nn.functional as F

from bdh_fast.data import decode, encode

Batch = tuple[torch.Tensor, torch.Tensor]  # (x, y), each (B, T)


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


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
def evaluate(model: torch.nn.Module, data: Sequence[Batch] | Callable[[], Batch], eval_iters: int | None = None, *,
             autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
             reduce: Callable[[torch.Tensor], object] | None = None) -> dict[str, float]:
    """Mean cross-entropy, perplexity and top-1 accuracy of `model` over `eval_iters` batches.

    model: called as model(x, y), returning (logits, loss) as BDH does, or logits (B, T, V) alone
    (the loss is then their mean cross-entropy); a torch.compile'd or DDP-wrapped module works, and
    its graph is reused. data: the batches (all of them when eval_iters is None), or a function
    returning one batch, called eval_iters times. autocast: a factory for the training autocast
    context. reduce: an in-place sum over data-parallel ranks, when each rank evaluated its share.
    """
    if callable(data) and eval_iters is None:
        raise ValueError("evaluate: pass eval_iters, the number of batches to draw from the data function")
    batches = [data() for _ in range(eval_iters)] if callable(data) else list(data)[:eval_iters]
    device = next(model.parameters()).device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.float64, device=device)
    with eval_mode(model):
        for x, y in batches:
            with autocast():
                out = model(x, y)
            logits, loss = out if isinstance(out, tuple) else (out, None)  # (B, T, V), ()
            if loss is None:
                loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
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
def generate_samples(model: torch.nn.Module, prompts: Sequence[str], tokenizer: Tokenizer | None = None,
                     max_tokens: int = 100, *, temperature: float = 1.0, top_k: int | None = None, seed: int = 0,
                     autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> list[str]:
    """One continuation of `max_tokens` tokens per prompt (the prompt itself not included).

    model: the uncompiled module, with BDH's `generate(idx, max_new_tokens, temperature=, top_k=,
    generator=)`. tokenizer: `encode(text) -> ids` and `decode(ids) -> text`; by default bytes, decoded
    with errors="backslashreplace". Sampling draws from its own generator seeded with `seed`, so
    the same seed gives the same texts and the training RNG streams never move.
    """
    to_ids, to_text = (tokenizer.encode, tokenizer.decode) if tokenizer is not None else (encode, decode)
    ids = sample_ids(model, [to_ids(p) for p in prompts], max_tokens, temperature=temperature, top_k=top_k,
                     seed=seed, autocast=autocast)
    return [to_text(sample[0]) for sample in ids]


def sample_ids(model: torch.nn.Module, prompt_ids: Sequence[Sequence[int]], max_tokens: int, *,
               samples_per_prompt: int = 1, temperature: float = 1.0, top_k: int | None = None, seed: int = 0,
               autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
               ) -> list[list[list[int]]]:
    """`samples_per_prompt` continuations (token ids) of each prompt, drawn one after another from one
    generator seeded with `seed`: [prompt][sample] -> ids."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    out = []
    with eval_mode(model):
        for prompt in prompt_ids:
            idx = torch.tensor([list(prompt)], dtype=torch.long, device=device)  # (1, T0)
            samples = []
            for _ in range(samples_per_prompt):
                with autocast():
                    ids = model.generate(idx, max_tokens, temperature=temperature, top_k=top_k, generator=generator)
                # SYNC POINT (sampling): the generated ids come to the host.
                samples.append(ids[0, idx.size(1):].tolist())
            out.append(samples)
    return out


@torch.no_grad()
def sample_nll(model: torch.nn.Module, prompt: Sequence[int], sample: Sequence[int], *,
               autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> float:
    """The model's mean negative log-likelihood (nats per token) of `sample` following `prompt`: how
    likely the model finds its own text (beside val/loss; very low with a degenerate loop)."""
    device = next(model.parameters()).device
    ids = torch.tensor([[*prompt, *sample]], dtype=torch.long, device=device)  # (1, T0 + S)
    with eval_mode(model), autocast():
        out = model(ids[:, :-1])
    logits = (out[0] if isinstance(out, tuple) else out).float()  # (1, T - 1, V)
    start = len(prompt) - 1  # the first position that predicts a sampled token
    # SYNC POINT (sampling): one number.
    return F.cross_entropy(logits[0, start:], ids[0, start + 1:]).item()
