"""LoRA as a transform of the parameter tree: `apply(params, lora)` returns params whose adapted leaves are
`W + (alpha / r) * B @ A`, differentiable in the adapters only.

    lora = mf.lora.init(params, cfg, rank=16, alpha=32, targets=["query_key_value", "dense"], seed=0)
    loss = lambda lora, batch: mf.loss_fn(mf.lora.apply(params, lora), batch, cfg)
    grads = torch.func.grad(loss)(lora, batch)          # shaped like `lora`; the base gets none
    merged = mf.lora.merge(params, lora)                # plain params, for export or inference

Targets are module names, ModelLink's (Megatron's fused layers) or PEFT's (transformers' layers):

    query_key_value -> wq, wk, wv (one A)   dense         -> wo     q_proj, k_proj, v_proj -> wq, wk, wv
    dense_h_to_4h   -> w_gate, w_up (one A) dense_4h_to_h -> w_down gate_proj, up_proj -> w_gate, w_up
                                                                    o_proj -> wo, down_proj -> w_down

An adapter is a dict: `a`, the lora_A `[r, in]`, and per adapted leaf its lora_B `[out_leaf, r]`:

    layers/i/attn/query_key_value   {"a": [r, D], "wq": [H*hd, r], "wk": [KV*hd, r], "wv": [KV*hd, r]}
    layers/i/attn/dense             {"a": [r, H*hd], "wo": [D, r]}
    layers/i/mlp/dense_h_to_4h      {"a": [r, D], "w_gate": [F, r], "w_up": [F, r]}
    layers/i/mlp/dense_4h_to_h      {"a": [r, F], "w_down": [D, r]}
    layers/i/attn/q_proj            {"a": [r, D], "wq": [H*hd, r]}              (PEFT: one A per leaf)

ModelLink puts one adapter on a fused Megatron weight (`query_key_value` is wq/wk/wv, `dense_h_to_4h` is
w_gate/w_up, rows interleaved per rank): one A and one B whose rows are the fused rows. Its B is kept here
split into the rows of each leaf, a permutation of the same parameters, so training matches ModelLink's
parameter count and update rule, and each piece shards and merges like its leaf. PEFT's export is exact:
`q_proj`, `k_proj` and `v_proj` each get the shared A and their own B (`checkpoints.peft`).

Training the adapters alone: `train.make_train_step(loss, ...)` with the loss above and
`train.init_train_state(adapters, ...)`; the base is closed over in its (compute) dtype, with no master
copy, gradient or moments. `apply` holds one merged copy of each adapted weight while the step runs, rounded
to W's dtype: in bf16 a delta below half an ulp of W leaves the forward unchanged (its gradient still
reaches the adapters), where PEFT adds `(x A^T) B^T` beside `x W^T`.

The tree is a `LoraTree`: a dict carrying the scaling numerator `alpha` as static pytree metadata
(like a JAX static field), so every leaf is a trainable tensor and `tree_map`, `torch.func`,
`value_and_grad` and the optimizers keep `alpha`. The rank `r` is read from the shape of `a`.
"""

from __future__ import annotations

import math
import numbers
import zlib
from typing import Iterable, Iterator

import numpy as np
import torch
from torch.utils import _pytree as pytree

from mistral_fn.config import MistralConfig
from mistral_fn.errors import ConfigError
from mistral_fn.parallel import SINGLE_DEVICE, TensorParallel
from mistral_fn.params import TP_SPLIT_DIMS, check_params, iter_paths, map_with_path, param_shapes

# target module name -> (params group, the leaves it adapts; one A shared by all of them)
TARGETS = {
    "query_key_value": ("attn", ("wq", "wk", "wv")),
    "dense": ("attn", ("wo",)),
    "dense_h_to_4h": ("mlp", ("w_gate", "w_up")),
    "dense_4h_to_h": ("mlp", ("w_down",)),
    "q_proj": ("attn", ("wq",)),
    "k_proj": ("attn", ("wk",)),
    "v_proj": ("attn", ("wv",)),
    "o_proj": ("attn", ("wo",)),
    "gate_proj": ("mlp", ("w_gate",)),
    "up_proj": ("mlp", ("w_up",)),
    "down_proj": ("mlp", ("w_down",)),
}
MODELLINK_TARGETS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")
PEFT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoraTree(dict):
    """`{"layers": [{group: {target: adapter}}]}` plus the static `alpha` (see the module docstring)."""

    def __init__(self, adapters=(), *, alpha: float):
        super().__init__(adapters)
        self.alpha = alpha

    def __repr__(self):
        return f"LoraTree({dict.__repr__(self)}, alpha={self.alpha!r})"

    @property
    def rank(self) -> int:
        """r, the rows of every `a` (the same for all adapters)."""
        ranks = {adapter["a"].shape[0] for _, _, _, adapter in adapters(self)}
        if len(ranks) != 1:
            raise ConfigError(f"lora tree: expected one rank for all adapters, found {sorted(ranks) or 'none'}")
        return ranks.pop()

    @property
    def targets(self) -> list[str]:
        """The target module names present, in `TARGETS` order."""
        present = {target for _, _, target, _ in adapters(self)}
        return [name for name in TARGETS if name in present]


