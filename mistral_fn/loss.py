"""Next-token cross-entropy with a loss mask (Megatron's `sum(loss * mask) / sum(mask)`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mistral_fn.config import MistralConfig
from mistral_fn.errors import InputError
from mistral_fn.model import forward
from mistral_fn.parallel import SINGLE_DEVICE, TensorParallel

IGNORE_INDEX = -100


def token_losses(logits: torch.Tensor, labels: torch.Tensor, tp: TensorParallel = SINGLE_DEVICE) -> torch.Tensor:
    """Per-token cross-entropy `[B, T]` (float32); labels equal to -100 give 0."""
    if tp.size == 1:
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none",
                               ignore_index=IGNORE_INDEX).view(labels.shape)
    from mistral_fn.vocab_parallel import vocab_parallel_cross_entropy
    return vocab_parallel_cross_entropy(logits, labels, tp)


def check_batch(batch: dict) -> None:
    missing = [k for k in ("tokens", "labels", "loss_mask") if k not in batch]
    if missing:
        raise InputError(f"batch is missing {', '.join(missing)}; expected tokens, labels, loss_mask")
    shapes = {k: tuple(batch[k].shape) for k in ("tokens", "labels", "loss_mask")}
    if len(set(shapes.values())) != 1:
        raise InputError(f"batch tensors must share one [batch, seq] shape, got {shapes}")


def loss_fn(params, batch: dict, config: MistralConfig, *, tp: TensorParallel = SINGLE_DEVICE) -> torch.Tensor:
    """Mean next-token loss over unmasked tokens.

    batch: `tokens`, `labels` (already shifted: labels[t] is the token after tokens[t]) and
    `loss_mask`, each `[B, T]`; optional `positions`. Returns a float32 scalar.
    """
    check_batch(batch)
    logits = forward(params, batch["tokens"], config, positions=batch.get("positions"), tp=tp)
    losses = token_losses(logits, batch["labels"], tp)
    mask = batch["loss_mask"].to(losses.dtype)
    return (losses * mask).sum() / mask.sum().clamp_min(1.0)
