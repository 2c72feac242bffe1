"""Activation recomputation that composes with both `torch.func` transforms and `torch.autograd`.

`torch.utils.checkpoint` does not work under `torch.func.grad` (saved-tensor hooks / missing
`setup_context`). `checkpoint(fn)` is a small `autograd.Function` instead: forward runs `fn` without
recording and saves only its floating-point tensor inputs; backward re-runs `fn` under
`torch.func.vjp` and returns the input cotangents. Peak memory per call is then the inputs plus one
recomputation, at the price of one extra forward.

Recomputation only changes what reverse mode stores. Under vmap, forward-mode AD or nested gradients
(`tracing.only_reverse_mode()` is False), which the single-backward Function does not support,
`checkpoint(fn)` calls `fn` directly: the same values and derivatives, without the memory saving.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils import _pytree as pytree

from mistral_fn import tracing


def _is_primal(x) -> bool:
    return isinstance(x, torch.Tensor) and x.is_floating_point()


class _Recompute(torch.autograd.Function):
    """Inputs: `(run, *primals)` where `run(*primals)` returns one tensor."""

    @staticmethod
    def forward(run, *primals):
        return run(*primals)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.run = inputs[0]
        ctx.save_for_backward(*inputs[1:])

    @staticmethod
    def backward(ctx, grad_out):
        # Cotangents for every primal, needed or not: under torch.compile `needs_input_grad` reads
        # False for parameters that do need gradients, which silently zeroed them.
        _, vjp_fn = torch.func.vjp(ctx.run, *ctx.saved_tensors)
        return (None, *vjp_fn(grad_out))


def checkpoint(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """`fn` with the same signature (positional pytrees of tensors and constants, one tensor out),
    whose intermediate activations are recomputed in backward instead of stored.

    Floating-point tensors anywhere in the arguments are differentiable inputs; integer/bool tensors,
    None and other values are treated as constants. `fn` must be deterministic (no dropout here).
    """

    def wrapped(*args):
        if not tracing.only_reverse_mode():
            return fn(*args)
        leaves, treedef = pytree.tree_flatten(args)
        slots = [i for i, x in enumerate(leaves) if _is_primal(x)]
        inputs = [leaves[i] for i in slots]
        # `run` keeps the constants only: the tensors are saved for backward, which frees them once this call's
        # backward is done (a closure over them would hold them until the whole backward ends)
        constants = [None if _is_primal(x) else x for x in leaves]

        def run(*primals):
            full = list(constants)
            for i, x in zip(slots, primals):
                full[i] = x
            return fn(*pytree.tree_unflatten(full, treedef))

        return _Recompute.apply(run, *inputs)

    return wrapped
