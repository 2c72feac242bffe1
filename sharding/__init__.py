"""Tensor-parallel sharding of the Mistral pytree: meshes, partition specs, the rule table, shard/unshard."""

from sharding.rules import match, mistral_rules
from sharding.shard import shard, unshard
from sharding.spec import P, PartitionSpec, padded_vocab_size
from sharding.validate import validate_tp

__all__ = ["P", "PartitionSpec", "padded_vocab_size", "mistral_rules", "match", "shard", "unshard", "validate_tp"]
