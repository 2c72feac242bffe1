"""Model + tokenizer loading shared by the inference scripts (generate, evaluate).

`load_any` is the one place that knows checkpoint formats: today an HF directory; the Megatron
(ModelLink TP x PP) and native training formats plug in here when `checkpoints` provides them.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

import checkpoints
from mistral_fn.config import MistralConfig
from mistral_fn.errors import CheckpointError, InputError
from mistral_fn.tokenizer import Tokenizer, load_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str) -> torch.dtype | None:
    """A `--dtype` flag value (empty: keep the stored dtype)."""
    if not name:
        return None
    if name not in DTYPES:
        raise InputError(f"--dtype={name!r}: expected one of {', '.join(DTYPES)}")
    return DTYPES[name]


def load_any(path: str | os.PathLike, dtype: torch.dtype | None = None, device="cpu") -> tuple[MistralConfig, dict]:
    """`(config, params)` from a checkpoint directory of any supported format (today: HF safetensors)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if (path / "config.json").is_file():
        return checkpoints.load_hf(path, dtype=dtype, device=device)
    raise CheckpointError(f"{path}: unrecognised checkpoint format (expected an HF directory with config.json)")


def load_model_and_tokenizer(load: str, tokenizer_model: str = "", dtype: torch.dtype | None = None,
                             device="cpu") -> tuple[MistralConfig, dict, Tokenizer]:
    """Checkpoint and tokenizer (`tokenizer_model`, else the checkpoint's own `tokenizer.model`, else
    the default Mistral v1 model), checked to agree on the vocabulary size."""
    if not load:
        raise InputError("--load is required (a checkpoint directory)")
    config, params = load_any(load, dtype=dtype, device=device)
    source = tokenizer_model or (load if (Path(load) / "tokenizer.model").is_file() else None)
    tokenizer = load_tokenizer(source)
    if tokenizer.vocab_size != config.vocab_size:
        raise CheckpointError(f"{load}: the checkpoint's vocabulary has {config.vocab_size} tokens but the tokenizer "
                              f"{tokenizer.model_file} has {tokenizer.vocab_size}")
    return config, params, tokenizer
