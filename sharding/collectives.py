"""`GroupTP`: the model's `TensorParallel` interface over a torch.distributed process group.

Megatron's two conjugate operators are autograd Functions in the `setup_context` style, so they
compose with `torch.func.grad` (functional collectives do not, and their all-reduce backward would be
wrong for a row-parallel output):

    copy_to      (Megatron f) identity forward, all-reduce(sum) of the gradient backward
    reduce_from  (Megatron g) all-reduce(sum) forward, identity backward
"""

from __future__ import annotations

import torch
import torch.distributed as dist

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}


class GroupTP:
    """Tensor parallelism over the ranks of `group` (this process is `rank` of `size`)."""

    def __init__(self, group: dist.ProcessGroup):
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def copy_to(self, x: torch.Tensor) -> torch.Tensor:
        return _CopyTo.apply(x, self)

    def reduce_from(self, x: torch.Tensor) -> torch.Tensor:
        return _ReduceFrom.apply(x, self)

    def all_reduce(self, x: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """A reduced copy of `x` (`op` in sum/max); `x` itself is left unchanged. No autograd."""
        out = x.detach().clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=_OPS[op], group=self.group)
        return out

    def __repr__(self):
        return f"GroupTP(rank={self.rank}, size={self.size})"


class _CopyTo(torch.autograd.Function):
    @staticmethod
    def forward(x, tp):
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.tp = inputs[1]

    @staticmethod
    def backward(ctx, grad):
        return ctx.tp.all_reduce(grad), None


class _ReduceFrom(torch.autograd.Function):
    @staticmethod
    def forward(x, tp):
        return tp.all_reduce(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return grad, None
