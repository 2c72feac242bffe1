"""Sharding of the Mistral pytree and its train state: meshes, partition specs, the rule table, shard/unshard,
resharding, and the process-group collectives the model takes as `tp` and the train step as `dp`."""

from sharding.collectives import GroupDP, GroupTP
from sharding.describe import describe, layout
from sharding.mesh import Mesh
from sharding.rules import followed_param, match, mistral_rules, state_specs
from sharding.shard import shard, unshard
from sharding.spec import P, PartitionSpec, padded_vocab_size
from sharding.train_state import StateLayout, as_tree, gather_state, reshard_state, scatter_state
from sharding.validate import validate_tp
from sharding.lora import with_lora_rules

__all__ = [
    "Mesh", "GroupTP", "GroupDP", "P", "PartitionSpec", "padded_vocab_size", "mistral_rules", "match", "shard",
    "unshard", "validate_tp", "describe", "layout", "followed_param", "state_specs", "StateLayout", "gather_state",
    "scatter_state", "reshard_state", "as_tree",
    "with_lora_rules",
]
