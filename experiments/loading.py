"""Model + tokenizer loading shared by the inference scripts (generate, evaluate), on one device or,
under `torchrun`, on a tensor-parallel mesh of all the processes (each keeps its Megatron shard).

`load_any` is the one place that knows checkpoint formats: an HF directory, a Megatron (ModelLink
legacy TP x PP) directory, or a native training checkpoint (its params only, reassembled from the TP
ranks of data-parallel rank 0).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

import checkpoints
import sharding
from checkpoints import megatron
from checkpoints.lazy import materialize
from mistral_fn.config import MistralConfig
from mistral_fn.errors import CheckpointError, InputError
from mistral_fn.params import cast, map_with_path, param_shapes, tree_map
from mistral_fn.tokenizer import Tokenizer, load_tokenizer

def load_any(path: str | os.PathLike, dtype: torch.dtype | None = None) -> tuple[MistralConfig, dict]:
    """`(config, full params)` on the CPU from a checkpoint directory of any supported format."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if (path / "config.json").is_file():
        return checkpoints.load_hf(path, dtype=dtype)
    if (path / megatron.TRACKER).is_file():
        config, _, lazy = megatron.read_megatron(path)
        return config, materialize(lazy, dtype)
    if checkpoints.is_native(path):
        return _load_native_params(path, dtype)
    raise CheckpointError(f"{path}: unrecognised checkpoint (expected an HF directory with config.json, a Megatron "
                          f"directory with {megatron.TRACKER}, or a native checkpoint)")


def _load_native_params(path: Path, dtype: torch.dtype | None) -> tuple[MistralConfig, dict]:
    """The `train/params` subtree of a native training checkpoint, unsharded from its `tp` ranks."""
    extra = checkpoints.read_metadata(path, rank=0)["extra"]
    if "config" not in extra:
        raise CheckpointError(f"{path}: native checkpoint metadata has no model config")
    config, tp = MistralConfig.from_hf(extra["config"]), int(extra.get("tp", 1))
    prefix = "train/params/"
    pieces = []
    for rank in range(tp):  # ranks are laid out (dp, tp) row-major: dp rank 0 holds tp ranks 0..tp-1
        stored = checkpoints.read_metadata(path, rank=rank)["tensors"]
        template = {name: torch.empty(shape, dtype=getattr(torch, kind)) for name, (kind, shape) in stored.items()}
        tensors, _ = checkpoints.load_native(path, template, rank=rank)
        pieces.append(map_with_path(lambda leaf, _: tensors[prefix + leaf], param_shapes(config),
                                    is_leaf=lambda x: isinstance(x, tuple)))
        del tensors
    rows = pieces[0]["embed"].shape[0]  # the padded vocab per rank gives Megatron's padding divisor
    params = sharding.unshard(pieces, sharding.match(pieces[0], sharding.mistral_rules(config, rows)), {"tp": tp})
    return config, cast(params, dtype) if dtype else params


def load_model_and_tokenizer(load: str, tokenizer_model: str = "", dtype: torch.dtype | None = None,
                             device_type: str | None = None) -> tuple[MistralConfig, dict, Tokenizer, sharding.Mesh]:
    """`(config, params, tokenizer, mesh)`: the checkpoint sharded over a `{"tp": WORLD_SIZE}` mesh (the
    whole model when run without torchrun) on the mesh's device, and the tokenizer (`tokenizer_model`,
    else the checkpoint's own `tokenizer.model`, else the default Mistral v1 model), checked to agree
    with the checkpoint on the vocabulary size."""
    if not load:
        raise InputError("--load is required (a checkpoint directory)")
    mesh = sharding.Mesh({"tp": int(os.environ.get("WORLD_SIZE", "1"))}, device_type=device_type)
    config, params = load_any(load, dtype=dtype)
    source = tokenizer_model or (load if (Path(load) / "tokenizer.model").is_file() else None)
    tokenizer = load_tokenizer(source)
    if tokenizer.vocab_size != config.vocab_size:
        raise CheckpointError(f"{load}: the checkpoint's vocabulary has {config.vocab_size} tokens but the tokenizer "
                              f"{tokenizer.model_file} has {tokenizer.vocab_size}")
    if mesh.size > 1:
        sharding.validate_tp(config, mesh.size)
        params = sharding.shard(params, sharding.match(params, sharding.mistral_rules(config)), mesh.shape, mesh.coords)
    return config, tree_map(lambda x: x.to(mesh.device), params), tokenizer, mesh


def load_for_inference(args) -> tuple[MistralConfig, dict, Tokenizer, sharding.Mesh]:
    """`load_model_and_tokenizer` for generate/evaluate's `megatron_flags.InferenceArgs`: the TP size must be
    the number of processes, the architecture flags must agree with the checkpoint (`--sliding_window`
    overrides its window), and `--seq_length` caps the model's context."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.tensor_model_parallel_size not in (None, world):
        raise InputError(f"--tensor_model_parallel_size={args.tensor_model_parallel_size}: inference is tensor-"
                         f"parallel over all WORLD_SIZE={world} processes; launch {args.tensor_model_parallel_size}")
    config, params, tokenizer, mesh = load_model_and_tokenizer(args.load, args.tokenizer or "", args.dtype, args.device)
    config = args.arch.check(config, args.load)
    if args.seq_length is not None:
        config = config.replace(max_seq_len=min(config.max_seq_len, args.seq_length))
    return config, params, tokenizer, mesh