def _flatten(tree: LoraTree):
    return list(tree.values()), (list(tree.keys()), tree.alpha)


def _flatten_with_keys(tree: LoraTree):
    return [(pytree.MappingKey(k), v) for k, v in tree.items()], (list(tree.keys()), tree.alpha)


def _unflatten(values, context) -> LoraTree:
    keys, alpha = context
    return LoraTree(zip(keys, values), alpha=alpha)


pytree.register_pytree_node(LoraTree, _flatten, _unflatten, serialized_type_name="mistral_fn.lora.LoraTree",
                            flatten_with_keys_fn=_flatten_with_keys)


def adapters(tree) -> Iterator[tuple[int, str, str, dict]]:
    """`(layer index, group, target, adapter)` for every adapter of `tree`, in tree order."""
    for i, layer in enumerate(tree["layers"]):
        for group, by_target in layer.items():
            for target, adapter in by_target.items():
                yield i, group, target, adapter


# ---- init -----------------------------------------------------------------------------------------

def check_targets(targets: Iterable[str]) -> list[str]:
    """The target names as a list; `ConfigError` for an unknown name or two targets adapting one leaf."""
    if isinstance(targets, str) or not isinstance(targets, Iterable):
        raise ConfigError(f"lora targets must be a list of module names, got {targets!r}")
    targets, owner = list(targets), {}
    if not targets:
        raise ConfigError(f"lora targets are empty; choose from {', '.join(TARGETS)}")
    for name in targets:
        if name not in TARGETS:
            raise ConfigError(f"unknown lora target {name!r}; known: {', '.join(TARGETS)}")
        group, leaves = TARGETS[name]
        for leaf in leaves:
            if leaf in owner:
                raise ConfigError(f"lora targets {owner[leaf]!r} and {name!r} both adapt {group}/{leaf}")
            owner[leaf] = name
    return targets


def init(params, config: MistralConfig, *, rank: int, alpha: float, targets: Iterable[str], seed: int = 0,
         dtype: torch.dtype | None = None, device=None) -> LoraTree:
    """Adapters for every layer of `params` (the full tree of `config`, `meta` too) in `dtype` on `device`
    (default: the params' dtype and device; adapters made on `meta` hold no values).

    As PEFT: A is kaiming-uniform with a=sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in)), and B is zero, so
    `apply(params, init(...))` equals `params` exactly. Each A draws from its own numpy PCG64 stream
    seeded by `(seed, crc32(path))`, as `init_params` does: the same on every machine and every TP size.
    """
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise ConfigError(f"lora rank must be a positive integer, got {rank!r}")
    if not isinstance(alpha, numbers.Real) or isinstance(alpha, bool) or not 0 < alpha < math.inf:
        raise ConfigError(f"lora alpha must be a positive number, got {alpha!r}")
    targets = check_targets(targets)
    check_params(params, config)
    dtype, device = dtype or params["embed"].dtype, torch.device(device or params["embed"].device)
    shapes = param_shapes(config)["layers"][0]

    def layer() -> dict:
        out: dict[str, dict] = {}
        for name in (name for name in TARGETS if name in targets):  # one tree order for one set of targets
            group, leaves = TARGETS[name]
            fan_in = shapes[group][leaves[0]][1]
            out.setdefault(group, {})[name] = {"a": (rank, fan_in), **{leaf: (shapes[group][leaf][0], rank)
                                                                       for leaf in leaves}}
        return out

    def make(path: str, shape: tuple[int, int]) -> torch.Tensor:
        if device.type == "meta" or not path.endswith("/a"):
            return torch.zeros(shape, dtype=dtype, device=device)
        bound = 1.0 / math.sqrt(shape[1])  # kaiming_uniform(a=sqrt(5)): gain sqrt(1/3), bound gain*sqrt(3/fan_in)
        rng = np.random.Generator(np.random.PCG64([seed, zlib.crc32(path.encode())]))
        values = rng.uniform(-bound, bound, size=shape).astype(np.float32)
        return torch.from_numpy(values).to(device=device, dtype=dtype)

    tree = {"layers": [layer() for _ in range(config.n_layers)]}
    return LoraTree(map_with_path(make, tree, is_leaf=lambda x: isinstance(x, tuple)), alpha=alpha)


