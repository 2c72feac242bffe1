"""Vocab-parallel cross-entropy and argmax over logits split by vocab across TP ranks (Megatron's
`_VocabParallelCrossEntropy`): each rank holds `logits [B, T, V_local]` for ids
`[rank*V_local, (rank+1)*V_local)`, padded ids already -inf. Only `[B, T]` statistics are all-reduced;
the full logits are never gathered.
"""

from __future__ import annotations

import torch

from mistral_fn.parallel import TensorParallel

IGNORE_INDEX = -100  # a label that takes no loss (Megatron's and HF's -100); `loss` and `data` import it from here


def vocab_parallel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    """Per-token cross-entropy `[B, T]` (float32) from local float32 logits; labels == IGNORE_INDEX give 0.

    Differentiable in `logits` (also under `torch.func.grad`); the result is the same on every rank.
    """
    return _VocabParallelCE.apply(logits, labels, tp)[0]


def vocab_parallel_argmax(logits: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    """Global token ids `[...]` of the largest logit over the whole vocab (the first on ties, like `argmax`)."""
    local_max, local_idx = logits.max(dim=-1)
    global_max = tp.all_reduce(local_max, "max")
    ids = local_idx + tp.rank * logits.shape[-1]
    # the smallest id that holds the global max, as a max over negated ids (the interface has sum/max)
    candidate = torch.where(local_max == global_max, -ids, torch.full_like(ids, torch.iinfo(ids.dtype).min))
    return -tp.all_reduce(candidate, "max")


def _local_targets(labels: torch.Tensor, tp: TensorParallel, width: int):
    """Index into the local slice of each label, and whether this rank holds it."""
    local = labels - tp.rank * width
    mine = (local >= 0) & (local < width)
    return local.masked_fill(~mine, 0), mine


class _VocabParallelCE(torch.autograd.Function):
    """Returns (losses `[B, T]`, softmax `[B, T, V_local]`); the softmax is saved for backward only."""

    @staticmethod
    def forward(logits, labels, tp):
        shifted = logits - tp.all_reduce(logits.max(dim=-1).values, "max")[..., None]
        index, mine = _local_targets(labels, tp, logits.shape[-1])
        target = shifted.gather(-1, index[..., None]).squeeze(-1).masked_fill(~mine, 0.0)
        exp = shifted.exp()
        target, sum_exp = tp.all_reduce(torch.stack([target, exp.sum(dim=-1)]))
        losses = (sum_exp.log() - target).masked_fill(labels == IGNORE_INDEX, 0.0)
        return losses, exp / sum_exp[..., None]

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, labels, tp = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(output[1], labels)
        ctx.tp = tp

    @staticmethod
    def backward(ctx, grad_losses, _):
        softmax, labels = ctx.saved_tensors
        index, mine = _local_targets(labels, ctx.tp, softmax.shape[-1])
        grad = softmax.scatter_add(-1, index[..., None], -mine[..., None].to(softmax.dtype))
        scale = grad_losses.masked_fill(labels == IGNORE_INDEX, 0.0)
        return grad * scale[..., None], None, None
