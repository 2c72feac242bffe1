"""The parameter pytree: its shapes, deterministic init, and path-aware tree utilities.

Tree layout (weights in torch's `[out_features, in_features]` orientation)::

    embed                 [V, D]
    layers/i/attn_norm    [D]
    layers/i/attn/wq      [H*hd, D]     wk, wv: [KV*hd, D]     wo: [D, H*hd]
    layers/i/mlp_norm     [D]
    layers/i/mlp/w_gate   [F, D]        w_up: [F, D]           w_down: [D, F]
    norm                  [D]
    output                [V, D]
"""

from __future__ import annotations

import functools
import zlib
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils import _pytree as pytree

from mistral_fn.config import MistralConfig
from mistral_fn.errors import ConfigError

Params = dict[str, Any]
INIT_STD = 0.02
# The dim of each leaf that Megatron splits over tensor-parallel ranks (as `model` computes on it):
# column-parallel layers split their output rows, row-parallel ones their input columns, embed and
# output their (padded) vocab rows. `sharding.mistral_rules` states the same split; a test keeps them equal.
TP_SPLIT_DIMS = {"wq": 0, "wk": 0, "wv": 0, "w_gate": 0, "w_up": 0, "wo": 1, "w_down": 1, "embed": 0, "output": 0}
_VOCAB_LEAVES = ("embed", "output")
_PADDED_VOCAB = -1  # dim 0 of an expected local shape: any row count r with r * tp >= vocab_size


def param_shapes(config: MistralConfig) -> Params:
    """The tree of full (unsharded) leaf shapes for `config`."""
    c = config
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim

    def layer():
        return {
            "attn_norm": (c.dim,),
            "attn": {"wq": (q, c.dim), "wk": (kv, c.dim), "wv": (kv, c.dim), "wo": (c.dim, q)},
            "mlp_norm": (c.dim,),
            "mlp": {"w_gate": (c.ffn_dim, c.dim), "w_up": (c.ffn_dim, c.dim), "w_down": (c.dim, c.ffn_dim)},
        }

    return {
        "embed": (c.vocab_size, c.dim),
        "layers": [layer() for _ in range(c.n_layers)],
        "norm": (c.dim,),
        "output": (c.vocab_size, c.dim),
    }


def init_params(config: MistralConfig, seed: int = 0, dtype: torch.dtype = torch.float32, device="cpu") -> Params:
    """Random parameters: norms are ones, matrices N(0, 0.02²).

    Each leaf draws from its own numpy PCG64 stream seeded by `(seed, crc32(path))`, so the result is
    the same on every machine and does not depend on which other leaves exist. On `device="meta"`
    nothing is allocated (shapes and dtypes only, like `jax.eval_shape`).
    """
    device = torch.device(device)

    def make(path: str, shape: tuple[int, ...]) -> torch.Tensor:
        if device.type == "meta":
            return torch.empty(shape, dtype=dtype, device=device)
        if len(shape) == 1:
            return torch.ones(shape, dtype=dtype, device=device)
        rng = np.random.Generator(np.random.PCG64([seed, zlib.crc32(path.encode())]))
        values = rng.standard_normal(shape, dtype=np.float32) * np.float32(INIT_STD)
        return torch.from_numpy(values).to(device=device, dtype=dtype)

    return map_with_path(make, param_shapes(config), is_leaf=_is_shape)


# ---- validation ----------------------------------------------------------------------------------

def check_params(params, config: MistralConfig, tp: int = 1) -> None:
    """Raise `ConfigError` naming the path unless `params` is the tree of `config`: every layer, every
    leaf and nothing else, each a tensor of the right shape. Under tensor parallelism (`tp` ranks) the
    leaves are one rank's Megatron shards: `TP_SPLIT_DIMS` hold 1/tp of the full size, and the vocab
    rows of embed/output may be padded (rows * tp >= vocab_size, the same count in both).

    Reads shapes only, never values, so it runs inside torch.func transforms and torch.compile
    (where it costs nothing after tracing); eagerly it takes ~0.1 ms for the 7B tree.
    """
    # torch.compile traces the builder itself (dynamo does not trace through lru_cache)
    builder = _local_shapes.__wrapped__ if torch.compiler.is_compiling() else _local_shapes
    problem = _mismatch(params, builder(config, tp), config.vocab_size, tp)
    if problem is None and params["embed"].shape[0] != params["output"].shape[0]:
        problem = "output", f"{params['output'].shape[0]} vocab rows but embed has {params['embed'].shape[0]}"
    if problem is not None:
        path, what = problem
        raise ConfigError(f"params {path or 'tree'}: {what} (config: {config.n_layers} layers, dim {config.dim}, "
                          f"vocab {config.vocab_size}{f', tp={tp}' if tp > 1 else ''})")


