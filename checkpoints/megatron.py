"""Megatron-LM legacy checkpoints as ModelLink writes them for Mistral, to and from the parameter pytree.

Layout (shared/megatron_formats.md sections 1-3)::

    <dir>/latest_checkpointed_iteration.txt        "1" (no newline), or "release"; written last
    <dir>/iter_0000001/mp_rank_TT[_PPP]/model_optim_rng.pt
        {"args": Namespace, "checkpoint_version": 3.0, "iteration": 1,
         "num_floating_point_operations_so_far": 0,
         "model": {"language_model": {"embedding": {"word_embeddings": {"weight"}},   first stage
                                      "encoder": {"layers.{j}.<key>": ..., "final_norm.weight"},
                                      "output_layer": {"weight"}}}}                     last stage

A rank's tensors are our TP shards (`sharding.shard` with `sharding.mistral_rules`) renamed by
`LAYER_KEYS` and fused per rank by `TRANSFORMS`: QKV grouped per query group `[ng/T, (r+2)*hd, D]`, and
`dense_h_to_4h = [gate_t; up_t]`. Layer `j` of stage `p` is global layer `p*L/PP + j`. Writing reads
one layer at a time per rank; reading returns a lazy tree that opens the rank files per tensor.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path
from typing import Callable

import torch

import sharding
from mistral_fn.atomic import atomic_dir
from checkpoints.lazy import LazyTensor, materialize
from checkpoints.megatron_pickle import ModelType, load_pt, save_pt
from mistral_fn.config import MistralConfig
from mistral_fn.errors import CheckpointError, ConfigError
from mistral_fn.params import cast, get_path, init_params, leaves_with_paths, map_with_path

TRACKER = "latest_checkpointed_iteration.txt"
RANK_FILE = "model_optim_rng.pt"
CHECKPOINT_VERSION = 3.0
CONVERTER_ITERATION = 1  # ModelLink's HF loader: "'0', 'release' don't work"

# ---- the two tables: names, and reversible per-rank transforms ----------------------------------

# Encoder key of a layer -> the layer leaves it holds, in fusing order.
LAYER_KEYS = {
    "input_norm.weight": ("attn_norm",),
    "self_attention.query_key_value.weight": ("attn/wq", "attn/wk", "attn/wv"),
    "self_attention.dense.weight": ("attn/wo",),
    "post_attention_norm.weight": ("mlp_norm",),
    "mlp.dense_h_to_4h.weight": ("mlp/w_gate", "mlp/w_up"),
    "mlp.dense_4h_to_h.weight": ("mlp/w_down",),
}
# Top-level leaf -> key path inside `model` (list: nested dict keys).
TOP_KEYS = {
    "embed": ("language_model", "embedding", "word_embeddings", "weight"),
    "norm": ("language_model", "encoder", "final_norm.weight"),
    "output": ("language_model", "output_layer", "weight"),
}


def fuse_qkv(pieces, config: MistralConfig) -> torch.Tensor:
    """One rank's QKV `[g*(r+2)*hd, D]` from its `(wq [g*r*hd, D], wk [g*hd, D], wv [g*hd, D])`:
    for each of its g query groups, the group's r query heads, then its K head, then its V head."""
    wq, wk, wv = pieces
    hd, dim = config.head_dim, wq.shape[1]
    groups = wk.shape[0] // hd
    return torch.cat([wq.view(groups, -1, dim), wk.view(groups, hd, dim), wv.view(groups, hd, dim)], 1).reshape(-1, dim)


def split_qkv(qkv: torch.Tensor, config: MistralConfig) -> tuple[torch.Tensor, ...]:
    """Inverse of `fuse_qkv`: view `[g, r+2, hd, D]`; Q = `[:, :r]`, K = `[:, r]`, V = `[:, r+1]`."""
    r, dim = config.n_rep, qkv.shape[1]
    x = qkv.view(-1, r + 2, config.head_dim, dim)
    return x[:, :r].reshape(-1, dim), x[:, r].reshape(-1, dim), x[:, r + 1].reshape(-1, dim)


