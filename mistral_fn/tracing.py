"""What the current call runs under (functorch transforms, forward-mode AD, `torch.compile`), so the
model can stay composable with every transform without a flag or a context manager from the user.

Two questions are asked of it:
  * `values_readable(x)`: may a validity check read `x`'s values (`int(x.max())`)? Not when `x` is
    wrapped by a transform (vmap forbids reading a batched tensor), lives on `meta`, or is being traced
    by `torch.compile` (a host sync would break the graph). Shape and dtype checks need no values and
    run everywhere.
  * `only_reverse_mode()`: is at most one level of reverse-mode AD active (plain autograd, or one
    `torch.func.grad`/`vjp`), with no vmap, no forward mode (`jvp`, `jacfwd`, a `forward_ad` dual
    level) and no nested gradient? Fused kernels (the flash SDPA kernels, torch_npu's) and autograd
    Functions that define one backward and nothing else are exact only then; otherwise callers take a
    plain-torch path that every transform can differentiate.
"""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as forward_ad
from torch._C._functorch import TransformType, is_batchedtensor, is_functorch_wrapped_tensor, peek_interpreter_stack
from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters


def values_readable(x: torch.Tensor) -> bool:
    """True when `x` holds concrete values that may be read on the host right now."""
    if torch.compiler.is_compiling() or x.device.type == "meta":
        return False
    return not is_functorch_wrapped_tensor(x)


def is_batched(x: torch.Tensor) -> bool:
    """True when `x` is batched by vmap (in place, it cannot take a batched operand into a plain tensor)."""
    return is_batchedtensor(x)


@torch.compiler.assume_constant_result
def inside_transform() -> bool:
    """True when any functorch transform (grad, vjp, vmap, jvp, ...) is active."""
    return peek_interpreter_stack() is not None


@torch.compiler.assume_constant_result  # evaluated when torch.compile traces, like in eager mode
def only_reverse_mode() -> bool:
    """True unless vmap, forward-mode AD or a nested gradient transform is active."""
    if forward_ad._current_level >= 0:
        return False
    if peek_interpreter_stack() is None:  # no transform: the common case, decided without a list
        return True
    return [interpreter.key() for interpreter in retrieve_all_functorch_interpreters()] == [TransformType.Grad]
