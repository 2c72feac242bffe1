"""Elementwise ops of the model, each with one signature and two implementations: the torch_npu fused
kernel when the tensor lives on an Ascend NPU and no transform it cannot follow is active (see
`tracing.only_reverse_mode`), and plain torch, which every `torch.func` transform can differentiate.
Attention lives in `attention.py`.

Layouts: activations are `[B, T, D]`; q/k/v are BSND `[B, T, heads, head_dim]`; cos/sin are
`[B, T, 1, head_dim]` built as `cat(freqs, freqs)` (rotate-half convention, as HF and Megatron).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mistral_fn import device as _device
from mistral_fn import tracing


def _fused_npu(x: torch.Tensor) -> bool:
    return _device.is_npu(x) and tracing.only_reverse_mode()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`weight * x / sqrt(mean(x², -1) + eps)`, normalised in `promote(float32, x.dtype)` (float32 for
    bf16/fp16/fp32, float64 for float64), returned in x's dtype."""
    if _fused_npu(x):
        return _device.torch_npu().npu_rms_norm(x, weight, epsilon=eps)[0]
    h = x.to(torch.promote_types(x.dtype, torch.float32))
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary embedding of `x` `[B, T, N, hd]` with `cos`, `sin` `[B, T, 1, hd]`."""
    if _fused_npu(x):
        return _device.torch_npu().npu_rotary_mul(x, cos, sin)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """`silu(gate) * up`."""
    if _fused_npu(gate):
        return _device.torch_npu().npu_swiglu(torch.cat((gate, up), dim=-1).contiguous(), dim=-1)
    return F.silu(gate) * up


