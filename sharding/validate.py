"""Tensor-parallel checks of a config, run before any process starts: a named error, not a crash in forward."""

from __future__ import annotations

from mistral_fn.config import MistralConfig
from mistral_fn.errors import ConfigError
from sharding.spec import padded_vocab_size


def validate_tp(config: MistralConfig, tp: int, make_vocab_size_divisible_by: int = 1,
                padded_vocab: int | None = None) -> int:
    """Raise `ConfigError` unless Megatron can split `config` over `tp` ranks; return the padded vocab.

    Heads, kv heads (Megatron's query groups) and the ffn width must divide by `tp`; so must the padded
    vocab, which is `padded_vocab_size(vocab, tp, make_vocab_size_divisible_by)` unless given
    explicitly (ModelLink's `--padded-vocab-size`, or the row count of a checkpoint's embedding).
    """
    padded = padded_vocab_size(config.vocab_size, tp, make_vocab_size_divisible_by)
    if padded_vocab is not None:
        if padded_vocab < config.vocab_size:
            raise ConfigError(f"padded vocab {padded_vocab} is smaller than vocab_size={config.vocab_size}")
        padded = padded_vocab
    for name, value in (("n_heads", config.n_heads), ("n_kv_heads", config.n_kv_heads), ("ffn_dim", config.ffn_dim),
                        ("padded vocab", padded)):
        if value % tp:
            raise ConfigError(f"{name}={value} is not divisible by tensor-parallel size tp={tp}")
    return padded
