"""Resharding a train state between layouts: any tp x dp, with or without the distributed optimizer (ZeRO-1).

States are handled as flat dicts `{path: tensor}` (the names of a native checkpoint's tensors,
`dict(leaves_with_paths(state))`), so a caller may reshard all leaves at once or a few at a time. On a
rank, `train.TrainState` has:

    params/<p>        the rank's tp shard of parameter <p> (ZeRO-1: in the compute dtype)
    master/<p>        ZeRO-1 with a separate float32 master: this dp rank's 1-D block (`zero.blocks`)
    opt_state/.../<p> optimizer leaves following <p> (`rules.followed_param`): tp shards (ZeRO-1: blocks)
    anything else     counters, loss scale: the same on every rank

under any common prefix (a checkpoint's `train/params/<p>`, `train/master/<p>`, ...). The canonical form,
which `gather_state` returns and `scatter_state` takes, is the state of one device without ZeRO:
`params/<p>` are the full master weights and the optimizer leaves are full too. Both
directions only move and cast values, so a state resharded there and back is bit-identical, except for
vocab padding rows: they are dropped and re-made as copies of the last real row (as `shard` does), which
changes nothing the model computes (their logits are -inf, their tokens never occur).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Mapping

import torch

from mistral_fn import zero
from mistral_fn.errors import ConfigError
from mistral_fn.params import map_with_path
from sharding.rules import Rules, followed_param
from sharding.shard import check_mesh, shard, unshard


@dataclasses.dataclass(frozen=True)
class StateLayout:
    """How a train state lies on a mesh: `mesh_shape` (`{"dp": .., "tp": ..}`; a missing axis has size 1),
    `distributed_optimizer` (ZeRO-1 over dp) and, with it, `compute_dtype`: the dtype the full params are
    kept in next to float32 master blocks (None: the params are the masters, no `master/` leaves)."""

    mesh_shape: Mapping[str, int]
    distributed_optimizer: bool = False
    compute_dtype: torch.dtype | None = None

    def __post_init__(self):
        check_mesh(self.mesh_shape)
        unknown = sorted(set(self.mesh_shape) - {"dp", "tp"})
        if unknown:
            raise ConfigError(f"a train-state layout has dp and tp axes only, got {unknown[0]!r}")
        # both axes, in the order of `sharding.Mesh` (dp before tp), whatever the caller wrote
        object.__setattr__(self, "mesh_shape", {a: self.mesh_shape.get(a, 1) for a in ("dp", "tp")})
        if self.compute_dtype is not None and not self.distributed_optimizer:
            raise ConfigError("a train-state layout keeps a compute dtype only with the distributed optimizer")

    def all_coords(self) -> list[dict[str, int]]:
        """Every rank's coordinates, in rank order (row-major over `mesh_shape`, as `sharding.Mesh`)."""
        axes = list(self.mesh_shape)
        return [dict(zip(axes, c)) for c in itertools.product(*(range(self.mesh_shape[a]) for a in axes))]


def gather_state(pieces: list, layout: StateLayout, rules: Rules) -> dict[str, torch.Tensor]:
    """The canonical full state from every rank's `{path: tensor}`: `pieces[d][t]` is the rank at dp
    coordinate d and tp coordinate t. Leaves that follow no parameter must be equal on every rank."""
    sizes = list(layout.mesh_shape.values())
    ranks = list(zip(layout.all_coords(), _flatten(pieces, sizes), strict=True))
    first = ranks[0][1]
    params_paths = {found[0]: path for path in first
                    if (found := followed_param(path, rules)) and _role(path, found[0])[1] == "params"}
    out = {}
    for path, x in first.items():
        found = followed_param(path, rules)
        if found is None:
            for coords, piece in ranks:
                if not torch.equal(piece[path], x):
                    raise ConfigError(f"{path}: differs between ranks {ranks[0][0]} and {coords}, but no rule "
                                      "shards it")
            out[path] = x
            continue
        param, spec = found
        prefix, role = _role(path, param)
        if not layout.distributed_optimizer or (role == "params" and f"{prefix}master/{param}" not in first):
            out[path] = unshard(nest([piece[path] for _, piece in ranks], sizes), spec, layout.mesh_shape)
        elif role != "params":  # dp blocks of each tp shard (ranks are dp-major), then the tp shards
            params_path = params_paths.get(param)
            if params_path is None:
                raise ConfigError(f"{path}: gathering its blocks needs the params leaf of {param} for its shape")
            tp = layout.mesh_shape["tp"]
            local = [torch.cat([piece[path] for c, piece in ranks if c["tp"] == t]).view(first[params_path].shape)
                     for t in range(tp)]
            out[params_path if role == "master" else path] = unshard(local, spec, {"tp": tp})
    return out


