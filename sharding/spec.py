"""Partition specs: which tensor dimension is split over which mesh axis, and Megatron vocab padding."""

from __future__ import annotations

import dataclasses

from mistral_fn.errors import ConfigError


def padded_vocab_size(vocab: int, tp: int, divisible_by: int = 1) -> int:
    """Megatron's `_vocab_size_with_padding`: the smallest multiple of `divisible_by * tp` that is >= `vocab`.

    Megatron's default divisor is 128; ModelLink's converter and Mistral scripts pass 1
    (32000 rows stay 32000 for tp in 1, 2, 4, 8).
    """
    for name, value in (("vocab", vocab), ("tp", tp), ("make_vocab_size_divisible_by", divisible_by)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    multiple = divisible_by * tp
    return -(-vocab // multiple) * multiple


@dataclasses.dataclass(frozen=True, init=False)
class PartitionSpec:
    """How one leaf lies on a mesh: per tensor dim, the mesh axis it is split over (None = whole).

    `P("tp", None)` splits dim 0 in equal contiguous blocks over the `tp` axis (rank t holds block t) and
    replicates the leaf over every other axis. `unpadded`/`divisible_by` mark a vocab dim: before
    splitting, its `unpadded` rows are padded to `padded_vocab_size(unpadded, mesh[axis], divisible_by)`
    with copies of the last real row (as Megatron/ModelLink do); `unshard` drops them again.
    `head_dim` makes the split dim a stack of attention heads of `head_dim` rows: every rank must get
    whole heads, so the head count (not only the row count) must divide by the mesh axis.
    """

    axes: tuple[str | None, ...]
    unpadded: int | None = None
    divisible_by: int = 1
    head_dim: int | None = None

    def __init__(self, *axes: str | None, unpadded: int | None = None, divisible_by: int = 1,
                 head_dim: int | None = None):
        named = [a for a in axes if a is not None]
        if any(not isinstance(a, str) for a in named):
            raise ConfigError(f"partition spec axes must be mesh axis names or None, got {axes!r}")
        if len(set(named)) != len(named):
            raise ConfigError(f"partition spec {axes!r} splits two dims over the same mesh axis")
        if unpadded is None and divisible_by != 1:
            raise ConfigError(f"partition spec {axes!r}: divisible_by={divisible_by} needs the unpadded size")
        if unpadded is not None:
            if len(named) != 1:
                raise ConfigError(f"a padded partition spec must split exactly one dim, got {axes!r}")
            padded_vocab_size(unpadded, 1, divisible_by)  # validates both numbers
        if head_dim is not None:
            if len(named) != 1 or unpadded is not None:
                raise ConfigError(f"a partition spec in heads must split exactly one unpadded dim, got {axes!r}")
            if not isinstance(head_dim, int) or isinstance(head_dim, bool) or head_dim <= 0:
                raise ConfigError(f"partition spec {axes!r}: head_dim must be a positive integer, got {head_dim!r}")
        object.__setattr__(self, "axes", tuple(axes))
        object.__setattr__(self, "unpadded", unpadded)
        object.__setattr__(self, "divisible_by", divisible_by)
        object.__setattr__(self, "head_dim", head_dim)

    def __repr__(self):
        pad = f", unpadded={self.unpadded}, divisible_by={self.divisible_by}" if self.unpadded is not None else ""
        heads = f", head_dim={self.head_dim}" if self.head_dim is not None else ""
        return f"P({', '.join(map(repr, self.axes))}{pad}{heads})"

    def split_dim(self, axis: str) -> int | None:
        """The tensor dim split over mesh `axis`, or None when the leaf is replicated along it."""
        return self.axes.index(axis) if axis in self.axes else None

    def padded_size(self, mesh_shape: dict[str, int]) -> int | None:
        """Length of the padded dim on `mesh_shape` (None when the spec pads nothing)."""
        if self.unpadded is None:
            return None
        axis = next(a for a in self.axes if a is not None)
        return padded_vocab_size(self.unpadded, mesh_shape[axis], self.divisible_by)


P = PartitionSpec
