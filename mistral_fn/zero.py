"""Gradient reduction over the data-parallel group in flat buckets, and the ZeRO-1 partition (Megatron's
distributed optimizer) of the optimizer state.

Partition: over `parts` ranks, every leaf's flattened elements are cut into `parts` contiguous blocks of
`ceil(numel / parts)` (the last ones shorter or empty); rank r owns block r of every leaf. A partitioned
tree (master weights, moments) keeps the params' paths with 1-D leaves: rank r's blocks. The partition
depends only on the leaf sizes and `parts`, so checkpoints do not depend on the bucketing below.

    numel 10 over 4 ranks: blocks of 3 -> rank 0 [0, 3), 1 [3, 6), 2 [6, 9), 3 [9, 10)

Buckets: leaves are grouped in reverse tree order (the order backward produces their gradients) into
float32 buffers of at least `bucket_size` elements (a leaf is never split across buckets). A buffer
holds `parts` equal regions; region r holds block r of each of its leaves, padded to the block size,
so one reduce-scatter of the buffer leaves rank r with the summed blocks it owns, and one all-gather of
the regions rebuilds the leaves. Without ZeRO `parts` is 1 and a bucket is simply its leaves end to end
(one all-reduce per bucket instead of one per leaf).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from mistral_fn.parallel import DataParallel

BUCKET_SIZE = 40_000_000  # elements per gradient bucket (Megatron's --ddp-bucket-size default, at most 8 dp ranks)


def block(numel: int, rank: int, parts: int) -> tuple[int, int]:
    """`[start, stop)` of rank `rank`'s block of a leaf of `numel` elements split over `parts` ranks."""
    size = math.ceil(numel / parts)
    return min(rank * size, numel), min((rank + 1) * size, numel)


def blocks(leaves: Sequence[torch.Tensor], rank: int, parts: int) -> list[torch.Tensor]:
    """Rank `rank`'s blocks of `leaves` as 1-D views (leaves must be contiguous)."""
    return [x.view(-1)[slice(*block(x.numel(), rank, parts))] for x in leaves]


class BucketLayout:
    """Where each leaf's blocks lie in the bucket buffers (see the module docstring)."""

    def __init__(self, numels: Sequence[int], parts: int, bucket_size: int = BUCKET_SIZE):
        self.numels, self.parts = list(numels), parts
        self.block = [math.ceil(n / parts) for n in self.numels]
        self.buckets: list[list[int]] = [[]]
        for i in reversed(range(len(self.numels))):
            if sum(self.block[j] for j in self.buckets[-1]) * parts >= bucket_size:
                self.buckets.append([])
            self.buckets[-1].append(i)
        self.bucket_of, self.offset, self.region = {}, {}, []
        for b, members in enumerate(self.buckets):
            offset = 0
            for i in members:
                self.bucket_of[i], self.offset[i] = b, offset
                offset += self.block[i]
            self.region.append(offset)

    def views(self, buffer: torch.Tensor, i: int) -> list[torch.Tensor]:
        """The `parts` slices of leaf `i`'s bucket `buffer` that hold its blocks, in rank order."""
        region, start = self.region[self.bucket_of[i]], self.offset[i]
        return [buffer[r * region + start:r * region + start + (stop - lo)]
                for r, (lo, stop) in enumerate(block(self.numels[i], r, self.parts) for r in range(self.parts))]


