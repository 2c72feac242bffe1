"""Next-token cross-entropy with a loss mask (Megatron's `sum(loss * mask) / sum(mask)`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mistral_fn.config import MistralConfig
from mistral_fn.errors import InputError
from mistral_fn import kernels, remat, tracing
from mistral_fn.model import forward, hidden_states, output_logits
from mistral_fn.parallel import SINGLE_DEVICE, TensorParallel
from mistral_fn.vocab_parallel import IGNORE_INDEX, vocab_parallel_cross_entropy


def token_losses(logits: torch.Tensor, labels: torch.Tensor, tp: TensorParallel = SINGLE_DEVICE) -> torch.Tensor:
    """Per-token cross-entropy `[B, T]` (float32); labels equal to IGNORE_INDEX (-100) give 0."""
    if tp.size == 1:
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none",
                               ignore_index=IGNORE_INDEX).view(labels.shape)
    return vocab_parallel_cross_entropy(logits, labels, tp)


def check_batch(batch: dict) -> None:
    missing = [k for k in ("tokens", "labels", "loss_mask") if k not in batch]
    if missing:
        raise InputError(f"batch is missing {', '.join(missing)}; expected tokens, labels, loss_mask")
    shapes = {k: tuple(batch[k].shape) for k in ("tokens", "labels", "loss_mask")}
    if len(set(shapes.values())) != 1:
        raise InputError(f"batch tensors must share one [batch, seq] shape, got {shapes}")


def loss_fn(params, batch: dict, config: MistralConfig, *, tp: TensorParallel = SINGLE_DEVICE,
            recompute: bool = False, chunk_size: int | None = None) -> torch.Tensor:
    """Mean next-token loss over unmasked tokens.

    batch: `tokens`, `labels` (already shifted: labels[t] is the token after tokens[t]) and
    `loss_mask`, each `[B, T]`; optional `positions`. Returns a float32 scalar (float64 for float64 params).

    `recompute=True` recomputes each decoder layer in backward (`remat.checkpoint`, Megatron's
    `--recompute-granularity full`). `chunk_size=c` computes the head and cross-entropy over `c`
    positions at a time, recomputed in backward, so float32 logits never exist for more than
    `[B, c, V]` at once. Both change memory, not the math (same value and gradients up to rounding).
    On one device they also compute the head only at the positions whose mask is set
    (`loss_positions`: prompt tokens of instruction data need no logits).
    """
    check_batch(batch)
    if not recompute and chunk_size is None:
        logits = forward(params, batch["tokens"], config, positions=batch.get("positions"), tp=tp)
        losses = token_losses(logits, batch["labels"], tp)
        mask = batch["loss_mask"].to(losses.dtype)
        return (losses * mask).sum() / mask.sum().clamp_min(1.0)
    h = hidden_states(params, batch["tokens"], config, positions=batch.get("positions"), tp=tp, recompute=recompute)
    mask = batch["loss_mask"].to(torch.promote_types(h.dtype, torch.float32))
    total = _masked_loss_sum(params["output"], *loss_positions(h, batch["labels"], mask, tp), config, tp, chunk_size)
    return total / mask.sum().clamp_min(1.0)


def loss_positions(h: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, tp: TensorParallel = SINGLE_DEVICE):
    """`(h, labels, mask)` at the positions whose mask is nonzero, as one row `[1, N, ...]` (the head and loss of
    masked positions add nothing), or unchanged when every position counts, under TP (where the head's
    input is gathered), and where the mask's values cannot be read (`tracing.values_readable`)."""
    if tp.size > 1 or not tracing.values_readable(mask) or bool(mask.all()):
        return h, labels, mask
    keep = mask.flatten().nonzero()[:, 0]
    return h.flatten(0, 1)[keep][None], labels.flatten()[keep][None], mask.flatten()[keep][None]


