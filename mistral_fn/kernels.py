"""The model's matmul and elementwise ops, each with one signature and two implementations: a faster
kernel where it applies and no transform it cannot follow is active (see `tracing.only_reverse_mode`),
and plain torch, which every `torch.func` transform can differentiate. The faster kernels: torch_npu's
fused ops on an Ascend NPU; elsewhere the autograd Functions of `fused.py` (oneDNN matmuls for float32
on CPUs, norm and SwiGLU storing less for backward). Attention lives in `attention.py`.

Layouts: activations are `[B, T, D]`; q/k/v are BSND `[B, T, heads, head_dim]`; cos/sin are
`[B, T, 1, head_dim]` built as `cat(freqs, freqs)` (rotate-half convention, as HF and Megatron).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mistral_fn import device as _device
from mistral_fn import fused, tracing
from mistral_fn.parallel import TensorParallel


def _fused_npu(x: torch.Tensor) -> bool:
    return _device.is_npu(x) and tracing.only_reverse_mode()


def _recording(*xs: torch.Tensor) -> bool:
    """Whether autograd records an op on `xs`."""
    return torch.is_grad_enabled() and any(x.requires_grad for x in xs)


def _saves_less(*xs: torch.Tensor) -> bool:
    """Whether a `fused` Function that stores less for backward applies: one reverse pass is recording
    through `xs`, and torch.compile is not tracing (it chooses what to store and recompute itself)."""
    return _recording(*xs) and tracing.only_reverse_mode() and not torch.compiler.is_compiling()


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """`x @ w.T`: x `[..., in]`, w `[out, in]` -> `[..., out]` (`F.linear` without bias). float32 on a
    CPU runs oneDNN's matmul in forward and backward (`fused.Linear`), the same values up to summation
    order; elsewhere, and under transforms beyond one reverse pass, `F.linear`.

    Under torch.compile on a CPU, one row without autograd (a decode step) is a multiply-reduce that
    inductor turns into one fused pass over `w`, accumulated in `promote(float32, dtype)`: measured at
    the machine's read bandwidth, 1.4x oneDNN's matrix-vector product (`benchmarks/`).
    """
    if torch.compiler.is_compiling() and x.device.type == "cpu" and x.shape[:-1].numel() == 1 \
            and not _recording(x, w):
        compute = torch.promote_types(x.dtype, torch.float32)
        return (x[..., None, :] * w).sum(-1, dtype=compute).to(x.dtype)
    if not (fused.uses_onednn(x, w) and tracing.only_reverse_mode()):
        return F.linear(x, w)
    return fused.Linear.apply(x, w) if _recording(x, w) else fused.matmul_t(x, w)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`weight * x / sqrt(mean(x², -1) + eps)`, normalised in `promote(float32, x.dtype)` (float32 for
    bf16/fp16/fp32, float64 for float64), returned in x's dtype."""
    if _fused_npu(x):
        return _device.torch_npu().npu_rms_norm(x, weight, epsilon=eps)[0]
    if _saves_less(x, weight):
        return fused.RMSNorm.apply(x, weight, eps)[0]
    return fused.rms_norm_forward(x, weight, eps)[0]  # plain ops: every transform follows them


def norm_linear(h: torch.Tensor, weight: torch.Tensor, eps: float, tp: TensorParallel,
                *ws: torch.Tensor) -> list[torch.Tensor]:
    """`[linear(x, w) for w in ws]` with `x = tp.copy_to(rms_norm(h, weight, eps))`: a pre-norm into
    column-parallel layers. With autograd recording on CPU/GPU `fused.NormLinear` stores `h` and the inverse
    RMS instead of the normalised (under SP, gathered) `x`."""
    if not _fused_npu(h) and _saves_less(h, weight, *ws):
        return list(fused.NormLinear.apply(h, weight, eps, tp, *ws)[:-1])
    x = tp.copy_to(rms_norm(h, weight, eps))
    return [linear(x, w) for w in ws]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary embedding of `x` `[B, T, N, hd]` with `cos`, `sin` `[B, T, 1, hd]`."""
    if _fused_npu(x):
        return _device.torch_npu().npu_rotary_mul(x, cos, sin)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def swiglu_linear(gate: torch.Tensor, up: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """`linear(silu(gate) * up, w)`, the MLP's output projection; with autograd recording on CPU/GPU
    `fused.SwiGLULinear` stores gate and up only."""
    if _fused_npu(gate):
        return linear(_device.torch_npu().npu_swiglu(torch.cat((gate, up), dim=-1).contiguous(), dim=-1), w)
    if _saves_less(gate, up, w):
        return fused.SwiGLULinear.apply(gate, up, w)
    return linear(F.silu(gate) * up, w)


