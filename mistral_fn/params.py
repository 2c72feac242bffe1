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

import zlib
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils import _pytree as pytree

from mistral_fn.config import MistralConfig

Params = dict[str, Any]
INIT_STD = 0.02


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