def fuse_gate_up(pieces, config: MistralConfig) -> torch.Tensor:
    """One rank's `dense_h_to_4h [2F/T, D]` = `[gate_t; up_t]` (not a slice of the T=1 tensor)."""
    return torch.cat(pieces, 0)


def split_gate_up(fc1: torch.Tensor, config: MistralConfig) -> tuple[torch.Tensor, ...]:
    return tuple(fc1.chunk(2, 0))


def _single(pieces, config):
    return pieces[0]


def _unit(x, config):
    return (x,)


# Encoder key -> (fuse, split) for one rank's pieces; the keys not listed are stored as they are.
TRANSFORMS: dict[str, tuple[Callable, Callable]] = {
    "self_attention.query_key_value.weight": (fuse_qkv, split_qkv),
    "mlp.dense_h_to_4h.weight": (fuse_gate_up, split_gate_up),
}


def _transform(key: str | None) -> tuple[Callable, Callable]:
    return TRANSFORMS.get(key, (_single, _unit))


# ---- directory layout ----------------------------------------------------------------------------

def iteration_dirname(iteration: int | str) -> str:
    return "release" if iteration == "release" else f"iter_{iteration:07d}"


def rank_dirname(tp_rank: int, pp_rank: int, pp: int) -> str:
    return f"mp_rank_{tp_rank:02d}" if pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


def stage_layers(n_layers: int, pp: int, pp_rank: int) -> range:
    """Global indices of the layers stage `pp_rank` holds (stored there as local 0..L/PP-1)."""
    per = n_layers // pp
    return range(pp_rank * per, (pp_rank + 1) * per)


def read_tracker(ckpt_dir: Path) -> int | str:
    """The iteration named by `latest_checkpointed_iteration.txt` (an int > 0, or "release")."""
    tracker = ckpt_dir / TRACKER
    if not tracker.is_file():
        where = "no such directory" if not ckpt_dir.is_dir() else f"no {TRACKER}"
        raise CheckpointError(f"{ckpt_dir}: not a Megatron checkpoint ({where})")
    text = tracker.read_text(encoding="utf-8", errors="replace").strip()
    if text == "release":
        return text
    if not text.isdigit() or int(text) <= 0:
        raise CheckpointError(f"{tracker}: expected an iteration > 0 or 'release', got {text!r}")
    return int(text)


# ---- args ----------------------------------------------------------------------------------------

def megatron_args(config: MistralConfig, tp: int, pp: int, dtype: torch.dtype, divisible_by: int) -> argparse.Namespace:
    """The `args` a ModelLink run needs to load the files, plus `rotary_base` and `true_vocab_size` for the way back."""
    return argparse.Namespace(
        num_layers=config.n_layers,
        hidden_size=config.dim,
        ffn_hidden_size=config.ffn_dim,
        num_attention_heads=config.n_heads,
        num_query_groups=config.n_kv_heads,
        group_query_attention=config.n_kv_heads != config.n_heads,
        kv_channels=config.head_dim,
        padded_vocab_size=sharding.padded_vocab_size(config.vocab_size, tp, divisible_by),
        make_vocab_size_divisible_by=divisible_by,
        true_vocab_size=config.vocab_size,
        vocab_size=config.vocab_size,
        norm_epsilon=config.norm_eps,
        rotary_base=config.rope_theta,
        sliding_window=config.sliding_window,
        max_position_embeddings=config.max_seq_len,
        seq_length=config.max_seq_len,
        params_dtype=dtype,
        fp16=dtype == torch.float16,
        bf16=dtype == torch.bfloat16,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        untie_embeddings_and_output_weights=True,
        swiglu=True,
        normalization="RMSNorm",
        add_bias_linear=False,
        add_position_embedding=False,
        position_embedding_type="rope",
        use_rotary_position_embeddings=True,
        tokenizer_type="Llama2Tokenizer",
        model_type=ModelType.encoder_or_decoder,
        consumed_train_samples=0,
        consumed_valid_samples=0,
    )


# Fields a checkpoint's args and an HF config must agree on: (args name, config field).
_CHECKED_FIELDS = (("num_layers", "n_layers"), ("hidden_size", "dim"), ("ffn_hidden_size", "ffn_dim"),
                 ("num_attention_heads", "n_heads"), ("num_query_groups", "n_kv_heads"),
                 ("kv_channels", "head_dim"), ("true_vocab_size", "vocab_size"), ("rotary_base", "rope_theta"))
