"""Rule-table entries for `mistral_fn.lora` adapter trees, derived from the split of the weights they adapt,
as Megatron splits LoRA over TP ranks (PEFT's `LoraParallelLinear`). For a weight `W [out, in]`, `B [out, r]`
takes the split of W's dim 0 and `A [r, in]` that of W's dim 1:

    column-parallel targets (query_key_value, dense_h_to_4h, q/k/v/gate/up_proj): A whole, each B split like
        its leaf's rows (in whole heads for wq/wk/wv);
    row-parallel targets (dense, dense_4h_to_h, o_proj, down_proj): A split like the leaf's columns, B whole.

`mistral_fn.lora.apply` on these shards gives each rank its shard of the merged weights.
"""

from __future__ import annotations

from mistral_fn.errors import ConfigError
from mistral_fn.lora import TARGETS
from sharding.rules import Rules, spec_for
from sharding.spec import P, PartitionSpec


def _dim_spec(weight: PartitionSpec, dim: int) -> PartitionSpec:
    """The spec of a `[*, r]` (dim 0) or `[r, *]` (dim 1) factor that keeps `weight`'s split of `dim` only."""
    axis = weight.axes[dim]
    axes = (axis, None) if dim == 0 else (None, axis)
    return P(*axes, head_dim=weight.head_dim if axis is not None else None)


def with_lora_rules(rules: Rules) -> list[tuple[str, PartitionSpec]]:
    """`rules` (e.g. `mistral_rules(config)`) extended by one rule for every adapter leaf
    (`layers/i/<group>/<target>/a` and `.../<leaf>`): the table then matches both the parameter tree and
    adapter trees, so `match`, `shard` and `unshard` work on either."""
    extra = []
    for target, (group, leaves) in TARGETS.items():
        prefix = rf"layers/\d+/{group}/{target}/"
        weights = {leaf: spec_for(f"layers/0/{group}/{leaf}", 2, rules) for leaf in leaves}
        a_specs = {_dim_spec(w, 1) for w in weights.values()}
        if len(a_specs) != 1:
            raise ConfigError(f"lora target {target}: its leaves {', '.join(leaves)} split their inputs differently "
                              f"({', '.join(map(repr, weights.values()))}), so they cannot share one A")
        extra.append((prefix + "a", a_specs.pop()))
        extra += [(prefix + leaf, _dim_spec(w, 0)) for leaf, w in weights.items()]
    return [*rules, *extra]
