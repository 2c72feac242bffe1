"""Elementary ops of the model, each with one signature and two implementations: pure torch
everywhere, and the torch_npu fused kernel when the tensor lives on an Ascend NPU.

Layouts: activations are `[B, T, D]`; q/k/v are BSND `[B, T, heads, head_dim]`; cos/sin are
`[B, T, 1, head_dim]` built as `cat(freqs, freqs)` (rotate-half convention, as HF and Megatron).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mistral_fn import device as _device

NPU_MASK_SIZE = 2048  # npu_fusion_attention's compressed causal mask is 2048 x 2048


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`weight * x / sqrt(mean(x², -1) + eps)`, normalised in float32, returned in x's dtype."""
    if _device.is_npu(x):
        return _device.torch_npu().npu_rms_norm(x, weight, epsilon=eps)[0]
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary embedding of `x` `[B, T, N, hd]` with `cos`, `sin` `[B, T, 1, hd]`."""
    if _device.is_npu(x):
        return _device.torch_npu().npu_rotary_mul(x, cos, sin)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """`silu(gate) * up`."""
    if _device.is_npu(gate):
        return _device.torch_npu().npu_swiglu(torch.cat((gate, up), dim=-1).contiguous(), dim=-1)
    return F.silu(gate) * up


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, window: int | None):
    """Grouped-query attention, BSND in and out: q `[B, Tq, H, hd]`, k/v `[B, Tk, KV, hd]` -> `[B, Tq, H, hd]`.

    `mask=None` means plain causal self-attention (Tq == Tk) restricted to `window` keys including
    the query itself; otherwise `mask` is a bool `[B, 1, Tq, Tk]` with True = may attend, and
    `window` is already folded into it.
    """
    if _device.is_npu(q) and mask is None:
        return _npu_causal_attention(q, k, v, window)
    if mask is None and window is not None and window < q.shape[1]:
        mask = band_mask(torch.arange(q.shape[1], device=q.device), window)[None, None]
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        attn_mask=mask, is_causal=mask is None, enable_gqa=q.shape[2] != k.shape[2],
    )
    return out.transpose(1, 2)


def band_mask(positions: torch.Tensor, window: int | None, key_positions: torch.Tensor | None = None) -> torch.Tensor:
    """Bool mask `[..., Tq, Tk]`: key j visible to query i iff `k_j <= q_i` and `q_i - k_j < window`."""
    kpos = positions if key_positions is None else key_positions
    diff = positions[..., :, None] - kpos[..., None, :]
    allowed = diff >= 0
    if window is not None:
        allowed = allowed & (diff < window)
    return allowed


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
