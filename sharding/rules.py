"""The Mistral rule table (ordered `(regex over leaf paths, spec)` pairs) and `match`, which turns it into
a tree of specs. A regex must match a whole path (`re.fullmatch`); every leaf matches exactly one rule.
"""

from __future__ import annotations

import re
from typing import Sequence

from mistral_fn.config import MistralConfig
from mistral_fn.errors import ConfigError
from mistral_fn.params import map_with_path
from sharding.spec import P, PartitionSpec

Rules = Sequence[tuple[str, PartitionSpec]]


def mistral_rules(config: MistralConfig, make_vocab_size_divisible_by: int = 1) -> list[tuple[str, PartitionSpec]]:
    """Megatron's tensor-parallel split of the Mistral tree (weights are `[out, in]`):

    column-parallel (split dim 0): wq, wk, wv, w_gate, w_up -- rank t owns query heads
    `[t*H/tp, (t+1)*H/tp)`, kv heads `[t*KV/tp, (t+1)*KV/tp)` and ffn rows `[t*F/tp, (t+1)*F/tp)`;
    row-parallel (split dim 1): wo, w_down; vocab-parallel rows, padded to a multiple of
    `make_vocab_size_divisible_by * tp`: embed, output; replicated: the norms. The attention splits are
    in whole heads (`head_dim`), so `shard` refuses a tp that does not divide the query or kv heads.
    """
    vocab = P("tp", None, unpadded=config.vocab_size, divisible_by=make_vocab_size_divisible_by)
    hd = config.head_dim
    return [
        (r"embed", vocab),
        (r"layers/\d+/(attn|mlp)_norm", P(None)),
        (r"layers/\d+/attn/(wq|wk|wv)", P("tp", None, head_dim=hd)),
        (r"layers/\d+/attn/wo", P(None, "tp", head_dim=hd)),
        (r"layers/\d+/mlp/(w_gate|w_up)", P("tp", None)),
        (r"layers/\d+/mlp/w_down", P(None, "tp")),
        (r"norm", P(None)),
        (r"output", vocab),
    ]


def _hit(path: str, rules: Rules) -> tuple[str, PartitionSpec] | None:
    """The one `(pattern, spec)` whose regex matches all of `path`, None when none does."""
    hits = [(pattern, spec) for pattern, spec in rules if re.fullmatch(pattern, path)]
    if len(hits) > 1:
        raise ConfigError(f"{path}: matches {len(hits)} sharding rules ({', '.join(p for p, _ in hits)}); expected one")
    return hits[0] if hits else None


def _checked(path: str, hit: tuple[str, PartitionSpec], rank: int) -> PartitionSpec:
    pattern, spec = hit
    if len(spec.axes) != rank:
        raise ConfigError(f"{path}: rule {pattern!r} gives {spec} for {len(spec.axes)} dims but the leaf has {rank}")
    return spec


def spec_for(path: str, rank: int, rules: Rules) -> PartitionSpec:
    """The spec of the one rule whose regex matches all of `path`; `rank` is the leaf's number of dims."""
    hit = _hit(path, rules)
    if hit is None:
        raise ConfigError(f"{path}: no sharding rule matches this leaf")
    return _checked(path, hit, rank)


def match(params, rules: Rules):
    """A tree shaped like `params` holding each leaf's `PartitionSpec` (leaves: tensors on any device, `meta` too)."""
    return map_with_path(lambda path, leaf: spec_for(path, leaf.dim(), rules), params)


def followed_param(path: str, rules: Rules) -> tuple[str, PartitionSpec] | None:
    """`(param path, spec)` for a train-state leaf that follows a parameter, else None.

    The param path is the longest suffix of `path` (cut at `/`) that a rule matches, as EasyLM matches
    optimizer state: `opt_state/mu/layers/0/attn/wq` follows `layers/0/attn/wq`; `opt_state/count` and
    `step` follow nothing."""
    found = _follow(path, rules)
    return None if found is None else (found[0], found[1][1])


def _follow(path: str, rules: Rules) -> tuple[str, tuple[str, PartitionSpec]] | None:
    parts = path.split("/")
    for i in range(len(parts)):
        suffix = "/".join(parts[i:])
        hit = _hit(suffix, rules)
        if hit is not None:
            return suffix, hit
    return None


def state_specs(state, rules: Rules):
    """Specs for a whole train state (`train.TrainState`, or any tree such as `{"train": state, ...}`):
    leaves that follow a parameter (`followed_param`: params, float32 masters, moments) get its spec,
    every other leaf (counters, loss scale, RNG state) is replicated. For states whose leaves have the
    param's shape, i.e. not the 1-D blocks of the distributed optimizer (see `sharding.train_state`)."""

    def spec(path: str, leaf) -> PartitionSpec:
        found = _follow(path, rules)
        return P(*[None] * leaf.dim()) if found is None else _checked(path, found[1], leaf.dim())

    return map_with_path(spec, state)
