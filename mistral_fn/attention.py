"""Grouped-query attention with causal, sliding-window and position masks, in memory linear in T.

Three implementations behind `attention`: torch_npu's `npu_fusion_attention` on an Ascend NPU; SDPA
(flash / memory-efficient kernels) everywhere else, where a `[T, T]` score or mask tensor never exists
(causal attention is one flash call, a sliding window runs query blocks against their key band only,
masks given by positions (`KeyMask`) are built one block of query rows at a time and rebuilt rather
than stored for backward); and `attention_reference`, explicit softmax over the whole mask, used under
vmap, forward-mode AD and nested gradients, which the fused kernels cannot follow
(`tracing.only_reverse_mode`).

q/k/v are BSND `[B, T, heads, head_dim]`, as the model produces them.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from mistral_fn import device as _device
from mistral_fn import remat, tracing

NPU_MASK_SIZE = 2048  # npu_fusion_attention's compressed causal mask is 2048 x 2048
QUERY_BLOCK = 512  # query rows per block of the blocked attention paths


def band_mask(positions: torch.Tensor, window: int | None, key_positions: torch.Tensor | None = None) -> torch.Tensor:
    """Bool mask `[..., Tq, Tk]`: key j visible to query i iff `k_j <= q_i` and `q_i - k_j < window`."""
    kpos = positions if key_positions is None else key_positions
    diff = positions[..., :, None] - kpos[..., None, :]
    allowed = diff >= 0
    if window is not None:
        allowed = allowed & (diff < window)
    return allowed


class KeyMask(NamedTuple):
    """Which keys each query sees, decided by positions: key j is visible to query i iff
    `0 <= q_pos[b, i] - k_pos[b, j] < window` (`window=None`: any distance) and `k_valid[b, j]`,
    or j is the query's own key `own[i]`.

    q_pos `[B, Tq]`, k_pos `[B, Tk]` int64; k_valid `[B, Tk]` bool or None (all keys valid); own `[Tq]`
    int64 or None. Kernels build the mask a block of query rows at a time with `rows`.
    """

    q_pos: torch.Tensor
    k_pos: torch.Tensor
    window: int | None
    k_valid: torch.Tensor | None = None
    own: torch.Tensor | None = None

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """bool `[B, 1, stop - start, Tk]`, True = query `start + i` may attend to key j."""
        visible = band_mask(self.q_pos[:, start:stop], self.window, self.k_pos)
        if self.k_valid is not None:
            visible = visible & self.k_valid[:, None, :]
        if self.own is not None:
            keys = torch.arange(self.k_pos.shape[1], device=self.k_pos.device)
            visible = visible | (keys == self.own[start:stop, None])
        return visible[:, None]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: KeyMask | None, window: int | None):
    """Grouped-query attention, BSND in and out: q `[B, Tq, H, hd]`, k/v `[B, Tk, KV, hd]` -> `[B, Tq, H, hd]`.

    `mask=None` means causal self-attention by index (Tq == Tk), each query seeing the `window` most
    recent keys including itself (`window=None`: all earlier keys); otherwise `mask` decides and
    `window` is already folded into it.
    """
    if not tracing.only_reverse_mode():
        return attention_reference(q, k, v, mask, window)
    if _device.is_npu(q) and mask is None:
        return _npu_causal_attention(q, k, v, window)
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    if mask is not None:
        out = _blocked_masked_attention(q, k, v, mask)
    elif window is not None and window < q.shape[2]:
        out = _keep_non_finite(_sliding_window_attention(q, k, v, window), q, k)
    else:
        out = _keep_non_finite(_sdpa(q, k, v, None, causal=True), q, k)
    return out.transpose(1, 2)


def _keep_non_finite(out: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Without autograd recording (inference): `out` with every row of the batch NaN where q or k holds a NaN
    or inf (BHSD). The CPU flash kernel returns 0 for queries whose scores are all NaN, which would hide
    non-finite weights from the logits check of generation and evaluation; adding `0 * sum` in place changes
    nothing when everything is finite. Under autograd `out` is saved for backward and left as it is."""
    if torch.is_grad_enabled() and out.requires_grad:
        return out
    poison = (q.sum(dim=(1, 2, 3)) + k.sum(dim=(1, 2, 3))) * 0
    return out.add_(poison.to(out.dtype)[:, None, None, None])


