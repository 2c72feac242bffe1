"""Lazy parameter trees: leaves that know their shape and dtype and read their data only when asked.

A converter walks a lazy tree one layer at a time, so at most one layer's tensors are in memory.
`checkpoints.hf.lazy_hf` builds one from an HF directory. `LazyTensor` has the few tensor methods `checkpoints.save_hf` uses (`numel`, `element_size`, `dtype`,
`detach`), so an HF directory is written from a lazy tree with each tensor read as its shard is written.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from mistral_fn.params import leaves_with_paths, tree_map


@dataclasses.dataclass(frozen=True, eq=False)
class LazyTensor:
    """A tensor of `shape` and `dtype` that `reader()` produces on demand (each `load` reads it again)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    reader: Callable[[], torch.Tensor]

    def load(self) -> torch.Tensor:
        return self.reader()

    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())

    def element_size(self) -> int:
        return self.dtype.itemsize

    def detach(self) -> torch.Tensor:
        """`load()`: how `save_hf` takes a leaf's data."""
        return self.reader()


def materialize(tree, dtype: torch.dtype | None = None):
    """The tree with every `LazyTensor` read (tensors pass through), each leaf cast to `dtype` as it is
    read (None keeps the stored dtype), so at most one leaf exists twice at a time."""
    def read(x):
        x = x.load() if isinstance(x, LazyTensor) else x
        return x if dtype is None else x.to(dtype)
    return tree_map(read, tree)


def tree_stats(tree, dtype: torch.dtype | None = None) -> tuple[int, int]:
    """`(number of leaves, bytes)` of a tree of tensors or lazy tensors, stored as `dtype` (None: as they are)."""
    leaves = [x for _, x in leaves_with_paths(tree)]
    return len(leaves), sum(x.numel() * (dtype.itemsize if dtype else x.element_size()) for x in leaves)
