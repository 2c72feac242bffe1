"""Rule-table entries for `mistral_fn.lora` adapter trees, as Megatron splits LoRA over TP ranks (PEFT's
`LoraParallelLinear`):

    column-parallel targets (query_key_value, dense_h_to_4h, q/k/v/gate/up_proj): A whole, each B split
        like its leaf's rows (`P("tp", None)`), so rank t holds the B rows of its heads / ffn rows;
    row-parallel targets (dense, dense_4h_to_h, o_proj, down_proj): A split like the leaf's columns
        (`P(None, "tp")`), B whole.

`mistral_fn.lora.apply` on these shards gives each rank its shard of the merged weights.
"""

from __future__ import annotations

import re

from mistral_fn.lora import TARGETS
from mistral_fn.params import TP_SPLIT_DIMS
from sharding.rules import Rules
from sharding.spec import P, PartitionSpec


def lora_rules() -> list[tuple[str, PartitionSpec]]:
    """One rule for each target's A and one for its B leaves (paths `layers/i/<group>/<target>/<name>`)."""
    rules = []
    for target, (group, leaves) in TARGETS.items():
        prefix = rf"layers/\d+/{group}/{target}/"
        column = TP_SPLIT_DIMS[leaves[0]] == 0
        rules.append((prefix + "a", P(None, None) if column else P(None, "tp")))
        rules.append((prefix + f"({'|'.join(map(re.escape, leaves))})", P("tp", None) if column else P(None, None)))
    return rules


def with_lora_rules(rules: Rules) -> list[tuple[str, PartitionSpec]]:
    """`rules` (e.g. `mistral_rules(config)`) extended by `lora_rules()`: the table then matches both the
    parameter tree and adapter trees, so `match`, `shard` and `unshard` work on either."""
    return [*rules, *lora_rules()]