class GradReducer:
    """One step's gradients: micro-batch gradients summed into float32 buckets, then each bucket reduced over
    `dp` (all-reduce, or reduce-scatter when `scatter`: ZeRO-1). `hook` is for the last backward
    (`overlap_grad_reduce`): it adds one leaf and starts its bucket's collective as soon as the bucket is
    complete, while backward continues on the rest."""

    def __init__(self, params: Sequence[torch.Tensor], dp: DataParallel, scatter: bool, bucket_size: int):
        self.shapes = [x.shape for x in params]
        self.dp, self.scatter = dp, scatter
        self.layout = BucketLayout([x.numel() for x in params], dp.size if scatter else 1, bucket_size)
        self.buffers = [params[0].new_zeros(size * self.layout.parts, dtype=torch.float32)
                        for size in self.layout.region]
        self.pending: list[int] = [len(members) for members in self.layout.buckets]
        self.started: dict[int, tuple[torch.Tensor, object]] = {}
        self.final_added: set[int] = set()

    def _add(self, indices: Sequence[int], grads: Sequence[torch.Tensor]) -> None:
        views, chunks = [], []
        for i, g in zip(indices, grads, strict=True):
            parts = self.layout.views(self.buffers[self.layout.bucket_of[i]], i)
            views += parts
            chunks += g.reshape(-1).split([v.numel() for v in parts])
        if views:
            torch._foreach_add_(views, chunks)

    def add(self, grads: Sequence[torch.Tensor]) -> None:
        """Sum one micro-batch's gradients (one per leaf, any float dtype) into the buckets."""
        self._add(range(len(grads)), grads)

    def hook(self, i: int, grad: torch.Tensor) -> None:
        """Add leaf `i`'s gradient of the last micro-batch; start its bucket's collective once it is complete."""
        self._add([i], [grad])
        self.final_added.add(i)
        b = self.layout.bucket_of[i]
        self.pending[b] -= 1
        if not self.pending[b]:
            self._start(b, async_op=True)

    def finish(self, last_grads: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Reduced gradients: full leaves (all-reduce) or this rank's 1-D blocks (reduce-scatter).

        `last_grads`: the last micro-batch's gradients when they went through `hook`; leaves the hook never
        saw (no gradient flowed to them) are added from here before their buckets are reduced."""
        if last_grads is not None:
            missing = [i for i in range(len(last_grads)) if i not in self.final_added]
            self._add(missing, [last_grads[i] for i in missing])
        for b in range(len(self.buffers)):
            if b not in self.started:
                self._start(b, async_op=False)
        for _, work in self.started.values():
            if work is not None:
                work.wait()
        out = []
        for i, shape in enumerate(self.shapes):
            b, start = self.layout.bucket_of[i], self.layout.offset[i]
            reduced = self.started[b][0]
            if self.scatter:
                lo, stop = block(self.layout.numels[i], self.dp.rank, self.layout.parts)
                out.append(reduced[start:start + stop - lo])
            else:
                out.append(reduced[start:start + self.layout.numels[i]].view(shape))
        self.buffers = []
        return out

    def _start(self, b: int, async_op: bool) -> None:
        if self.scatter:
            self.started[b] = self.dp.reduce_scatter(self.buffers[b], async_op=async_op)
        else:
            self.started[b] = (self.buffers[b], self.dp.all_reduce_(self.buffers[b], async_op=async_op))


def gather_blocks(pieces: Sequence[torch.Tensor], shapes: Sequence[torch.Size], dp: DataParallel,
                  dtypes: Sequence[torch.dtype], bucket_size: int = BUCKET_SIZE) -> list[torch.Tensor]:
    """Full leaves of `shapes` (cast to `dtypes`) from every rank's blocks (`pieces`: this rank's), one
    all-gather per bucket."""
    layout = BucketLayout([math.prod(s) for s in shapes], dp.size, bucket_size)
    out: list[torch.Tensor | None] = [None] * len(shapes)
    for members, region in zip(layout.buckets, layout.region, strict=True):
        shard = pieces[members[0]].new_zeros(region)
        for i in members:
            shard[layout.offset[i]:layout.offset[i] + pieces[i].numel()] = pieces[i]
        regions = dp.all_gather(shard).view(dp.size, region)
        for i in members:
            start = layout.offset[i]
            flat = regions[:, start:start + layout.block[i]].reshape(-1)[:layout.numels[i]]
            out[i] = flat.view(shapes[i]).to(dtypes[i])
    return out