_REQUIRED_ARGS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                  "tensor_model_parallel_size", "pipeline_model_parallel_size", "padded_vocab_size")


def config_from_args(args, source: Path, hf: MistralConfig | None = None) -> MistralConfig:
    """The model config of a checkpoint's `args`; with `hf` (an HF config), check they agree and use it.

    `rotary_base` is not stored by ModelLink's converter: without it in the args, `hf` is required.
    """
    if not isinstance(args, argparse.Namespace):
        raise CheckpointError(f"{source}: 'args' is {type(args).__name__}, expected an argparse.Namespace")
    missing = [name for name in _REQUIRED_ARGS if getattr(args, name, None) is None]
    if missing:
        raise CheckpointError(f"{source}: args lack {missing[0]!r}")
    values = _args_values(args)
    if hf is not None:
        for name, field in _CHECKED_FIELDS:
            if values.get(field) is not None and values[field] != getattr(hf, field):
                raise CheckpointError(f"{source}: args {name}={values[field]!r} does not match the HF config's "
                                      f"{field}={getattr(hf, field)!r}")
        if hf.vocab_size > args.padded_vocab_size:
            raise CheckpointError(f"{source}: args padded_vocab_size={args.padded_vocab_size} is smaller than the "
                                  f"HF config's vocab_size={hf.vocab_size}")
        return hf
    if values.get("rope_theta") is None:
        raise CheckpointError(f"{source}: args have no rotary_base (ModelLink does not store it); pass --hf_config "
                              "with the HF config.json or model directory to take rope_theta from")
    values.setdefault("vocab_size", args.padded_vocab_size)
    try:
        return MistralConfig(**values)
    except ConfigError as e:
        raise CheckpointError(f"{source}: args describe no valid Mistral model ({e})") from None


def _args_values(args) -> dict:
    """`MistralConfig` fields read from Megatron args; absent ones are left out, except `sliding_window`
    (Megatron's default None: full attention)."""
    get = lambda name: getattr(args, name, None)  # noqa: E731
    values = {
        "n_layers": get("num_layers"), "dim": get("hidden_size"), "ffn_dim": get("ffn_hidden_size"),
        "n_heads": get("num_attention_heads"), "head_dim": get("kv_channels"),
        "n_kv_heads": get("num_query_groups") if get("group_query_attention") else get("num_attention_heads"),
        "vocab_size": get("true_vocab_size"), "norm_eps": get("norm_epsilon"), "rope_theta": get("rotary_base"),
        "sliding_window": get("sliding_window"), "max_seq_len": get("max_position_embeddings"),
    }
    return {k: v for k, v in values.items() if v is not None or k == "sliding_window"}


# ---- one rank's state ------------------------------------------------------------------------------

def mesh_specs(config: MistralConfig, divisible_by: int):
    """The tree of `PartitionSpec`s of `config`'s params (computed on `meta`)."""
    return sharding.match(init_params(config, device="meta"), sharding.mistral_rules(config, divisible_by))


def rank_model(params, specs, config: MistralConfig, tp: int, pp: int, tp_rank: int, pp_rank: int,
               dtype: torch.dtype | None = None, on_layer: Callable[[], None] | None = None) -> dict:
    """The nested `model` dict of rank `(tp_rank, pp_rank)`, reading one layer of `params` at a time.

    `params` holds tensors (any device, `meta` too) or `LazyTensor`s; `dtype` casts (None keeps it).
    """
    mesh, coords = {"tp": tp}, {"tp": tp_rank}

    def local(path: str):
        full = materialize(get_path(params, path))
        piece = sharding.shard(full, get_path(specs, path), mesh, coords)
        return piece if dtype is None else cast(piece, dtype)

    encoder = {}
    for j, i in enumerate(stage_layers(config.n_layers, pp, pp_rank)):
        layer = local(f"layers/{i}")
        for key, leaves in LAYER_KEYS.items():
            fuse, _ = _transform(key)
            encoder[f"layers.{j}.{key}"] = fuse([get_path(layer, leaf) for leaf in leaves], config)
        del layer
        if on_layer is not None:
            on_layer()
    model: dict = {"language_model": {"encoder": encoder}}
    if pp_rank == 0:
        model["language_model"]["embedding"] = {"word_embeddings": {"weight": local("embed")}}
    if pp_rank == pp - 1:
        encoder["final_norm.weight"] = local("norm")
        model["language_model"]["output_layer"] = {"weight": local("output")}
    return model