def _masked_loss_sum(head, h, labels, mask, config, tp, chunk_size: int | None) -> torch.Tensor:
    """`sum(token_losses * mask)` from final hidden states, `chunk_size` positions at a time.

    One device: `_ChunkedHeadLoss` (gradients formed chunk by chunk in forward, nothing recomputed).
    Under TP: each chunk's vocab-parallel head + loss under `remat.checkpoint` (recomputed in backward).
    Without grad mode (evaluation), under torch.compile, and under vmap, forward-mode AD or nested
    gradients (`tracing.only_reverse_mode()` False): plain chunks, recomputed in backward where that applies.
    Under SP, `h` is this rank's slice of the sequence: a chunk takes `chunk_size / tp` positions of every
    rank's slice (gathered by the head), and the labels and mask of those same positions. Sums are in
    `mask.dtype` (float32, or float64 for float64 params).
    """

    def piece(w, hc, lc, mc):
        return (token_losses(output_logits({"output": w}, hc, config, tp), lc, tp) * mc).sum()

    if chunk_size is None:
        return piece(head, h, labels, mask)
    if chunk_size <= 0:
        raise InputError(f"loss chunk_size must be a positive integer, got {chunk_size}")
    if tp.size == 1 and torch.is_grad_enabled() and tracing.only_reverse_mode() and not torch.compiler.is_compiling():
        return _ChunkedHeadLoss.apply(head, h, labels, mask, chunk_size, config.vocab_size)[0]
    piece = remat.checkpoint(piece) if torch.is_grad_enabled() else piece
    step = max(chunk_size // tp.size, 1) if tp.sequence_parallel else chunk_size
    total = h.new_zeros((), dtype=mask.dtype)
    for s in range(0, h.shape[1], step):
        ls, ms = (_gathered_chunk(x, s, step, tp) for x in (labels, mask))
        total = total + piece(head, h[:, s:s + step], ls, ms)
    return total


def _gathered_chunk(x: torch.Tensor, start: int, length: int, tp: TensorParallel) -> torch.Tensor:
    """The columns of `x` `[B, T]` that match the head input `h[:, start:start + length]` once `tp.copy_to`
    has gathered it: the same slice of the sequence, or under SP that slice of every rank's part in rank order."""
    if not tp.sequence_parallel:
        return x[:, start:start + length]
    n = x.shape[1] // tp.size
    return torch.cat([x[:, r * n + start:r * n + min(start + length, n)] for r in range(tp.size)], dim=1)


HEAD_GRAD_ROWS = 4096  # vocab rows of the head's gradient formed per matmul (a [4096, D] temporary, not [V, D])


class _ChunkedHeadLoss(torch.autograd.Function):
    """`sum(mask * CE(h @ w.T, labels))` over `chunk`-position slices, with float32 logits for one slice
    at a time. Its gradients (softmax - onehot, times the mask) are contracted with `w` and `h` while the
    slice's logits exist, so backward only scales them: the head matmul is never recomputed.

    Outputs `(total, grad_w, grad_h)`; the last two are carried to backward (non-differentiable), which
    scales them in place, so it may run once (no `retain_graph`, no double backward).
    Labels equal to -100 count as masked. Rows of `w` past `vocab` (padding) get logit -inf.
    """

    @staticmethod
    def forward(w, h, labels, mask, chunk, vocab):
        total = torch.zeros((), dtype=mask.dtype, device=h.device)
        grad_w = torch.zeros_like(w, dtype=mask.dtype)
        grad_h = torch.empty_like(h)
        for s in range(0, h.shape[1], chunk):
            hc, lc = h[:, s:s + chunk], labels[:, s:s + chunk]
            mc = (mask[:, s:s + chunk] * (lc != IGNORE_INDEX)).to(mask.dtype)
            logits = kernels.linear(hc, w).to(mask.dtype)
            if w.shape[0] > vocab:
                logits[..., vocab:] = float("-inf")
            target = lc.clamp_min(0)[..., None]
            # in the logits' buffer (no other [B, c, V] temporary): shift by the max, exponentiate, normalise
            shifted = logits.sub_(logits.amax(-1, keepdim=True))
            picked = shifted.gather(-1, target)[..., 0]
            sums = shifted.exp_().sum(-1)
            total += ((sums.log() - picked) * mc).sum()  # logsumexp - target logit
            dlogits = logits.div_(sums[..., None])  # softmax
            dlogits.scatter_add_(-1, target, -torch.ones_like(target, dtype=dlogits.dtype))
            dlogits = dlogits.mul_(mc[..., None]).to(w.dtype)
            grad_h[:, s:s + chunk] = kernels.linear(dlogits, w.T)
            rows, inputs = dlogits.flatten(0, 1), hc.flatten(0, 1).T
            for v in range(0, w.shape[0], HEAD_GRAD_ROWS):  # bf16/fp16: accumulated in float32
                grad_w[v:v + HEAD_GRAD_ROWS] += kernels.linear(rows[:, v:v + HEAD_GRAD_ROWS].T, inputs)
        return total, grad_w, grad_h

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, grad_w, grad_h = output
        ctx.mark_non_differentiable(grad_w, grad_h)
        ctx.save_for_backward(grad_w, grad_h)
        ctx.w_dtype = inputs[0].dtype

    @staticmethod
    def backward(ctx, grad_total, _grad_w, _grad_h):
        grad_w, grad_h = ctx.saved_tensors  # scaled in place: this backward runs once
        if tracing.is_batched(grad_total):  # jacrev: one cotangent per lane, so no in-place scaling
            grad_w, grad_h = grad_w * grad_total, grad_h * grad_total.to(grad_h.dtype)
        else:
            grad_w, grad_h = grad_w.mul_(grad_total), grad_h.mul_(grad_total.to(grad_h.dtype))
        return grad_w.to(ctx.w_dtype), grad_h, None, None, None, None
