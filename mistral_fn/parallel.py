"""The small interface through which tensor-parallel collectives reach the model.

`mistral_fn` never imports `sharding`; the model takes a `TensorParallel` argument instead. The
single-device implementation below issues no collective. `sharding` provides the process-group one
(Megatron's `f`/`g` operators as autograd Functions that also work under `torch.func`).
"""

from __future__ import annotations

from typing import Protocol

import torch


class TensorParallel(Protocol):
    """What the model needs from a TP group. `size` ranks; this process is `rank`."""

    size: int
    rank: int

    def copy_to(self, x: torch.Tensor) -> torch.Tensor:
        """Before a column-parallel layer: identity forward, all-reduce(sum) of the gradient backward."""

    def reduce_from(self, x: torch.Tensor) -> torch.Tensor:
        """After a row-parallel layer: all-reduce(sum) forward, identity backward."""

    def all_reduce(self, x: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Raw all-reduce (`op` in sum/max) of a tensor outside autograd; returns the reduced tensor."""


class SingleDevice:
    """TP of size 1: every collective is the identity, nothing is communicated."""

    size = 1
    rank = 0

    def copy_to(self, x):
        return x

    def reduce_from(self, x):
        return x

    def all_reduce(self, x, op="sum"):
        return x


SINGLE_DEVICE = SingleDevice()