def _lookup(model: dict, keys: tuple[str, ...], file: Path):
    node = model
    for key in keys:
        if not isinstance(node, dict) or key not in node:
            raise CheckpointError(f"{file}: missing model/{'/'.join(keys)}")
        node = node[key]
    return node


def _location(path: str, config: MistralConfig, pp: int) -> tuple[int, tuple[str, ...], str | None, int]:
    """Where leaf `path` is stored: (stage, key path in `model`, encoder layer key or None, index among fused pieces)."""
    if path in TOP_KEYS:
        return (0 if path == "embed" else pp - 1), TOP_KEYS[path], None, 0
    _, i, leaf = path.split("/", 2)
    per = config.n_layers // pp
    key = next(k for k, leaves in LAYER_KEYS.items() if leaf in leaves)
    return int(i) // per, ("language_model", "encoder", f"layers.{int(i) % per}.{key}"), key, LAYER_KEYS[key].index(leaf)


# ---- writing ---------------------------------------------------------------------------------------

def save_megatron(out_dir: str | os.PathLike, config: MistralConfig, params, *, tp: int, pp: int,
                  dtype: torch.dtype | None = None, make_vocab_size_divisible_by: int = 1,
                  iteration: int | str = CONVERTER_ITERATION, overwrite: bool = False,
                  on_layer: Callable[[], None] | None = None) -> tuple[int, int]:
    """Write `params` (tensors or lazy) as a ModelLink checkpoint; return (tensors, bytes).

    `iteration` is 1 for a conversion from HF (as ModelLink writes); a re-shard keeps the source's
    (an int, or "release": the `release/` directory, stored iteration 0).

    Ranks are written one at a time, each reading its stage's layers one by one, so memory holds one
    rank's state plus one full layer. Atomic: nothing is left at `out_dir` unless every file is written.
    `on_layer` is called once per (rank, layer).
    """
    check_parallel(config, tp, pp, make_vocab_size_divisible_by)
    specs = mesh_specs(config, make_vocab_size_divisible_by)
    dtype = dtype or get_path(params, "embed").dtype
    args = megatron_args(config, tp, pp, dtype, make_vocab_size_divisible_by)
    count = nbytes = 0
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        for p in range(pp):
            for t in range(tp):
                model = rank_model(params, specs, config, tp, pp, t, p, dtype, on_layer)
                file = tmp / iteration_dirname(iteration) / rank_dirname(t, p, pp) / RANK_FILE
                file.parent.mkdir(parents=True)
                save_pt({"args": args, "checkpoint_version": CHECKPOINT_VERSION,
                         "iteration": 0 if iteration == "release" else iteration,
                         "model": model, "num_floating_point_operations_so_far": 0}, file)
                tensors = [x for _, x in leaves_with_paths(model)]
                count, nbytes = count + len(tensors), nbytes + sum(x.numel() * x.element_size() for x in tensors)
                del model, tensors
        (tmp / TRACKER).write_text(str(iteration), encoding="ascii")
    return count, nbytes


def check_parallel(config: MistralConfig, tp: int, pp: int, divisible_by: int = 1) -> None:
    """Raise `ConfigError` unless `config` splits over `tp` x `pp` as Megatron requires."""
    if not isinstance(pp, int) or pp <= 0 or config.n_layers % pp:
        raise ConfigError(f"n_layers={config.n_layers} is not divisible by pipeline-parallel size pp={pp}")
    sharding.validate_tp(config, tp, divisible_by)


# ---- reading ---------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class MegatronCheckpoint:
    """What `read_megatron` found: the files' parallel layout, iteration and args."""

    path: Path
    iteration: int | str
    tp: int
    pp: int
    args: argparse.Namespace

    def rank_file(self, tp_rank: int, pp_rank: int) -> Path:
        return self.path / iteration_dirname(self.iteration) / rank_dirname(tp_rank, pp_rank, self.pp) / RANK_FILE


