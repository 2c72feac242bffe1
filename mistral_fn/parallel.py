"""The small interfaces through which collectives reach the model (`TensorParallel`) and the train step
(`DataParallel`).

`mistral_fn` never imports `sharding`; the model and the step take these as arguments instead. The
single-device implementation below issues no collective. `sharding.collectives` provides the
process-group ones (Megatron's operators as autograd Functions that also work under `torch.func`).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch


class TensorParallel(Protocol):
    """What the model needs from a TP group. `size` ranks; this process is `rank`.

    With `sequence_parallel` (Megatron's sequence parallelism) the residual stream and the norms hold this
    rank's contiguous slice of the sequence, `[B, T/size, D]`; `copy_to`/`reduce_from` then also move
    between that slice and the whole sequence that the column/row-parallel matmuls see.
    """

    size: int
    rank: int
    sequence_parallel: bool

    def copy_to(self, x: torch.Tensor) -> torch.Tensor:
        """Into a column-parallel layer. TP: identity forward, all-reduce(sum) of the gradient backward.
        SP: all-gather `[B, T/size, ...] -> [B, T, ...]` forward, reduce-scatter of the gradient backward."""

    def reduce_from(self, x: torch.Tensor) -> torch.Tensor:
        """Out of a row-parallel layer (partial sums). TP: all-reduce(sum) forward, identity backward.
        SP: reduce-scatter `[B, T, ...] -> [B, T/size, ...]` forward, all-gather of the gradient backward."""

    def replicated(self, w: torch.Tensor) -> torch.Tensor:
        """A weight every rank holds whole (the norms), about to meet this rank's activations. Identity
        forward; under SP, where each rank saw only its slice of the sequence, the gradient is summed over
        the group backward (without SP every rank already has the whole gradient)."""

    def all_reduce(self, x: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Raw all-reduce (`op` in sum/max) of a tensor outside autograd; returns the reduced tensor."""


class DataParallel(Protocol):
    """What the train step needs from the dp group: `size` ranks, this process is `rank`.

    Gradient buckets are flat 1-D tensors; with `async_op=True` the collective is only started and the
    result is valid after `work.wait()` (`work` is None when nothing had to be communicated).
    """

    size: int
    rank: int

    def all_reduce(self, x: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """A reduced copy of `x`; `x` itself is left unchanged."""

    def all_reduce_(self, x: torch.Tensor, async_op: bool = False) -> Any:
        """Sum `x` over the group in place; returns the work handle (or None)."""

    def reduce_scatter(self, x: torch.Tensor, async_op: bool = False) -> tuple[torch.Tensor, Any]:
        """`(block, work)`: block `rank` (`x.numel() / size` elements) of the sum of `x` over the group."""

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's `x`, concatenated in rank order (`size * x.numel()` elements)."""


class SingleDevice:
    """A group of size 1 (TP and DP): every collective is the identity, nothing is communicated."""

    size = 1
    rank = 0
    sequence_parallel = False

    def copy_to(self, x):
        return x

    def reduce_from(self, x):
        return x

    def replicated(self, w):
        return w

    def all_reduce(self, x, op="sum"):
        return x

    def all_reduce_(self, x, async_op=False):
        return None

    def reduce_scatter(self, x, async_op=False):
        return x, None

    def all_gather(self, x):
        return x


SINGLE_DEVICE = SingleDevice()
