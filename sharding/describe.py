"""What the rules do to a tree on a mesh: per leaf its full shape, spec and local shape; bytes per rank."""

from __future__ import annotations

import math
import sys
from typing import Mapping

import torch

from mistral_fn.params import leaves_with_paths, tree_map
from sharding.rules import Rules, match
from sharding.shard import shard


def layout(params, rules: Rules, mesh_shape: Mapping[str, int]) -> dict[str, dict]:
    """`{path: {"shape", "spec", "local_shape"}}` in tree order (shapes as lists, the spec as its repr).

    Only shapes are used (the tree is mapped to `meta`); shards are equal on every rank, padding included.
    """
    meta = tree_map(lambda x: torch.empty(x.shape, dtype=x.dtype, device="meta"), params)
    specs = match(meta, rules)
    local = shard(meta, specs, mesh_shape, {axis: 0 for axis in mesh_shape})
    return {
        path: {"shape": list(x.shape), "spec": repr(spec), "local_shape": list(piece.shape)}
        for (path, x), (_, spec), (_, piece) in zip(leaves_with_paths(meta), leaves_with_paths(specs),
                                                    leaves_with_paths(local))
    }


def describe(params, rules: Rules, mesh, file=None) -> None:
    """Print a table of every leaf (full shape, spec, local shape, local bytes) and the bytes per rank.

    `mesh` is a `sharding.Mesh` or a mesh shape such as `{"tp": 8}`.
    """
    mesh_shape = getattr(mesh, "shape", mesh)
    rows = layout(params, rules, mesh_shape)
    sizes = {path: x.element_size() for path, x in leaves_with_paths(params)}
    local_bytes = {path: sizes[path] * math.prod(row["local_shape"]) for path, row in rows.items()}
    width = max(len(path) for path in rows)
    lines = [f"{'leaf':<{width}}  {'shape':<14}  {'spec':<46}  {'local shape':<14}  {'local bytes':>13}"]
    for path, row in rows.items():
        lines.append(f"{path:<{width}}  {_dims(row['shape']):<14}  {row['spec']:<46}  "
                     f"{_dims(row['local_shape']):<14}  {local_bytes[path]:>13,}")
    total = sum(local_bytes.values())
    lines.append(f"{len(rows)} leaves on mesh {dict(mesh_shape)}: {total:,} bytes ({total / 2**30:.2f} GiB) per rank")
    print("\n".join(lines), file=file or sys.stdout)


def _dims(shape: list[int]) -> str:
    return "x".join(map(str, shape))
