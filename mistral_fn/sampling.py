"""Next-token choice from float32 logits `[B, V]`: greedy, temperature, top-k, top-p (nucleus) and a
repetition penalty, in transformers' order (penalty, temperature, top-k, top-p). Randomness comes only
from the `torch.Generator` passed in. Filters return new logits with excluded tokens at -inf.
"""

from __future__ import annotations

import torch

from mistral_fn.errors import InputError


def check_options(temperature: float, top_k: int | None, top_p: float | None, repetition_penalty: float) -> None:
    """Raise `InputError` on a sampling option outside its domain."""
    if not temperature >= 0:
        raise InputError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise InputError(f"top_k must be a positive integer or None, got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise InputError(f"top_p must be in (0, 1] or None, got {top_p}")
    if not repetition_penalty > 0:
        raise InputError(f"repetition_penalty must be > 0, got {repetition_penalty}")


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty on tokens already in the sequence (`seen` bool `[B, V]`): positive logits are
    divided by `penalty`, negative ones multiplied (so `penalty > 1` always lowers them)."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the `k` largest logits of each row (ties at the k-th value are kept too)."""
    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches `p` (at least one)."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    drop_sorted = mass_before >= p
    drop_sorted[..., 0] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample(logits: torch.Tensor, *, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
           repetition_penalty: float = 1.0, seen: torch.Tensor | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Token ids `[B]` from logits `[B, V]`: argmax at `temperature == 0`, otherwise a draw from the
    tempered, filtered softmax using `generator` (same generator state, same tokens)."""
    if seen is not None and repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, seen, repetition_penalty)
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None and top_p < 1:
        logits = top_p_filter(logits, top_p)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)[:, 0]
