"""Model + tokenizer loading shared by the inference scripts (generate, evaluate), on one device or,
under `torchrun`, on a tensor-parallel mesh of all the processes (each keeps its Megatron shard).

Checkpoint formats are `checkpoints.load`'s business: an HF directory, a Megatron (ModelLink legacy
TP x PP) directory, or a native training checkpoint. LoRA adapters (`--lora_load`: a LoRA run's native
checkpoint or a PEFT directory) are merged into the loaded model once, on each rank's shards, so
inference runs the plain model: the same as loading the merged checkpoint.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import torch

import checkpoints
import sharding
from experiments.lora_args import LoraArgs
from mistral_fn import lora
from mistral_fn.config import MistralConfig
from mistral_fn.errors import CheckpointError, InputError
from mistral_fn.params import tree_map
from mistral_fn.tokenizer import Tokenizer, load_tokenizer


def load_model_and_tokenizer(load: str, tokenizer_model: str = "", dtype: torch.dtype | None = None,
                             device_type: str | None = None, rotary_base: float | None = None,
                             timeout: datetime.timedelta | None = None,
                             ) -> tuple[MistralConfig, dict, Tokenizer, sharding.Mesh]:
    """`(config, params, tokenizer, mesh)`: the checkpoint sharded over a `{"tp": WORLD_SIZE}` mesh (the
    whole model when run without torchrun) on the mesh's device, and the tokenizer (`tokenizer_model`,
    else the checkpoint's own `tokenizer.model`, else the default Mistral v1 model), checked to agree
    with the checkpoint on the vocabulary size. A ModelLink checkpoint's rope base comes from
    `rotary_base`, else from `tokenizer_model` when it is an HF model directory (see `checkpoints.load`).
    `timeout` bounds the mesh's waits for a peer (see `sharding.Mesh`)."""
    if not load:
        raise InputError("--load is required (a checkpoint directory)")
    mesh = sharding.Mesh({"tp": int(os.environ.get("WORLD_SIZE", "1"))}, device_type=device_type, timeout=timeout)
    hf_dir = tokenizer_model if tokenizer_model and Path(tokenizer_model).is_dir() else None
    config, params = checkpoints.load(load, dtype=dtype, rotary_base=rotary_base, hf_dir=hf_dir)
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
    config, params, tokenizer, mesh = load_model_and_tokenizer(args.load, args.tokenizer or "", args.dtype, args.device,
                                                               rotary_base=args.arch.rotary_base, timeout=args.timeout)
    config = args.arch.check(config, args.load)
    if args.lora.load:
        params = merge_adapters(params, config, args.lora, mesh)
    if args.seq_length is not None:
        config = config.replace(max_seq_len=min(config.max_seq_len, args.seq_length))
    return config, params, tokenizer, mesh


def merge_adapters(params, config: MistralConfig, args: LoraArgs, mesh: sharding.Mesh) -> dict:
    """`params` (this rank's shards on `mesh`) with the adapters of `args.load` merged in (`mf.lora.merge`),
    after checking the given `--lora_*` flags against them."""
    adapters = checkpoints.load_lora(args.load, config)
    args.check_adapters(adapters, args.load)
    if mesh.size > 1:
        adapters = sharding.shard(adapters, sharding.match(adapters, sharding.with_lora_rules(
            sharding.mistral_rules(config))), mesh.shape, mesh.coords)
    return lora.merge(params, tree_map(lambda x: x.to(mesh.device), adapters))
