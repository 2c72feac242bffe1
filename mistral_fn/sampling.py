"""Next-token choice from float32 logits `[B, V]`: greedy, temperature, top-k, top-p (nucleus) and a
repetition penalty, in transformers' order (penalty, temperature, top-k, top-p). Randomness comes only
from the `torch.Generator` passed in. Filters return new logits with excluded tokens at -inf.

Logits whose row maximum is not finite (a NaN or +inf anywhere, or every token at -inf) are refused
with an `InputError` (`check_logits`): they come from non-finite weights or an overflowing compute
dtype, and would otherwise turn into token 0. Options outside their domain are refused too
(`check_options`); every finite temperature > 0 is applied exactly (`apply_temperature`).
"""

from __future__ import annotations

import math

import torch

from mistral_fn.errors import InputError


def check_options(temperature: float, top_k: int | None, top_p: float | None, repetition_penalty: float) -> None:
    """Raise `InputError` on a sampling option outside its domain."""
    if not (temperature >= 0 and math.isfinite(temperature)):
        raise InputError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
        raise InputError(f"top_k must be a positive integer or None, got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise InputError(f"top_p must be in (0, 1] or None, got {top_p}")
    if not (repetition_penalty > 0 and math.isfinite(repetition_penalty)):
        raise InputError(f"repetition_penalty must be a finite number > 0, got {repetition_penalty}")


MODEL_FAULT = ("the model's weights are not finite (a diverged checkpoint?) or its compute dtype overflowed "
               "(try float32)")


def check_logits(logits: torch.Tensor, cause: str = MODEL_FAULT) -> None:
    """Raise `InputError` unless every row of `logits` `[B, V]` has a finite maximum (no NaN, no +inf,
    not all -inf; -inf entries are excluded tokens and fine). One reduction, one host sync."""
    top = logits.amax(dim=-1)
    bad = ~torch.isfinite(top)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        value = float(top[row])
        kind = "NaN" if math.isnan(value) else "+inf" if value > 0 else "-inf for every token"
        raise InputError(f"logits row {row} of {len(top)} is not finite ({kind}): {cause}")


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """`logits / temperature`, shifted so each row's maximum is 0 (the softmax is unchanged).

    Exact for every finite temperature > 0, also where a plain division is not: a temperature that
    under- or overflows float32 (1e-50, 1e300) still maps the maximum to 0, lower logits to -inf
    (towards 0 for a huge temperature), and keeps -inf at -inf, never NaN.
    """
    shifted = logits - logits.amax(dim=-1, keepdim=True)
    return torch.where((shifted == 0) | (shifted == float("-inf")), shifted, shifted / temperature)


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
    tempered, filtered softmax using `generator` (same generator state, same tokens). Non-finite
    logits raise `InputError` (see `check_logits`)."""
    check_options(temperature, top_k, top_p, repetition_penalty)
    check_logits(logits)
    if seen is not None and repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, seen, repetition_penalty)
        check_logits(logits, f"repetition_penalty={repetition_penalty} overflows float32; use a larger one")
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = apply_temperature(logits, temperature)
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None and top_p < 1:
        logits = top_p_filter(logits, top_p)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)[:, 0]