def attention_reference(q, k, v, mask: KeyMask | None, window: int | None) -> torch.Tensor:
    """`attention` as explicit `softmax(q kᵀ / sqrt(hd)) v` over the whole `[Tq, Tk]` mask, computed in
    `promote(float32, q.dtype)`: plain differentiable ops, so vmap, forward-mode AD and any order of
    gradients apply. Memory is quadratic in T; it serves transforms and tests, not long sequences."""
    if mask is None:
        visible = band_mask(torch.arange(q.shape[1], device=q.device), window)
    else:
        visible = mask.rows(0, q.shape[1])
    dtype, rep = q.dtype, q.shape[2] // k.shape[2]
    compute = torch.promote_types(dtype, torch.float32)
    q, k, v = (x.transpose(1, 2).to(compute) for x in (q, k, v))
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    return (probs @ v).transpose(1, 2).to(dtype)


def _sdpa(q, k, v, mask: torch.Tensor | None, causal: bool = False) -> torch.Tensor:
    """SDPA on BHSD tensors (flash or memory-efficient kernels: no `[Tq, Tk]` scores in memory)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                          enable_gqa=q.shape[1] != k.shape[1])


def _sliding_window_attention(q, k, v, window: int) -> torch.Tensor:
    """Causal attention over the `window` most recent keys, BHSD, T > window, in linear memory.

    Queries `[0, W)` see all earlier keys: one causal call. Later queries go in blocks of
    n = `QUERY_BLOCK` rows `[s, s + n)`, each against its key band `[s - W + 1, s + n)` (views, not
    copies) with one shared `[n, n + W - 1]` mask: query a sees band key b iff `a <= b <= a + W - 1`.
    Each query scores n + W - 1 keys instead of W: a bounded overhead for a bounded number of calls.
    """
    T, n = q.shape[2], QUERY_BLOCK
    offset = torch.arange(n + window - 1, device=q.device)[None, :] - torch.arange(n, device=q.device)[:, None]
    band = (offset >= 0) & (offset < window)
    outs = [_sdpa(q[:, :, :window], k[:, :, :window], v[:, :, :window], None, causal=True)]
    for s in range(window, T, n):
        e, ks = min(s + n, T), s - window + 1
        outs.append(_sdpa(q[:, :, s:e], k[:, :, ks:e], v[:, :, ks:e], band[:e - s, :e - ks]))
    return torch.cat(outs, dim=2)


def _blocked_masked_attention(q, k, v, mask: KeyMask) -> torch.Tensor:
    """Attention with a `KeyMask`, BHSD, `QUERY_BLOCK` query rows at a time: each block's
    `[B, 1, n, Tk]` mask exists only while the block runs. With autograd recording, each block is a
    `remat.checkpoint` that rebuilds its mask in backward instead of storing it."""

    def block(qb, k, v, start):
        return _sdpa(qb, k, v, mask.rows(start, start + qb.shape[2]))

    if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
        block = remat.checkpoint(block)
    return torch.cat([block(q[:, :, s:s + QUERY_BLOCK], k, v, s) for s in range(0, q.shape[2], QUERY_BLOCK)], dim=2)


def npu_attention_args(seq_len: int, window: int | None) -> dict:
    """Keyword arguments of `npu_fusion_attention` for causal (sparse_mode 2) or sliding-window
    (sparse_mode 4, `pre_tockens = window - 1`: the window counts the query itself) attention."""
    if window is not None and window < seq_len:
        return {"sparse_mode": 4, "pre_tockens": window - 1, "next_tockens": 0}
    return {"sparse_mode": 2}


def _npu_causal_attention(q, k, v, window):
    mask = torch.triu(torch.ones(NPU_MASK_SIZE, NPU_MASK_SIZE, dtype=torch.bool, device=q.device), diagonal=1)
    return _device.torch_npu().npu_fusion_attention(
        q, k, v, q.shape[2], "BSND", atten_mask=mask, scale=1.0 / math.sqrt(q.shape[-1]),
        **npu_attention_args(q.shape[1], window),
    )[0]