def read_megatron(ckpt_dir: str | os.PathLike, hf: MistralConfig | None = None):
    """`(config, checkpoint, lazy params)` of a Megatron checkpoint directory.

    Checked here: the tracker, the args, every rank file's presence, and the keys and shapes of each
    stage's first rank. Each leaf, when loaded, reads its pieces (memory-mapped) from the `tp` files of
    its stage, splits fused tensors and unshards. `hf` (an HF config) supplies and checks the config;
    it is required when the args have no `rotary_base`.
    """
    ckpt_dir = Path(ckpt_dir)
    iteration = read_tracker(ckpt_dir)
    first = ckpt_dir / iteration_dirname(iteration) / rank_dirname(0, 0, 1) / RANK_FILE
    if not first.exists():  # pipeline-parallel naming, mp_rank_00_000
        first = ckpt_dir / iteration_dirname(iteration) / rank_dirname(0, 0, pp=2) / RANK_FILE
    args = _load_dict(first).get("args")
    config = config_from_args(args, first, hf)
    ckpt = MegatronCheckpoint(ckpt_dir, iteration, args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args)
    divisible_by = getattr(args, "make_vocab_size_divisible_by", 1)
    try:
        check_parallel(config, ckpt.tp, ckpt.pp, divisible_by)
    except ConfigError as e:
        raise CheckpointError(f"{first}: {e}") from None
    for p in range(ckpt.pp):
        for t in range(ckpt.tp):
            if not ckpt.rank_file(t, p).is_file():
                raise CheckpointError(f"{ckpt.rank_file(t, p)}: missing rank file (args say tp={ckpt.tp}, pp={ckpt.pp})")
    specs = mesh_specs(config, divisible_by)
    meta = init_params(config, device="meta")
    rank_shapes, dtypes = {}, {}
    for p in range(ckpt.pp):
        stored = _load_dict(ckpt.rank_file(0, p)).get("model")
        for path, want in leaves_with_paths(rank_model(meta, specs, config, ckpt.tp, ckpt.pp, 0, p)):
            keys = tuple(path.split("/"))
            got = _lookup(stored, keys, ckpt.rank_file(0, p))
            if not isinstance(got, torch.Tensor) or got.shape != want.shape:
                shape = list(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
                raise CheckpointError(f"{ckpt.rank_file(0, p)}: model/{path} has shape {shape}, expected "
                                      f"{list(want.shape)} for tp={ckpt.tp}, pp={ckpt.pp}")
            rank_shapes[keys], dtypes[keys] = want.shape, got.dtype
        del stored

    def leaf(path: str, spec) -> LazyTensor:
        keys = _location(path, config, ckpt.pp)[1]
        return LazyTensor(tuple(get_path(meta, path).shape), dtypes[keys],
                          lambda: _read_leaf(ckpt, config, path, spec, rank_shapes[keys]))

    return config, ckpt, map_with_path(leaf, specs)


def _read_leaf(ckpt: MegatronCheckpoint, config: MistralConfig, path: str, spec, rank_shape) -> torch.Tensor:
    """The full tensor of leaf `path`: its piece from each tp rank of its stage, split out of the fused tensor, unsharded."""
    p, keys, layer_key, index = _location(path, config, ckpt.pp)
    _, split = _transform(layer_key)
    pieces = []
    for t in range(ckpt.tp):
        file = ckpt.rank_file(t, p)
        stored = _lookup(_load_dict(file).get("model"), keys, file)
        if not isinstance(stored, torch.Tensor) or stored.shape != rank_shape:
            raise CheckpointError(f"{file}: model/{'/'.join(keys)} is not a tensor of shape {list(rank_shape)}")
        pieces.append(split(stored, config)[index])
    full = sharding.unshard(pieces, spec, {"tp": ckpt.tp})
    return full.clone() if spec.split_dim("tp") is None else full  # a replicated piece still views the mapped file


def _load_dict(file: Path) -> dict:
    obj = load_pt(file)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{file}: holds a {type(obj).__name__}, expected Megatron's checkpoint dict")
    return obj