def scatter_state(full: Mapping[str, torch.Tensor], layout: StateLayout, coords: Mapping[str, int],
                  rules: Rules) -> dict[str, torch.Tensor]:
    """The `{path: tensor}` of the rank at `coords` from a canonical full state (fresh tensors)."""
    mesh = dict(layout.mesh_shape)
    check_mesh(mesh, coords)
    dp, rank = mesh["dp"], coords["dp"]
    out = {}
    for path, x in full.items():
        found = followed_param(path, rules)
        if found is None:
            out[path] = x.clone()
            continue
        param, spec = found
        prefix, role = _role(path, param)
        local = shard(x, spec, mesh, coords)
        if not layout.distributed_optimizer:
            out[path] = local
        elif role != "params":
            out[path] = zero.blocks([local], rank, dp)[0].clone()
        elif layout.compute_dtype in (None, local.dtype):
            out[path] = local
        else:
            out[path] = local.to(layout.compute_dtype)
            out[f"{prefix}master/{param}"] = zero.blocks([local], rank, dp)[0].clone()
    return out


def _role(path: str, param: str) -> tuple[str, str]:
    """`(prefix, role)` of a leaf that follows `param`: `path` is `prefix + role + "/" + param`, the role being
    the path component before the param's (`params`, `master`, or an optimizer's such as `mu`)."""
    head = path[:len(path) - len(param)].rstrip("/")
    prefix, _, role = head.rpartition("/")
    return prefix + "/" if prefix else "", role


def reshard_state(pieces: list, src: StateLayout, dst: StateLayout, rules: Rules) -> list:
    """Every rank's `{path: tensor}` under `dst` (`[d][t]`) from every rank's under `src` (`[d][t]`).

    Holds the whole state in memory once; for a 7B model, reshard a few paths at a time instead."""
    full = gather_state(pieces, src, rules)
    flat = [scatter_state(full, dst, coords, rules) for coords in dst.all_coords()]
    return nest(flat, list(dst.mesh_shape.values()))


def as_tree(flat: Mapping[str, torch.Tensor], template):
    """`template` (e.g. a fresh `init_train_state` for this rank's layout) with each leaf replaced by
    `flat[path]`; raises `ConfigError` naming a path that is missing, unexpected or of another shape/dtype."""
    expected = set()

    def take(path: str, ref: torch.Tensor) -> torch.Tensor:
        expected.add(path)
        if path not in flat:
            raise ConfigError(f"{path}: missing from the resharded state")
        x = flat[path]
        if x.shape != ref.shape or x.dtype != ref.dtype:
            raise ConfigError(f"{path}: resharded to {x.dtype} {tuple(x.shape)}, but this run expects "
                              f"{ref.dtype} {tuple(ref.shape)}")
        return x.to(ref.device)

    tree = map_with_path(take, template)
    extra = sorted(set(flat) - expected)
    if extra:
        raise ConfigError(f"{extra[0]}: in the resharded state but not in this run's state")
    return tree


def _flatten(nested, sizes: list[int]) -> list:
    if not sizes:
        return [nested]
    if not isinstance(nested, (list, tuple)) or len(nested) != sizes[0]:
        got = len(nested) if isinstance(nested, (list, tuple)) else type(nested).__name__
        raise ConfigError(f"expected a list of {sizes[0]} pieces along a mesh axis, got {got}")
    return [leaf for part in nested for leaf in _flatten(part, sizes[1:])]


def nest(flat: list, sizes: list[int]) -> list:
    """A row-major list of ranks as nested lists, one level per mesh axis (`[d][t]` for `[dp, tp]`)."""
    if len(sizes) <= 1:
        return flat
    step = math.prod(sizes[1:])
    return [nest(flat[i * step:(i + 1) * step], sizes[1:]) for i in range(sizes[0])]
