"""Lazy parameter trees: leaves that know their shape and dtype and read their data only when asked.

A converter walks a lazy tree one layer at a time, so at most one layer's tensors are in memory.
`LazyTensor` has the few tensor methods `checkpoints.save_hf` uses (`numel`, `element_size`, `dtype`,
`detach`), so an HF directory is written from a lazy tree with each tensor read as its shard is written.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open

from checkpoints.hf import hf_names, weight_map
from mistral_fn.config import MistralConfig
from mistral_fn.errors import CheckpointError
from mistral_fn.params import leaves_with_paths, map_with_path, param_shapes, tree_map

SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}


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


def lazy_hf(hf_dir: str | os.PathLike) -> tuple[MistralConfig, dict]:
    """`(config, lazy params)` of an HF Mistral directory; each leaf opens its safetensors file when read.

    Names and shapes are checked against `config.json` up front, from the file headers only.
    """
    config = MistralConfig.from_hf(hf_dir)
    files = weight_map(hf_dir)
    names = hf_names(config)
    headers: dict[Path, dict[str, tuple[tuple[int, ...], str]]] = {}
    for name in names.values():
        if name not in files:
            raise CheckpointError(f"{hf_dir}: missing tensor {name}")
        if files[name] not in headers:
            headers[files[name]] = _header(files[name])

    def leaf(path: str, shape: tuple[int, ...]) -> LazyTensor:
        name, file = names[path], files[names[path]]
        if name not in headers[file]:
            raise CheckpointError(f"{file}: tensor {name} is listed in the index but not in the file")
        stored, dtype = headers[file][name]
        if stored != shape:
            raise CheckpointError(f"{file}: tensor {name} has shape {list(stored)}, expected {list(shape)}")
        if dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{file}: tensor {name} has unsupported dtype {dtype}")
        return LazyTensor(shape, SAFETENSORS_DTYPES[dtype], lambda: _read(file, name))

    return config, map_with_path(leaf, param_shapes(config), is_leaf=lambda x: isinstance(x, tuple))


def _header(file: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            return {name: (tuple(f.get_slice(name).get_shape()), f.get_slice(name).get_dtype()) for name in f.keys()}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: unreadable safetensors file ({e})") from None


def _read(file: Path, name: str) -> torch.Tensor:
    """One tensor, copied out of the file; the mapping is closed again so no file pages stay mapped."""
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            return f.get_tensor(name)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"{file}: cannot read tensor {name} ({e})") from None


def tree_stats(tree, dtype: torch.dtype | None = None) -> tuple[int, int]:
    """`(number of leaves, bytes)` of a tree of tensors or lazy tensors, stored as `dtype` (None: as they are)."""
    leaves = [x for _, x in leaves_with_paths(tree)]
    return len(leaves), sum(x.numel() * (dtype.itemsize if dtype else x.element_size()) for x in leaves)
