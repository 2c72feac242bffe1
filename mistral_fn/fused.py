"""Autograd Functions for one reverse pass that are faster or store less than the plain torch ops
(`kernels` decides when they apply; the plain ops serve every other transform).

  * `Linear`: `x @ w.T` by oneDNN's matmul on CPUs, forward and backward. `F.linear` calls MKL's sgemm,
    which runs AVX2 code on non-Intel AVX-512 CPUs; oneDNN measured 2.1x faster on the benchmark machine
    (`benchmarks/`), the same values up to summation order.
  * `RMSNorm`: saves its input and the `[..., 1]` inverse RMS; autograd's plain ops also keep the
    normalised `[..., D]` product. `NormLinear`: a pre-norm and the matmuls it feeds, which then need not
    keep the normalised input either.
  * `SwiGLULinear`: `w_down(silu(gate) * up)` saving gate and up only; `silu(gate)` and the product
    (`[..., F]` each) are recomputed in backward, an elementwise pass, instead of stored.

Per decoder layer and token this stores ~7,150 fewer floats at the 125M shape (-48% of a layer's activations).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mistral_fn import tracing

ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def uses_onednn(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether `linear(x, w)` runs on oneDNN: float32 CPU tensors, and no functorch transform while
    torch.compile traces (the custom op below has no functorch rules)."""
    return ONEDNN and x.device.type == "cpu" and x.dtype == w.dtype == torch.float32 \
        and not (torch.compiler.is_compiling() and tracing.inside_transform())


def matmul_t(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """`x @ w.T` (no autograd): oneDNN where `uses_onednn`, any strides, else `F.linear`."""
    if not uses_onednn(x, w) or tracing.is_batched(x):
        return F.linear(x, w)
    if torch.compiler.is_compiling():  # inductor lowers the plain op only for constant, prepacked weights
        return _compiled_matmul_t(x, w)
    return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")


@torch.library.custom_op("mistral_fn::onednn_matmul_t", mutates_args=())
def _compiled_matmul_t(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")


@_compiled_matmul_t.register_fake
def _(x, w):
    return x.new_empty(*x.shape[:-1], w.shape[0])


def _grads_wanted(ctx, *indices: int) -> list[bool]:
    """`ctx.needs_input_grad` at `indices`; all True under torch.compile, where it can read False for
    leaves that need a gradient."""
    every = torch.compiler.is_compiling()
    return [every or ctx.needs_input_grad[i] for i in indices]


def _weight_grad(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`grad_w` of `x @ w.T`: `gᵀ @ x` over all leading dims."""
    return matmul_t(grad.flatten(0, -2).T, x.flatten(0, -2).T)


class Linear(torch.autograd.Function):
    """`x @ w.T` with the matmuls of `matmul_t`: grad_x = g @ w, grad_w = gᵀ @ x (transposed views)."""

    @staticmethod
    def forward(x, w):
        return matmul_t(x, w)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        want_x, want_w = _grads_wanted(ctx, 0, 1)
        return matmul_t(grad, w.T) if want_x else None, _weight_grad(grad, x) if want_w else None


def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`(weight * (x * rstd).to(x.dtype), rstd)`, the plain ops of `kernels.rms_norm`, normalised in
    `promote(float32, x.dtype)`; rstd `[..., 1]`."""
    h = x.to(torch.promote_types(x.dtype, torch.float32))
    rstd = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (h * rstd).to(x.dtype), rstd


def rms_norm_backward(x, weight, rstd, grad) -> tuple[torch.Tensor, torch.Tensor]:
    """`(grad_x, grad_weight)` of `rms_norm_forward` for the output's gradient `grad`."""
    h = x.to(rstd.dtype)
    normed = h * rstd
    grad_weight = (grad * normed.to(x.dtype)).flatten(0, -2).sum(0).to(weight.dtype)
    g = (grad * weight).to(rstd.dtype)
    # d/dh of h * rsqrt(mean(h²) + eps) applied to g: rstd * (g - normed * rstd * mean(g h))
    grad_x = rstd * (g - normed * (rstd * (g * h).mean(-1, keepdim=True)))
    return grad_x.to(x.dtype), grad_weight


class RMSNorm(torch.autograd.Function):
    """`rms_norm_forward`; rstd is returned to be saved (not differentiable)."""

    @staticmethod
    def forward(x, weight, eps):
        return rms_norm_forward(x, weight, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(inputs[0], inputs[1], output[1])

    @staticmethod
    def backward(ctx, grad, _grad_rstd):
        return (*rms_norm_backward(*ctx.saved_tensors, grad), None)


class NormLinear(torch.autograd.Function):
    """`x @ w.T for w in ws` where `x = tp.copy_to(rms_norm(h, weight))`: a pre-norm and the column-parallel
    matmuls it feeds, storing `h` (this rank's slice of the sequence under SP) and the `[..., 1]` inverse RMS.
    The normalised input, gathered under SP, is rebuilt in backward (Megatron also re-gathers it there);
    `tp.reduce_from` is `copy_to`'s backward collective. Outputs: one per weight, then rstd."""

    @staticmethod
    def forward(h, weight, eps, tp, *ws):
        normed, rstd = rms_norm_forward(h, weight, eps)
        x = tp.copy_to(normed)
        return (*(matmul_t(x, w) for w in ws), rstd)

    @staticmethod
    def setup_context(ctx, inputs, output):
        h, weight, eps, tp, *ws = inputs
        ctx.mark_non_differentiable(output[-1])
        ctx.save_for_backward(h, weight, output[-1], *ws)
        ctx.eps, ctx.tp = eps, tp

    @staticmethod
    def backward(ctx, *grads):
        h, weight, rstd, *ws = ctx.saved_tensors
        grads = grads[:-1]
        x = ctx.tp.copy_to(weight * (h.to(rstd.dtype) * rstd).to(h.dtype))
        grad_ws = [_weight_grad(g, x) for g in grads]
        grad_x = matmul_t(grads[0], ws[0].T)
        for g, w in zip(grads[1:], ws[1:], strict=True):
            grad_x = grad_x + matmul_t(g, w.T)
        grad_h, grad_weight = rms_norm_backward(h, weight, rstd, ctx.tp.reduce_from(grad_x))
        return grad_h, grad_weight, None, None, *grad_ws


class SwiGLULinear(torch.autograd.Function):
    """`(silu(gate) * up) @ w.T` storing gate, up and w; silu and the product are recomputed in backward."""

    @staticmethod
    def forward(gate, up, w):
        return matmul_t(F.silu(gate) * up, w)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad):
        gate, up, w = ctx.saved_tensors
        sig = torch.sigmoid(gate)
        silu = gate * sig
        grad_w = _weight_grad(grad, silu * up) if _grads_wanted(ctx, 2)[0] else None
        grad_prod = matmul_t(grad, w.T)
        grad_up = grad_prod * silu
        # silu'(g) = s (1 + g - silu), formed in silu's buffer (backward holds 4 [..., F] buffers at most)
        local = silu.neg_().add_(gate).add_(1).mul_(sig).mul_(up)
        # under jacrev the cotangent is vmap-batched and cannot be multiplied into a plain buffer
        grad_gate = local * grad_prod if tracing.is_batched(grad_prod) else local.mul_(grad_prod)
        return grad_gate, grad_up, grad_w
