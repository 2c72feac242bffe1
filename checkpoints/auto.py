"""One loader for every checkpoint format: detect a directory's format, open it lazily, or load it.

    config, params = checkpoints.load("model_from_hf/Mistral-7B-Instruct-v0.2", dtype=torch.bfloat16)
    config, params = checkpoints.load("model_weights/Mistral-7B-tp8-pp1", rotary_base=1e6)   # ModelLink files
    config, params = checkpoints.load("ckpt", hf_dir="model_from_hf/Mistral-7B-Instruct-v0.2")  # Megatron or native

`load_lora` reads LoRA adapters the same way: a LoRA run's native checkpoint or a PEFT adapter directory.

Formats: an HF directory (`config.json` + safetensors), a Megatron/ModelLink directory
(`latest_checkpointed_iteration.txt`), a native training checkpoint (a root with `latest` or an owner
file, or one `iter_*` directory: its model parameters). A directory that looks like two formats at
once is refused rather than guessed. ModelLink's Megatron files carry no rope base: it comes from
`rotary_base` if given, else from `hf_dir`'s `config.json` (apps pass `--rotary-base` and
`--tokenizer-name-or-path`, which in ModelLink's scripts is the HF model directory).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from checkpoints import native
from checkpoints.hf import lazy_hf
from checkpoints.lazy import materialize
from checkpoints.megatron import TRACKER, read_megatron
from checkpoints.native_params import read_native_lora, read_native_params
from checkpoints.peft import CONFIG_FILE, load_peft
from mistral_fn.config import MistralConfig
from mistral_fn.errors import CheckpointError
from mistral_fn.lora import LoraTree
from mistral_fn.params import cast

FORMATS = ("hf", "megatron", "native")


def detect_format(path: str | os.PathLike) -> str:
    """"hf", "megatron" or "native" for a checkpoint directory; `CheckpointError` for anything else."""
    path = Path(path)
    if path.is_file():
        raise CheckpointError(f"{path}: is a file; expected a checkpoint directory")
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    found = [fmt for fmt, present in (("hf", (path / "config.json").is_file()), ("megatron", (path / TRACKER).is_file()),
                                       ("native", native.is_native(path))) if present]
    if len(found) > 1:
        raise CheckpointError(f"{path}: looks like two checkpoint formats at once ({found[0]} and {found[1]}); "
                              "refusing to guess which one to read")
    if not found:
        raise CheckpointError(f"{path}: unrecognised checkpoint (expected an HF directory with config.json, a "
                              f"Megatron directory with {TRACKER}, or a native checkpoint)")
    return found[0]


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """An opened checkpoint: its format, model config, lazy params (`LazyTensor` leaves, full and
    unsharded) and iteration (Megatron: the stored one, "release" possible; native: the step; HF: None)."""

    format: str
    config: MistralConfig
    params: dict
    iteration: int | str | None


def open_checkpoint(path: str | os.PathLike, fmt: str | None = None, *, rotary_base: float | None = None,
                    hf_dir: str | os.PathLike | None = None) -> Checkpoint:
    """The checkpoint at `path`, lazily (`fmt` None: detected). `rotary_base` / `hf_dir` supply what
    Megatron args lack (see `checkpoints.megatron.config_from_args`); other formats carry their own
    config and ignore them."""
    fmt = fmt or detect_format(path)
    if fmt == "hf":
        config, params = lazy_hf(path)
        return Checkpoint(fmt, config, params, None)
    if fmt == "megatron":
        config, ckpt, params = read_megatron(path, hf_dir, rotary_base=rotary_base)
        return Checkpoint(fmt, config, params, ckpt.iteration)
    if fmt == "native":
        config, step, params = read_native_params(path)
        return Checkpoint(fmt, config, params, step)
    raise CheckpointError(f"{path}: unknown checkpoint format {fmt!r}; expected one of {', '.join(FORMATS)}")


def load(path: str | os.PathLike, dtype: torch.dtype | None = None, *, rotary_base: float | None = None,
         hf_dir: str | os.PathLike | None = None, device="cpu") -> tuple[MistralConfig, dict]:
    """`(config, full params)` of a checkpoint directory of any format, each tensor read, cast to `dtype`
    (None: as stored; float16 is range-checked) and moved to `device` one at a time."""
    ckpt = open_checkpoint(path, rotary_base=rotary_base, hf_dir=hf_dir)
    return ckpt.config, materialize(ckpt.params, dtype, device)


# Fields that fix the shapes of a model's adapters (`mistral_fn.params.param_shapes`).
_ADAPTER_FIELDS = ("n_layers", "dim", "ffn_dim", "n_heads", "n_kv_heads", "head_dim")


def load_lora(path: str | os.PathLike, config: MistralConfig, dtype: torch.dtype | None = None) -> LoraTree:
    """The full adapters at `path` for a base model of `config`: a PEFT adapter directory
    (`adapter_config.json`; targets are PEFT's module names) or a LoRA run's native checkpoint (a root
    or one `iter_*` directory; targets as trained). Tensors as stored unless `dtype`. Adapters made for
    another model shape are a `CheckpointError` naming the field."""
    path = Path(path)
    if (path / CONFIG_FILE).is_file():
        return load_peft(path, config, dtype)
    if not path.is_dir() or not native.is_native(path):
        raise CheckpointError(f"{path}: not LoRA adapters (expected a PEFT directory with {CONFIG_FILE} or a "
                              "native checkpoint of a LoRA training run)")
    trained_on, _, tree = read_native_lora(path)
    for field in _ADAPTER_FIELDS:
        if getattr(trained_on, field) != getattr(config, field):
            raise CheckpointError(f"{path}: adapters for a model with {field}={getattr(trained_on, field)}, but the "
                                  f"base model has {field}={getattr(config, field)}")
    return tree if dtype is None else cast(tree, dtype)