# ---- apply / merge --------------------------------------------------------------------------------

def apply(params, lora: LoraTree, tp: TensorParallel = SINGLE_DEVICE):
    """`params` with each adapted leaf `W` replaced by `W + (alpha / r) * B @ A` (one rounding, in W's
    dtype); every base leaf is detached (a constant: gradients reach only `lora`). Composes with
    `forward`/`loss_fn` under autograd and every `torch.func` transform.

    Under tensor parallelism `params` and `lora` are one rank's shards (`sharding.with_lora_rules`):
    a column-parallel leaf's rows and its B's rows, A whole; a row-parallel leaf's columns and A's
    columns, B whole. The merged local weight is then the shard of the merged full weight. The whole
    factor (A, resp. B) enters every rank's part of the product, so its gradient is summed over the
    ranks in backward (`_shared`), with or without sequence parallelism.
    """
    return _merged(params, lora, 1.0, tp)


def merge(params, lora: LoraTree):
    """Plain params with the adapters folded in (`W + (alpha / r) * B @ A`), outside autograd: for export
    (`checkpoints.save_hf`, Megatron) or adapter-free inference. Full trees or matching TP shards.

    Computed in float32 (float64 stays float64) and rounded once to W's dtype, so a bf16 base merged
    here equals a float32 merge rounded to bf16 (the merged checkpoint loaded in bf16)."""
    with torch.no_grad():
        return _merged(params, lora, 1.0, SINGLE_DEVICE, precise=True)


def unmerge(params, lora: LoraTree):
    """The inverse of `merge`: `W - (alpha / r) * B @ A` (equal to the base up to one rounding per element)."""
    with torch.no_grad():
        return _merged(params, lora, -1.0, SINGLE_DEVICE, precise=True)


def _shared(factor: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    """`factor` (identity forward) whose gradient is summed over the tp ranks in backward (Megatron's `f`).
    That is `tp.copy_to` without sequence parallelism and `tp.replicated` with it (where `copy_to` would
    gather activations along the sequence instead)."""
    return tp.replicated(factor) if tp.sequence_parallel else tp.copy_to(factor)


def _merged(params, lora: LoraTree, sign: float, tp: TensorParallel, precise: bool = False):
    """`W + sign * (alpha / r) * B @ A` per adapted leaf, in W's dtype (`precise`: in at least float32)."""
    if not isinstance(lora, LoraTree):
        raise ConfigError(f"expected a LoraTree (from lora.init or checkpoints.load_peft), got {type(lora).__name__}")
    factors: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    for i, group, target, adapter in adapters(lora):
        if TARGETS.get(target, (None,))[0] != group:
            raise ConfigError(f"lora layers/{i}/{group}/{target}: not a known target of {group} ({', '.join(TARGETS)})")
        a, scale = adapter["a"], sign * lora.alpha / adapter["a"].shape[0]
        column = TP_SPLIT_DIMS[TARGETS[target][1][0]] == 0  # column-parallel: A whole on every rank
        if column:
            a = _shared(a, tp)
        for leaf, b in adapter.items():
            if leaf != "a":
                factors[f"layers/{i}/{group}/{leaf}"] = (b if column else _shared(b, tp)), a, scale
    missing = set(factors).difference(iter_paths(params))
    if missing:
        raise ConfigError(f"lora adapts {sorted(missing)[0]}, which the params do not have")

    def leaf(path: str, w: torch.Tensor) -> torch.Tensor:
        w = w.detach()
        if path not in factors:
            return w
        b, a, scale = factors[path]
        if a.dim() != 2 or b.shape != (w.shape[0], a.shape[0]) or a.shape[1] != w.shape[1]:
            raise ConfigError(f"lora {path}: B {tuple(b.shape)} @ A {tuple(a.shape)} does not fit the weight "
                              f"{tuple(w.shape)}")
        dtype = torch.promote_types(w.dtype, torch.float32) if precise else w.dtype
        return torch.addmm(w.to(dtype), b.to(dtype), a.to(dtype), alpha=scale).to(w.dtype)

    return map_with_path(leaf, params)

