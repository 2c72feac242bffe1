"""The model inside a native training checkpoint, as a lazy parameter tree (for conversion and inference),
and the adapters inside a LoRA run's checkpoint.

A training run (`experiments.pretrain`) saves `{"train": TrainState, "rng": ...}` on every rank with
`extra = {"tp": .., "dp": .., "config": <HF config dict>}`. Ranks are laid out (dp, tp) row-major, so
ranks 0..tp-1 (data-parallel rank 0) hold one copy of the tensor-parallel shards of `train/params`.
Each leaf of the lazy tree reads its `tp` shards (only its own tensor from each file) and unshards.
A LoRA run trains only adapters: its `train/params` are the adapter tree (float32) and `extra["lora"]`
says how to rebuild it; `config` is its base model's.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

import sharding
from checkpoints import native
from checkpoints.lazy import LazyTensor, materialize, read_tensor
from mistral_fn import lora
from mistral_fn.config import MistralConfig
from mistral_fn.errors import CheckpointError, ConfigError
from mistral_fn.lora import LoraTree
from mistral_fn.params import get_path, init_params, leaves_with_paths, map_with_path

PARAMS_PREFIX = "train/params/"
LORA_KEY = "lora"  # metadata `extra` of a LoRA run: {"r", "alpha", "targets", "base"}


def read_native_params(path: str | os.PathLike, step: int | None = None,
                       verify: bool = True) -> tuple[MistralConfig, int, dict]:
    """`(config, step, lazy params)` of a native training checkpoint (a root, or one `iter_*` directory).

    Checked before any tensor is read: that all ranks belong together (`native.verify_ranks`), the
    model config in the metadata, and every shard's name, dtype and shape. `verify` also checks the
    sha256 of the `tp` files read. A LoRA run's checkpoint (adapters only) is refused, naming the fix.
    """
    directory, metas, config, tp = _open(path, step)
    meta_file = directory / "rank_000.msgpack"
    if LORA_KEY in metas[0]["extra"]:
        raise CheckpointError(f"{meta_file}: holds LoRA adapters, not a model; apply them to their base model "
                              "(--lora_load with the base as --load, or convert_ckpt --lora_dir)")
    embed = metas[0]["tensors"].get(PARAMS_PREFIX + "embed")
    if embed is None:
        raise CheckpointError(f"{native.rank_file(directory, 0)}: no tensor {PARAMS_PREFIX}embed; not a training "
                              "checkpoint")
    # The per-rank row count of the (padded) embedding fixes Megatron's padding: as divisor it pads
    # the vocab to exactly rows * tp.
    meta_params = init_params(config, device="meta")
    specs = sharding.match(meta_params, sharding.mistral_rules(config, embed[1][0]))
    return config, metas[0]["step"], _lazy_tree(directory, metas, tp, meta_params, specs, verify)


def read_native_lora(path: str | os.PathLike, step: int | None = None,
                     verify: bool = True) -> tuple[MistralConfig, int, LoraTree]:
    """`(base model config, step, full adapters)` of a LoRA run's native checkpoint (`train/params` holds
    the adapters, tp-sharded by `sharding.with_lora_rules`; `extra["lora"]` their `r`, `alpha` and
    `targets`), checked as `read_native_params` checks a model."""
    directory, metas, config, tp = _open(path, step)
    meta_file = directory / "rank_000.msgpack"
    settings = metas[0]["extra"].get(LORA_KEY)
    if not isinstance(settings, dict):
        raise CheckpointError(f"{meta_file}: no LoRA settings in the metadata; not a LoRA training checkpoint")
    try:
        template = lora.init(init_params(config, device="meta"), config, rank=settings.get("r"),
                             alpha=settings.get("alpha"), targets=settings.get("targets"))
    except ConfigError as e:
        raise CheckpointError(f"{meta_file}: {e}") from None
    specs = sharding.match(template, sharding.with_lora_rules(sharding.mistral_rules(config)))
    return config, metas[0]["step"], materialize(_lazy_tree(directory, metas, tp, template, specs, verify))


def _open(path, step: int | None) -> tuple[Path, list[dict], MistralConfig, int]:
    """`(iteration directory, every rank's metadata, model config, tp)`, checked."""
    directory = native.iteration_dir(path, step)
    metas = native.verify_ranks(directory)
    extra = metas[0]["extra"]
    meta_file = directory / "rank_000.msgpack"
    if not isinstance(extra.get("config"), dict):
        raise CheckpointError(f"{meta_file}: no model config in the metadata; not a training checkpoint")
    try:
        config = MistralConfig.from_hf(extra["config"])
    except ConfigError as e:
        raise CheckpointError(f"{meta_file}: {e}") from None
    tp = extra.get("tp", 1)
    if not isinstance(tp, int) or not 0 < tp <= len(metas):
        raise CheckpointError(f"{meta_file}: tp={tp!r} does not fit the {len(metas)} rank(s) saved")
    return directory, metas, config, tp


def _lazy_tree(directory: Path, metas: list[dict], tp: int, template, specs, verify: bool):
    """`specs` with each leaf a `LazyTensor` reading its `tp` shards of `train/params/<path>` (ranks
    0..tp-1) and unsharding them; every shard's name, dtype and shape is checked against `template`
    first, and with `verify` each file's sha256."""
    stored = [meta["tensors"] for meta in metas[:tp]]
    for t in range(tp):
        local = sharding.shard(template, specs, {"tp": tp}, {"tp": t})
        for leaf, want in leaves_with_paths(local):
            name = PARAMS_PREFIX + leaf
            got = stored[t].get(name)
            if got is None or list(got[1]) != list(want.shape) or got[0] != stored[0][name][0]:
                found = "missing" if got is None else f"{got[0]} {list(got[1])}"
                raise CheckpointError(f"{native.rank_file(directory, t)}: tensor {name} is {found}, expected "
                                      f"{stored[0].get(name, ['?'])[0]} {list(want.shape)} for tp={tp}")
    if verify:
        for meta in metas[:tp]:
            native.check_sha256(directory, meta)
    files = [native.rank_file(directory, t) for t in range(tp)]

    def leaf(path: str, spec) -> LazyTensor:
        name = PARAMS_PREFIX + path
        read = lambda: sharding.unshard([read_tensor(f, name) for f in files], spec, {"tp": tp})  # noqa: E731
        return LazyTensor(tuple(get_path(template, path).shape), getattr(torch, stored[0][name][0]), read)

    return map_with_path(leaf, specs)