@functools.lru_cache(maxsize=8)
def _local_shapes(config: MistralConfig, tp: int) -> Params:
    """`param_shapes` on one of `tp` ranks, vocab rows as `_PADDED_VOCAB`."""
    if not isinstance(tp, int) or tp < 1:
        raise ConfigError(f"tensor-parallel size must be a positive integer, got {tp!r}")

    def local(path: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        name = path.rsplit("/", 1)[-1]
        if name not in TP_SPLIT_DIMS:
            return shape
        dim, shape = TP_SPLIT_DIMS[name], list(shape)
        if name in _VOCAB_LEAVES:
            shape[dim] = _PADDED_VOCAB
        elif shape[dim] % tp:
            raise ConfigError(f"params {path}: dim {dim} of {tuple(shape)} does not split over tp={tp}")
        else:
            shape[dim] //= tp
        return tuple(shape)

    return map_with_path(local, param_shapes(config), is_leaf=_is_shape)


def _mismatch(node, want, vocab: int, tp: int) -> tuple[str, str] | None:
    """The first `(path, problem)` where the tree `node` differs from the expected shapes `want`, or None.

    A direct walk rather than `torch.utils._pytree`: flattening the 7B tree alone costs ~4x this whole
    check, which runs once per decoded token.
    """
    if type(want) is tuple:
        if not isinstance(node, torch.Tensor):
            return "", f"expected a tensor of shape {_show(want, vocab, tp)}, got {type(node).__name__}"
        shape = node.shape
        if shape == want or (want[0] == _PADDED_VOCAB and shape[1:] == want[1:] and shape[0] * tp >= vocab):
            return None
        return "", f"shape {tuple(shape)}, expected {_show(want, vocab, tp)}"
    if type(node) is not type(want):
        return "", f"expected a {type(want).__name__}, got {type(node).__name__}"
    if type(want) is list and len(node) != len(want):
        return "", f"{len(node)} layers, expected {len(want)}"
    if type(want) is dict and node.keys() != want.keys():
        missing = [k for k in want if k not in node]
        return (str(missing[0]), "missing") if missing else (str(next(k for k in node if k not in want)), "unexpected")
    for key, child in (want.items() if type(want) is dict else enumerate(want)):
        problem = _mismatch(node[key], child, vocab, tp)
        if problem is not None:
            return "/".join(filter(None, (str(key), problem[0]))), problem[1]
    return None


def _show(shape: tuple[int, ...], vocab: int, tp: int) -> str:
    """An expected shape for messages; padded vocab rows show their lower bound, e.g. `(>=16000, 4096)`."""
    dims = [f">={-(-vocab // tp)}" if d == _PADDED_VOCAB else str(d) for d in shape]
    return f"({', '.join(dims)}{',' if len(dims) == 1 else ''})"


# ---- path-aware tree utilities (torch.utils._pytree; dict insertion order is kept) ---------------

def _is_shape(x) -> bool:
    return isinstance(x, tuple) and all(isinstance(d, int) for d in x)


def _key_name(key) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_str(key_path) -> str:
    """`(MappingKey('layers'), SequenceKey(3), ...)` -> `'layers/3/...'`."""
    return "/".join(_key_name(k) for k in key_path)


def leaves_with_paths(tree, is_leaf: Callable | None = None) -> list[tuple[str, Any]]:
    """`[(path, leaf), ...]` in tree order."""
    flat, _ = pytree.tree_flatten_with_path(tree, is_leaf=is_leaf)
    return [(path_str(kp), leaf) for kp, leaf in flat]


def iter_paths(tree, is_leaf: Callable | None = None) -> Iterator[str]:
    return (p for p, _ in leaves_with_paths(tree, is_leaf))


def map_with_path(fn: Callable[[str, Any], Any], tree, *rest, is_leaf: Callable | None = None):
    """`tree_map` whose function also receives the leaf's path string first."""
    return pytree.tree_map_with_path(lambda kp, *xs: fn(path_str(kp), *xs), tree, *rest, is_leaf=is_leaf)


def tree_map(fn: Callable, tree, *rest):
    return pytree.tree_map(fn, tree, *rest)


def count_params(tree) -> int:
    return sum(leaf.numel() for leaf in pytree.tree_leaves(tree))


def tree_bytes(tree) -> int:
    return sum(leaf.numel() * leaf.element_size() for leaf in pytree.tree_leaves(tree))


def cast(tree, dtype: torch.dtype):
    """Every floating-point leaf cast to `dtype` (a new tree; the input is not modified)."""
    return pytree.tree_map(lambda x: x.to(dtype) if x.is_floating_point() else x, tree)


def get_path(tree, path: str):
    """The subtree or leaf at `'layers/3/attn/wq'`."""
    node = tree
    for part in path.split("/"):
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node
