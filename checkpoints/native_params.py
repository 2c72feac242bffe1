"""The model inside a native training checkpoint, as a lazy parameter tree (for conversion and inference).

A training run (`experiments.pretrain`) saves `{"train": TrainState, "rng": ...}` on every rank with
`extra = {"tp": .., "dp": .., "config": <HF config dict>}`. Ranks are laid out (dp, tp) row-major, so
ranks 0..tp-1 (data-parallel rank 0) hold one copy of the tensor-parallel shards of `train/params`.
Each leaf of the lazy tree reads its `tp` shards (only its own tensor from each file) and unshards.
"""

from __future__ import annotations

import os

import torch

import sharding
from checkpoints import native
from checkpoints.lazy import LazyTensor, read_tensor
from mistral_fn.config import MistralConfig
from mistral_fn.errors import CheckpointError, ConfigError
from mistral_fn.params import get_path, init_params, leaves_with_paths, map_with_path

PARAMS_PREFIX = "train/params/"


def read_native_params(path: str | os.PathLike, step: int | None = None,
                       verify: bool = True) -> tuple[MistralConfig, int, dict]:
    """`(config, step, lazy params)` of a native training checkpoint (a root, or one `iter_*` directory).

    Checked before any tensor is read: that all ranks belong together (`native.verify_ranks`), the
    model config in the metadata, and every shard's name, dtype and shape. `verify` also checks the
    sha256 of the `tp` files read.
    """
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
    stored = [meta["tensors"] for meta in metas[:tp]]
    embed = stored[0].get(PARAMS_PREFIX + "embed")
    if embed is None:
        raise CheckpointError(f"{native.rank_file(directory, 0)}: no tensor {PARAMS_PREFIX}embed; not a training "
                              "checkpoint")
    # The per-rank row count of the (padded) embedding fixes Megatron's padding: as divisor it pads
    # the vocab to exactly rows * tp.
    meta_params = init_params(config, device="meta")
    specs = sharding.match(meta_params, sharding.mistral_rules(config, embed[1][0]))
    for t in range(tp):
        local = sharding.shard(meta_params, specs, {"tp": tp}, {"tp": t})
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
        return LazyTensor(tuple(get_path(meta_params, path).shape), getattr(torch, stored[0][name][0]), read)

    return config, metas[0]["step"], map_with_path(leaf, specs)
