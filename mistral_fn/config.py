"""`MistralConfig`: a frozen dataclass, a presets table, and the HF `config.json` mapping."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

from mistral_fn.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class MistralConfig:
    """Shape and numerics of a Mistral decoder. Validated on construction.

    `head_dim` defaults to `dim // n_heads`; `sliding_window=None` means full causal attention,
    otherwise each query sees the `sliding_window` most recent keys including itself (HF semantics).
    """

    vocab_size: int = 32000
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 8
    ffn_dim: int = 14336
    head_dim: int | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 1e6
    sliding_window: int | None = None
    max_seq_len: int = 32768
    bos_id: int = 1
    eos_id: int = 2

    def __post_init__(self):
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "head_dim", "max_seq_len"):
            value = getattr(self, name)
            if name == "head_dim" and value is None:
                if self.dim % self.n_heads:
                    raise ConfigError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}; set head_dim explicitly")
                object.__setattr__(self, "head_dim", self.dim // self.n_heads)
            elif not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if not self.norm_eps > 0:
            raise ConfigError(f"norm_eps must be > 0, got {self.norm_eps}")
        if not self.rope_theta > 0:
            raise ConfigError(f"rope_theta must be > 0, got {self.rope_theta}")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window <= 0):
            raise ConfigError(f"sliding_window must be None or a positive integer, got {self.sliding_window!r}")
        for name in ("bos_id", "eos_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise ConfigError(f"{name}={getattr(self, name)} is outside the vocabulary [0, {self.vocab_size})")

    @property
    def n_rep(self) -> int:
        """Query heads per key/value head (GQA group size)."""
        return self.n_heads // self.n_kv_heads

    def replace(self, **changes) -> "MistralConfig":
        return dataclasses.replace(self, **changes)

    # ---- presets -------------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str) -> "MistralConfig":
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
        return PRESETS[name]

    @classmethod
    def mistral_7b_v0_1(cls) -> "MistralConfig":
        return PRESETS["mistral-7b-v0.1"]

    @classmethod
    def mistral_7b_instruct_v0_2(cls) -> "MistralConfig":
        return PRESETS["mistral-7b-instruct-v0.2"]

    @classmethod
    def tiny(cls) -> "MistralConfig":
        return PRESETS["tiny"]

    # ---- HF config.json ------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, path_or_dict: str | os.PathLike | Mapping[str, Any]) -> "MistralConfig":
        """Read an HF Mistral config: a dict, a `config.json` path, or a model directory.

        Accepts `rope_theta` at the top level (hub checkpoints) or inside `rope_parameters`
        (transformers 5). Rope scaling, tied embeddings and non-SiLU activations are rejected. Any
        problem (not JSON, not an object, a missing field, a value of the wrong type) is one
        `ConfigError` naming the file and the HF field.
        """
        source, hf = _read_hf(path_or_dict)
        try:
            model_type = hf.get("model_type")
            if model_type != "mistral":
                raise ConfigError(f"unsupported model_type {model_type!r}; expected 'mistral'")
            rope = _hf_value(hf, "rope_parameters", dict, {})
            theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
            rope_type = rope.get("rope_type", "default")
            if rope_type != "default" or hf.get("rope_scaling"):
                raise ConfigError(f"rope scaling ({rope_type!r}, {hf.get('rope_scaling')!r}) is not supported")
            if hf.get("tie_word_embeddings", False):
                raise ConfigError("tie_word_embeddings=true is not supported (Mistral has an untied head)")
            if hf.get("hidden_act", "silu") != "silu":
                raise ConfigError(f"hidden_act={hf['hidden_act']!r} is not supported; expected 'silu'")
            fields = {name: _hf_value(hf, key, kind, default) for key, name, kind, default in _HF_FIELDS}
            fields["n_kv_heads"] = fields["n_kv_heads"] or fields["n_heads"]
            return cls(**fields, rope_theta=_number("rope_theta", theta),
                       bos_id=_token_id(hf, "bos_token_id", 1), eos_id=_token_id(hf, "eos_token_id", 2))
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    def to_hf(self, dtype: str | None = None) -> dict[str, Any]:
        """The transformers `config.json` dict. Writes the rope base both ways so old and new readers agree."""
        hf = {
            "architectures": ["MistralForCausalLM"],
            "model_type": "mistral",
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "intermediate_size": self.ffn_dim,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "sliding_window": self.sliding_window,
            "max_position_embeddings": self.max_seq_len,
            "bos_token_id": self.bos_id,
            "eos_token_id": self.eos_id,
            "tie_word_embeddings": False,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "use_cache": True,
        }
        if dtype is not None:
            hf["torch_dtype"] = dtype
        return hf


_REQUIRED = object()
# (HF key, MistralConfig field, type, default): the plain fields of `from_hf`.
_HF_FIELDS = (
    ("vocab_size", "vocab_size", int, _REQUIRED),
    ("hidden_size", "dim", int, _REQUIRED),
    ("num_hidden_layers", "n_layers", int, _REQUIRED),
    ("num_attention_heads", "n_heads", int, _REQUIRED),
    ("num_key_value_heads", "n_kv_heads", int, None),
    ("intermediate_size", "ffn_dim", int, _REQUIRED),
    ("head_dim", "head_dim", int, None),
    ("rms_norm_eps", "norm_eps", float, 1e-6),
    ("sliding_window", "sliding_window", int, None),
    ("max_position_embeddings", "max_seq_len", int, 32768),
)


def _read_hf(path_or_dict) -> tuple[str, dict]:
    """`(source for messages, the config dict)` from a dict, a `config.json` path or a model directory."""
    if isinstance(path_or_dict, Mapping):
        return "config dict", dict(path_or_dict)
    path = os.fspath(path_or_dict)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            hf = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such HF config file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the HF config ({e.strerror})") from None
    if not isinstance(hf, dict):
        raise ConfigError(f"{path}: expected a JSON object, got a JSON {type(hf).__name__}")
    return path, hf


def _hf_value(hf: dict, key: str, kind: type, default):
    """`hf[key]` checked to be a `kind` (int: positive, not bool; float: any JSON number), or `default`
    when absent or null."""
    value = hf.get(key)
    if value is None:
        if default is _REQUIRED:
            raise ConfigError(f"missing required key {key!r}")
        return default
    if kind is float:
        return _number(key, value)
    if kind is int and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
        raise ConfigError(f"{key}: expected a positive integer, got {value!r}")
    if not isinstance(value, kind):
        raise ConfigError(f"{key}: expected a JSON {'object' if kind is dict else kind.__name__}, got {value!r}")
    return value


def _number(key: str, value) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    return float(value)


def _token_id(hf: dict, key: str, default: int) -> int:
    """An HF token id field: an int, a list of ints (the first is used), or null/absent (`default`)."""
    value = hf.get(key)
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{key}: expected a token id (an integer or a list of them), got {hf[key]!r}")
    return value


PRESETS: dict[str, MistralConfig] = {
    # mistralai/Mistral-7B-v0.1: 4096-token sliding window, theta 1e4.
    "mistral-7b-v0.1": MistralConfig(rope_theta=1e4, sliding_window=4096),
    # mistralai/Mistral-7B-Instruct-v0.2: 32K context, theta 1e6, no window.
    "mistral-7b-instruct-v0.2": MistralConfig(rope_theta=1e6, sliding_window=None),
    # A Mistral-shaped toy (GQA 4/2, a window) for smoke runs, the quickstart and tests.
    "tiny": MistralConfig(
        vocab_size=32000, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=160,
        rope_theta=1e6, sliding_window=None, max_seq_len=2048,
    ),
}
