"""Megatron-LM legacy checkpoints as ModelLink writes them for Mistral, to and from the parameter pytree.

Layout (Megatron-LM core_r0.6.0 `megatron/training/checkpointing.py`, ModelLink 1.0.RC2 `tools/checkpoint`)::

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

The `args` carry what Megatron's `check_checkpoint_args` compares with the loading run (layers, hidden
size, heads, `add_position_embedding=True`, max positions, vocab padding, tokenizer type, TP and PP
sizes), so ModelLink's pretrain (without `--finetune`), inference and evaluation accept the files, plus
`rotary_base` and a `mistral_fn_save_id` shared by every rank file of one save. Reading checks that
every rank file belongs to the same checkpoint (iteration, args, save id, shapes) before any tensor
is used. ModelLink stores no `rotary_base`: the rope base then comes from the caller (an explicit value,
else an HF `config.json`), never from a default.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import uuid
from pathlib import Path
from typing import Callable

import torch

import sharding
from checkpoints.dtypes import cast_tree
from checkpoints.lazy import LazyTensor, materialize
from checkpoints.megatron_pickle import ModelType, load_pt, save_pt
from mistral_fn.atomic import atomic_dir
from mistral_fn.config import MistralConfig
from mistral_fn.errors import CheckpointError, ConfigError
from mistral_fn.params import get_path, init_params, leaves_with_paths, map_with_path

TRACKER = "latest_checkpointed_iteration.txt"
RANK_FILE = "model_optim_rng.pt"
CHECKPOINT_VERSION = 3.0
CONVERTER_ITERATION = 1  # ModelLink's HF loader: "'0', 'release' don't work"
SAVE_ID = "mistral_fn_save_id"  # args field: one random id per save, in every rank file
TOKENIZER_TYPE = "PretrainedFromHF"  # what ModelLink's Mistral scripts pass (`--tokenizer-type`)

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

def megatron_args(config: MistralConfig, tp: int, pp: int, dtype: torch.dtype, divisible_by: int,
                  consumed_train_samples: int = 0) -> argparse.Namespace:
    """The `args` a ModelLink run needs to load the files (every field `check_checkpoint_args` compares),
    plus `rotary_base` and `true_vocab_size` for the way back and a fresh `SAVE_ID`."""
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
        add_position_embedding=True,  # Megatron's default; ModelLink's converter writes it too (RoPE is separate)
        position_embedding_type="rope",
        use_rotary_position_embeddings=True,
        tokenizer_type=TOKENIZER_TYPE,
        model_type=ModelType.encoder_or_decoder,
        consumed_train_samples=consumed_train_samples,
        consumed_valid_samples=0,
        **{SAVE_ID: uuid.uuid4().hex},
    )


# Fields a checkpoint's args and an HF config must agree on: (args name, config field).
_CHECKED_FIELDS = (("num_layers", "n_layers"), ("hidden_size", "dim"), ("ffn_hidden_size", "ffn_dim"),
                 ("num_attention_heads", "n_heads"), ("num_query_groups", "n_kv_heads"),
                 ("kv_channels", "head_dim"), ("true_vocab_size", "vocab_size"), ("rotary_base", "rope_theta"))
_REQUIRED_ARGS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                  "tensor_model_parallel_size", "pipeline_model_parallel_size", "padded_vocab_size")
# What every rank file of one checkpoint shares: top-level entries, then args fields (a run's args are
# the same on every rank except rank-local ones such as `rank`, which are not compared).
_SHARED_ENTRIES = ("iteration", "checkpoint_version", "num_floating_point_operations_so_far")
_SHARED_ARGS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                "kv_channels", "padded_vocab_size", "make_vocab_size_divisible_by", "true_vocab_size",
                "rotary_base", "tensor_model_parallel_size", "pipeline_model_parallel_size", "params_dtype",
                "consumed_train_samples", "consumed_valid_samples", SAVE_ID)


def hf_reference(hf) -> tuple[MistralConfig | None, str]:
    """`(config, note)` of what a caller passed as the HF side of a Megatron checkpoint: a `MistralConfig`,
    a `config.json`, an HF model directory, or a directory without `config.json` (e.g. a tokenizer-only
    directory: no config, and a note for the error message), or None."""
    if hf is None or isinstance(hf, MistralConfig):
        return hf, ""
    path = Path(hf)
    if path.is_dir() and not (path / "config.json").is_file():
        return None, f" ({path} has no config.json)"
    return MistralConfig.from_hf(path), ""


def config_from_args(args, source: Path, hf=None, rotary_base: float | None = None) -> MistralConfig:
    """The model config of a checkpoint's `args`.

    `hf` (see `hf_reference`) is checked against the args and then supplies the config. The rope base
    is the args' `rotary_base`; ModelLink stores none, and then it is `rotary_base` if given, else the HF
    config's `rope_theta`, else a `CheckpointError` naming both ways to supply it. A `rotary_base` that
    contradicts the stored one is an error.
    """
    if not isinstance(args, argparse.Namespace):
        raise CheckpointError(f"{source}: 'args' is {type(args).__name__}, expected an argparse.Namespace")
    missing = [name for name in _REQUIRED_ARGS if getattr(args, name, None) is None]
    if missing:
        raise CheckpointError(f"{source}: args lack {missing[0]!r}")
    hf, note = hf_reference(hf)
    values = _args_values(args)
    stored = values.get("rope_theta")
    if rotary_base is not None and stored is not None and float(rotary_base) != stored:
        raise CheckpointError(f"{source}: args rotary_base={stored!r} but the given rope base is {rotary_base!r}")
    theta = stored if stored is not None else rotary_base if rotary_base is not None else getattr(hf, "rope_theta", None)
    if theta is None:
        raise CheckpointError(f"{source}: args have no rotary_base (ModelLink does not store it); pass the rope "
                              f"base (--rotary-base) or an HF model directory / config.json to take rope_theta "
                              f"from{note}")
    if hf is not None:
        for name, field in _CHECKED_FIELDS:
            if values.get(field) is not None and values[field] != getattr(hf, field):
                raise CheckpointError(f"{source}: args {name}={values[field]!r} does not match the HF config's "
                                      f"{field}={getattr(hf, field)!r}")
        if hf.vocab_size > args.padded_vocab_size:
            raise CheckpointError(f"{source}: args padded_vocab_size={args.padded_vocab_size} is smaller than the "
                                  f"HF config's vocab_size={hf.vocab_size}")
        return hf.replace(rope_theta=float(theta))
    values["rope_theta"] = float(theta)
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
        return cast_tree(sharding.shard(full, get_path(specs, path), mesh, coords), dtype, path)

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
                  iteration: int | str = CONVERTER_ITERATION, consumed_train_samples: int = 0,
                  overwrite: bool = False, on_layer: Callable[[], None] | None = None) -> tuple[int, int]:
    """Write `params` (full tensors or lazy) as a ModelLink checkpoint; return (tensors, bytes).

    `iteration` is the training iteration the files and tracker name (`iter_0000100`, tracker "100"):
    1 for a conversion from HF (as ModelLink writes), a re-shard keeps the source's, and a training run
    passes its step (with `consumed_train_samples`, which Megatron restores on resume). "release" writes
    the `release/` directory with stored iteration 0. A float16 `dtype` refuses weights beyond its range.

    Ranks are written one at a time, each reading its stage's layers one by one, so memory holds one
    rank's state plus one full layer. Atomic: the files are built in `.<name>.partial` (a leftover of a
    killed save is swept by the next save to `out_dir`) and nothing is at `out_dir` unless every file
    is written. `on_layer` is called once per (rank, layer).
    """
    if iteration != "release" and (not isinstance(iteration, int) or isinstance(iteration, bool) or iteration <= 0):
        raise CheckpointError(f"iteration={iteration!r}: Megatron needs an iteration > 0 or 'release'")
    check_parallel(config, tp, pp, make_vocab_size_divisible_by)
    specs = mesh_specs(config, make_vocab_size_divisible_by)
    dtype = dtype or get_path(params, "embed").dtype
    args = megatron_args(config, tp, pp, dtype, make_vocab_size_divisible_by, consumed_train_samples)
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

    @property
    def step(self) -> int:
        """The iteration a run resumes from, as Megatron's `load_checkpoint` sets it (0 for "release";
        `--finetune` also starts at 0)."""
        return 0 if self.iteration == "release" else self.iteration

    @property
    def consumed_train_samples(self) -> int:
        """Training samples consumed before the save (Megatron restores it unless `--finetune`)."""
        return int(getattr(self.args, "consumed_train_samples", 0) or 0)


def read_megatron(ckpt_dir: str | os.PathLike, hf=None, *, rotary_base: float | None = None):
    """`(config, checkpoint, lazy params)` of a Megatron checkpoint directory.

    Checked before any tensor is used: the tracker, rank 0's args, the presence of every rank file,
    and that every rank file belongs to the same checkpoint as rank 0's (iteration, shared args, save
    id) and holds the keys and shapes its rank must. Each leaf, when loaded, reads its pieces
    (memory-mapped) from the `tp` files of its stage, splits fused tensors and unshards.

    `hf` (a `MistralConfig`, a `config.json` or an HF model directory) supplies the config and is
    checked against the args; `rotary_base` supplies the rope base when the args have none (see
    `config_from_args`).
    """
    ckpt_dir = Path(ckpt_dir)
    iteration = read_tracker(ckpt_dir)
    first = ckpt_dir / iteration_dirname(iteration) / rank_dirname(0, 0, 1) / RANK_FILE
    if not first.exists():  # pipeline-parallel naming, mp_rank_00_000
        first = ckpt_dir / iteration_dirname(iteration) / rank_dirname(0, 0, pp=2) / RANK_FILE
    state0 = _load_dict(first)
    args = state0.get("args")
    config = config_from_args(args, first, hf, rotary_base)
    ckpt = MegatronCheckpoint(ckpt_dir, iteration, args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args)
    if iteration != "release" and state0.get("iteration") != iteration:
        raise CheckpointError(f"{first}: stores iteration {state0.get('iteration')!r} but {TRACKER} names {iteration}")
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
        expected = leaves_with_paths(rank_model(meta, specs, config, ckpt.tp, ckpt.pp, 0, p))
        for t in range(ckpt.tp):
            file = ckpt.rank_file(t, p)
            state = state0 if file == first else _load_dict(file)
            _check_same_checkpoint(state, file, state0, first)
            for path, want in expected:
                keys = tuple(path.split("/"))
                got = _lookup(state.get("model"), keys, file)
                if not isinstance(got, torch.Tensor) or got.shape != want.shape or got.dtype != dtypes.get(keys, got.dtype):
                    found = f"{got.dtype} {list(got.shape)}" if isinstance(got, torch.Tensor) else type(got).__name__
                    wanted = f"{dtypes[keys]} " if keys in dtypes else ""
                    raise CheckpointError(f"{file}: model/{path} is {found}, expected {wanted}{list(want.shape)} "
                                          f"for tp={ckpt.tp}, pp={ckpt.pp} (as in {ckpt.rank_file(0, p)})")
                rank_shapes[keys], dtypes[keys] = want.shape, got.dtype
            del state

    def leaf(path: str, spec) -> LazyTensor:
        keys = _location(path, config, ckpt.pp)[1]
        return LazyTensor(tuple(get_path(meta, path).shape), dtypes[keys],
                          lambda: _read_leaf(ckpt, config, path, spec, rank_shapes[keys]))

    return config, ckpt, map_with_path(leaf, specs)


def lazy_megatron(ckpt_dir: str | os.PathLike, hf=None, *, rotary_base: float | None = None) -> tuple[MistralConfig, dict]:
    """`(config, lazy params)` of a Megatron checkpoint (the `lazy_hf` of this format; see `read_megatron`)."""
    config, _, lazy = read_megatron(ckpt_dir, hf, rotary_base=rotary_base)
    return config, lazy


def load_megatron(ckpt_dir: str | os.PathLike, dtype: torch.dtype | None = None, device="cpu", *, hf=None,
                  rotary_base: float | None = None) -> tuple[MistralConfig, dict]:
    """`(config, full params)` of a Megatron checkpoint, read and cast to `dtype` (None: as stored) one
    leaf at a time (the `load_hf` of this format)."""
    config, lazy = lazy_megatron(ckpt_dir, hf, rotary_base=rotary_base)
    return config, materialize(lazy, dtype, device)


def _check_same_checkpoint(state: dict, file: Path, state0: dict, first: Path) -> None:
    """Raise unless rank file `file` belongs to the same save as rank 0's `first`."""
    args, args0 = state.get("args"), state0.get("args")
    if not isinstance(args, argparse.Namespace):
        raise CheckpointError(f"{file}: 'args' is {type(args).__name__}, expected an argparse.Namespace")
    differ = [(key, state.get(key), state0.get(key)) for key in _SHARED_ENTRIES if state.get(key) != state0.get(key)]
    differ += [(f"args {name}", getattr(args, name, None), getattr(args0, name, None)) for name in _SHARED_ARGS
               if getattr(args, name, None) != getattr(args0, name, None)]
    if differ:
        name, value, value0 = differ[0]
        raise CheckpointError(f"{file}: {name}={value!r} but rank 0 ({first}) has {value0!r}; "
                              "the rank files come from different checkpoints")


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
