"""Lazy parameter trees: leaves that know their shape and dtype and read their data only when asked.

A converter walks a lazy tree one layer at a time, so at most one layer's tensors are in memory.
`lazy_hf`, `lazy_megatron` and `lazy_native` build one from a checkpoint directory. `LazyTensor` has the
few tensor methods `checkpoints.save_hf` uses (`numel`, `element_size`, `dtype`, `detach`), so an HF
directory is written from a lazy tree with each tensor read as its shard is written. The safetensors
file helpers at the end name the file in every error.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from checkpoints.dtypes import cast_leaf
from mistral_fn.errors import CheckpointError
from mistral_fn.params import leaves_with_paths, map_with_path


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


def materialize(tree, dtype: torch.dtype | None = None, device=None):
    """The tree with every `LazyTensor` read (tensors pass through), each leaf cast to `dtype` (None keeps
    the stored dtype; float16 is range-checked) and moved to `device` (None: left where it is) as it is
    read, so at most one leaf exists twice at a time."""
    def read(path: str, x):
        x = cast_leaf(path, x.load() if isinstance(x, LazyTensor) else x, dtype)
        return x if device is None else x.to(device)
    return map_with_path(read, tree)


def tree_stats(tree, dtype: torch.dtype | None = None) -> tuple[int, int]:
    """`(number of leaves, bytes)` of a tree of tensors or lazy tensors, stored as `dtype` (None: as they are)."""
    leaves = [x for _, x in leaves_with_paths(tree)]
    return len(leaves), sum(x.numel() * (dtype.itemsize if dtype else x.element_size()) for x in leaves)


def open_safetensors(path: Path):
    """`safe_open(path)`, a `CheckpointError` naming the file when it is missing or unreadable."""
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: unreadable safetensors file ({e})") from None


def read_tensor(file: Path, name: str) -> torch.Tensor:
    """One tensor, copied out of a safetensors file; the mapping is closed again so no file pages stay mapped."""
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            return f.get_tensor(name)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"{file}: cannot read tensor {name} ({e})") from None


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """`safetensors.torch.save_file`; a failed write (a full disk, a file size limit) is raised as the
    `OSError` it is, naming `path` (safetensors reports it as a `SafetensorError` quoting the errno)."""
    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as e:
        code = re.search(r"os error (\d+)", str(e))
        if code is None:
            raise CheckpointError(f"{path}: cannot be written ({e})") from None
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from None
