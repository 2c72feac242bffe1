"""`Architecture`: Megatron's architecture flags as a frozen value, and how they meet a model config.

Kept free of absl flag definitions so that library-like modules (`experiments.training`) can use it
without defining flags (several apps' modules are imported together in tests and notebooks).
"""

from __future__ import annotations

import dataclasses

from mistral_fn.config import MistralConfig
from mistral_fn.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Architecture:
    """Megatron's architecture flags (None: not given) and how they meet a model config."""

    num_layers: int | None = None
    hidden_size: int | None = None
    ffn_hidden_size: int | None = None
    num_attention_heads: int | None = None
    num_query_groups: int | None = None
    group_query_attention: bool | None = None
    max_position_embeddings: int | None = None
    rotary_base: float | None = None
    norm_epsilon: float | None = None
    sliding_window: int | None = None  # 0: full causal
    vocab_size: int | None = None

    def values(self) -> dict:
        """`MistralConfig` fields these flags set (the checked ones; `sliding_window` apart)."""
        kv = self.num_query_groups
        if self.group_query_attention is False and self.num_attention_heads is not None:
            kv = self.num_attention_heads  # Megatron ignores --num-query-groups without --group-query-attention
        fields = {"n_layers": self.num_layers, "dim": self.hidden_size, "ffn_dim": self.ffn_hidden_size,
                  "n_heads": self.num_attention_heads, "n_kv_heads": kv, "max_seq_len": self.max_position_embeddings,
                  "rope_theta": self.rotary_base, "norm_eps": self.norm_epsilon, "vocab_size": self.vocab_size}
        return {k: v for k, v in fields.items() if v is not None}

    def define(self, base: MistralConfig) -> MistralConfig:
        """A new model: `base` (a preset) with every given flag applied."""
        changes = self.values()
        if "dim" in changes or "n_heads" in changes:
            changes["head_dim"] = None
        return self._windowed(base.replace(**changes))

    def check(self, loaded: MistralConfig, source: str) -> MistralConfig:
        """`loaded` (a checkpoint's config) if every given flag agrees with it, with `--sliding_window` applied."""
        for field, value in self.values().items():
            if getattr(loaded, field) != value:
                flag = _FLAG_OF[field]
                raise ConfigError(f"--{flag}={value} does not match {source}, which has {field}={getattr(loaded, field)}; "
                                  f"drop --{flag} or load a matching checkpoint")
        return self._windowed(loaded)

    def _windowed(self, config: MistralConfig) -> MistralConfig:
        if self.sliding_window is None:
            return config
        return config.replace(sliding_window=self.sliding_window or None)


_FLAG_OF = {"n_layers": "num_layers", "dim": "hidden_size", "ffn_dim": "ffn_hidden_size",
            "n_heads": "num_attention_heads", "n_kv_heads": "num_query_groups",
            "max_seq_len": "max_position_embeddings", "rope_theta": "rotary_base", "norm_eps": "norm_epsilon",
            "vocab_size": "vocab_size"}
