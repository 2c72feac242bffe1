"""Tensor-parallel sharding of the Mistral pytree: meshes, partition specs, the rule table, shard/unshard,
and the process-group collectives the model takes as its `tp` argument."""

from sharding.collectives import GroupTP
from sharding.describe import describe, layout
from sharding.mesh import Mesh
from sharding.rules import match, mistral_rules
from sharding.shard import shard, unshard
from sharding.spec import P, PartitionSpec, padded_vocab_size
from sharding.validate import validate_tp

__all__ = [
    "Mesh", "GroupTP", "P", "PartitionSpec", "padded_vocab_size", "mistral_rules", "match", "shard", "unshard",
    "validate_tp", "describe", "layout",
]
