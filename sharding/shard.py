"""`shard` (full tree -> one mesh coordinate's local tree) and `unshard` (all local trees -> full tree).

Pure host-side functions: no communication, any device (`meta` included). `mesh_shape` and `coords`
are dicts keyed by axis name (`{"tp": 8}`, `{"tp": 3}`); a leaf is split in equal contiguous blocks
along the dims its `PartitionSpec` names, and replicated along the other axes.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch.utils import _pytree as pytree

from mistral_fn.errors import ConfigError
from mistral_fn.params import leaves_with_paths
from sharding.spec import PartitionSpec


def shard(tree, specs, mesh_shape: Mapping[str, int], coords: Mapping[str, int]):
    """The local tree of the rank at `coords`. Vocab dims are padded first (see `PartitionSpec`).

    Every returned leaf is a fresh contiguous tensor: nothing aliases `tree`, and `torch.save` of a
    leaf writes only the shard.
    """
    check_mesh(mesh_shape, coords)
    paths = _paired(tree, specs)
    local = [_shard_leaf(path, x, spec, mesh_shape, coords) for path, x, spec in paths]
    return pytree.tree_unflatten(local, pytree.tree_structure(specs))


def unshard(pieces, specs, mesh_shape: Mapping[str, int]):
    """The full tree from the local trees of every rank, vocab padding removed.

    `pieces` nests one list level per mesh axis, in `mesh_shape`'s order, each ordered by coordinate
    (`pieces[t]` for `{"tp": n}`; `pieces[d][t]` for `{"dp": .., "tp": ..}`). Along axes a leaf is
    replicated over, the piece at coordinate 0 is used.
    """
    check_mesh(mesh_shape)
    named = leaves_with_paths(specs)
    full = _gather(pieces, list(mesh_shape), mesh_shape, named)
    unpadded = [_unpad(path, x, spec, mesh_shape) for x, (path, spec) in zip(full, named)]
    return pytree.tree_unflatten(unpadded, pytree.tree_structure(specs))


def check_mesh(mesh_shape: Mapping[str, int], coords: Mapping[str, int] | None = None) -> None:
    """Raise `ConfigError` unless `mesh_shape` maps axis names to positive sizes and `coords` lies on it."""
    for axis, size in mesh_shape.items():
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
            raise ConfigError(f"mesh axis {axis!r} must have a positive integer size, got {size!r}")
    if coords is None:
        return
    if set(coords) != set(mesh_shape):
        raise ConfigError(f"coords {dict(coords)} must name exactly the mesh axes {list(mesh_shape)}")
    for axis, size in mesh_shape.items():
        if not isinstance(coords[axis], int) or not 0 <= coords[axis] < size:
            raise ConfigError(f"coordinate {axis}={coords[axis]!r} is outside the mesh axis of size {size}")


def _paired(tree, specs) -> list[tuple[str, torch.Tensor, PartitionSpec]]:
    leaves, spec_leaves = leaves_with_paths(tree), leaves_with_paths(specs)
    if [p for p, _ in leaves] != [p for p, _ in spec_leaves]:
        extra = sorted({p for p, _ in leaves} ^ {p for p, _ in spec_leaves})
        raise ConfigError(f"the tree and its specs have different leaves (first difference: {extra[:1] or 'order'})")
    return [(path, x, spec) for (path, x), (_, spec) in zip(leaves, spec_leaves)]


def _shard_leaf(path: str, x: torch.Tensor, spec: PartitionSpec, mesh_shape, coords) -> torch.Tensor:
    if len(spec.axes) != x.dim():
        raise ConfigError(f"{path}: spec {spec} has {len(spec.axes)} dims but the leaf has shape {tuple(x.shape)}")
    for axis in spec.axes:
        if axis is not None and axis not in mesh_shape:
            raise ConfigError(f"{path}: spec {spec} names mesh axis {axis!r}, which the mesh {dict(mesh_shape)} lacks")
    x = _pad(path, x, spec, mesh_shape)
    for dim, axis in enumerate(spec.axes):
        if axis is None:
            continue
        n = mesh_shape[axis]
        if spec.head_dim is not None:
            _check_heads(path, x.shape[dim], dim, spec.head_dim, axis, n)
        if x.shape[dim] % n:
            raise ConfigError(f"{path}: dim {dim} of size {x.shape[dim]} is not divisible by mesh axis {axis}={n}")
        block = x.shape[dim] // n
        x = x.narrow(dim, coords[axis] * block, block)
    return x.clone(memory_format=torch.contiguous_format)


def _check_heads(path: str, size: int, dim: int, head_dim: int, axis: str, n: int) -> None:
    if size % head_dim:
        raise ConfigError(f"{path}: dim {dim} of size {size} is not a whole number of heads of head_dim={head_dim}")
    if (size // head_dim) % n:
        raise ConfigError(f"{path}: {size // head_dim} heads (dim {dim} of size {size}, head_dim={head_dim}) are not "
                          f"divisible by mesh axis {axis}={n}; a rank would hold part of a head")


def _pad(path: str, x: torch.Tensor, spec: PartitionSpec, mesh_shape) -> torch.Tensor:
    """`x` with its vocab dim padded by copies of the last real row (Megatron's converter rule)."""
    if spec.unpadded is None:
        return x
    dim = next(d for d, a in enumerate(spec.axes) if a is not None)
    if x.shape[dim] != spec.unpadded:
        raise ConfigError(f"{path}: dim {dim} has {x.shape[dim]} rows, expected the unpadded vocab {spec.unpadded}")
    extra = spec.padded_size(mesh_shape) - spec.unpadded
    if not extra:
        return x
    last = x.narrow(dim, spec.unpadded - 1, 1)
    return torch.cat([x, last.expand(*x.shape[:dim], extra, *x.shape[dim + 1:])], dim)


def _unpad(path: str, x: torch.Tensor, spec: PartitionSpec, mesh_shape) -> torch.Tensor:
    if spec.unpadded is None:
        return x
    dim = next(d for d, a in enumerate(spec.axes) if a is not None)
    if x.shape[dim] != spec.padded_size(mesh_shape):
        raise ConfigError(f"{path}: the pieces hold {x.shape[dim]} vocab rows, expected the padded "
                          f"{spec.padded_size(mesh_shape)} for vocab {spec.unpadded} on mesh {dict(mesh_shape)}")
    return x.narrow(dim, 0, spec.unpadded).clone(memory_format=torch.contiguous_format)


def _gather(nested, axes: list[str], mesh_shape, named) -> list[torch.Tensor]:
    """Full-so-far leaves (in `named` order) from `nested` pieces over `axes`, the outermost first."""
    if not axes:
        leaves = leaves_with_paths(nested)
        if [p for p, _ in leaves] != [p for p, _ in named]:
            raise ConfigError("a piece's leaves differ from the specs' leaves; pieces must be trees shaped like specs")
        return [x for _, x in leaves]
    axis, n = axes[0], mesh_shape[axes[0]]
    if not isinstance(nested, (list, tuple)) or len(nested) != n:
        got = len(nested) if isinstance(nested, (list, tuple)) else type(nested).__name__
        raise ConfigError(f"expected a list of {n} pieces along mesh axis {axis!r}, got {got}")
    parts = [_gather(piece, axes[1:], mesh_shape, named) for piece in nested]
    out = []
    for i, (_, spec) in enumerate(named):
        dim = spec.split_dim(axis)
        out.append(parts[0][i] if dim is None else torch.cat([p[i] for p in parts], dim))
    return out
