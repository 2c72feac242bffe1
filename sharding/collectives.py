"""`GroupTP` and `GroupDP`: the model's `TensorParallel` and the train step's `DataParallel` over
torch.distributed process groups.

Megatron's conjugate operators are autograd Functions in the `setup_context` style, so they compose with
`torch.func.grad` (functional collectives do not, and their all-reduce backward would be wrong for a
row-parallel output):

    copy_to      (Megatron f) identity forward, all-reduce(sum) of the gradient backward
    reduce_from  (Megatron g) all-reduce(sum) forward, identity backward

and, with sequence parallelism, the pair along the sequence dim (dim 1 of `[B, T, ...]`):

    gather       all-gather forward, reduce-scatter backward    (copy_to under SP)
    scatter      reduce-scatter forward, all-gather backward    (reduce_from under SP)
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from mistral_fn.errors import InputError

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}


class _Group:
    """The ranks of `group` (this process is `rank` of `size`) and the collectives outside autograd: reductions
    of values and of flat gradient buckets (`parallel.DataParallel`)."""

    def __init__(self, group: dist.ProcessGroup):
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def all_reduce(self, x: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """A reduced copy of `x` (`op` in sum/max); `x` itself is left unchanged. No autograd."""
        out = x.detach().clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=_OPS[op], group=self.group)
        return out

    def all_reduce_(self, x: torch.Tensor, async_op: bool = False):
        """Sum flat `x` over the group in place (a gradient bucket); the work handle with `async_op`."""
        return dist.all_reduce(x, group=self.group, async_op=async_op)

    def reduce_scatter(self, x: torch.Tensor, async_op: bool = False):
        """`(block, work)`: this rank's block of the sum of flat `x` over the group."""
        out = x.new_empty(x.numel() // self.size)
        return out, dist.reduce_scatter_single(out, x, group=self.group, async_op=async_op)

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Flat `x` of every rank, concatenated in rank order."""
        out = x.new_empty(self.size * x.numel())
        dist.all_gather_single(out, x.contiguous(), group=self.group)
        return out

    def __repr__(self):
        return f"{type(self).__name__}(rank={self.rank}, size={self.size})"


class GroupTP(_Group):
    """Tensor parallelism over the ranks of `group`; `sequence_parallel` splits the residual stream along
    the sequence (Megatron's `--sequence-parallel`), which needs the sequence length divisible by `size`."""

    def __init__(self, group: dist.ProcessGroup, sequence_parallel: bool = False):
        super().__init__(group)
        self.sequence_parallel = sequence_parallel

    def copy_to(self, x: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:
            return _Conjugate.apply(x, self.gather_sequence, self.scatter_sequence)
        return _Conjugate.apply(x, _same, self.all_reduce)

    def reduce_from(self, x: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:
            return _Conjugate.apply(x, self.scatter_sequence, self.gather_sequence)
        return _Conjugate.apply(x, self.all_reduce, _same)

    def replicated(self, w: torch.Tensor) -> torch.Tensor:
        return _Conjugate.apply(w, _same, self.all_reduce) if self.sequence_parallel else w

    def gather_sequence(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, n, ...]` from every rank -> `[B, size * n, ...]`, rank r's slice at `[r*n, (r+1)*n)`. No autograd."""
        out = x.new_empty(self.size, *x.shape)
        dist.all_gather_single(out.view(-1), x.detach().reshape(-1), group=self.group)
        return out.movedim(0, 1).flatten(1, 2)

    def scatter_sequence(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's slice `[B, T/size, ...]` of the sum of `[B, T, ...]` over the group. No autograd."""
        if x.shape[1] % self.size:
            raise InputError(f"sequence length {x.shape[1]} is not divisible by the tensor-parallel size "
                             f"{self.size} (sequence parallelism splits the sequence over the tp ranks)")
        stacked = x.detach().unflatten(1, (self.size, -1)).movedim(1, 0).contiguous()
        out = x.new_empty(stacked.shape[1:])
        # the list form: gloo's single-tensor reduce-scatter ends in an aten copy that torch.func refuses
        dist.reduce_scatter(out, list(stacked.unbind(0)), group=self.group)
        return out


class GroupDP(_Group):
    """Data parallelism over the ranks of `group`: the `DataParallel` the train step takes."""


def _same(x: torch.Tensor) -> torch.Tensor:
    return x.view_as(x)


class _Conjugate(torch.autograd.Function):
    """`forward(x)` in the forward pass and `backward(grad)` in the backward pass: one of the pairs above."""

    @staticmethod
    def forward(x, forward, backward):
        return forward(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.backward_fn = inputs[2]

    @staticmethod
    def backward(ctx, grad):
        return ctx.backward_fn(grad), None, None
