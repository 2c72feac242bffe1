"""A static, preallocated key/value cache: a pytree passed into the cached forward and returned by it.

Layout, for a batch of B rows, S slots, and the local kv heads of each layer::

    k, v      list over layers of [B, S, KV, hd]   (BSND, the attention kernel's layout)
    pos       [B, S] int64   position of the token held in each slot; -1 = empty or left padding
    written   int            tokens written so far, counted in columns of the (left-padded) batch; or a
                             0-d int64 tensor (`as_decode_cache`), so a compiled decode step does not
                             specialise on it, with the capacity check left to the caller

Column `t` of the batch is stored in slot `t % S` in every row; each row keeps its own positions in
`pos` (with left padding, row b's column t is at position `t - pad_b`; padding has negative positions and
is stored as -1, so it is never attended to). Without a sliding window, S is the capacity asked for
(at most `max_seq_len`) and writing past it raises. With a window W (and capacity >= W), S = W and the
cache is a ring: each query sees the W most recent positions including itself (HF semantics), so a
slot may be overwritten as soon as its position leaves the window of every query still to come.

A chunk of C tokens meets the cache in one of three ways (`plan_step`):
  * own keys (the first chunk of an empty cache, positions `0..C-1` in every row, i.e. no padding): its
    queries attend over the chunk's own keys by index, causal attention with the kernels' flash and
    sliding-window paths and no mask at all, as the uncached forward; then it is written;
  * write first (no ring, or C == 1): the chunk is written, then its queries attend over the S slots;
  * attend first (a ring and C > 1): the queries attend over the S old slots concatenated with the C new
    keys, then the chunk's last min(C, S) tokens are written. Scores are `C x (S + C)`, so a long prompt
    prefilled in chunks never materialises a `T x T` matrix.

Worked example, W = S = 4, one row, a 6-token prompt prefilled in one chunk, then two decode steps::

    prefill t=0..5 (C=6, attend first): query 5 sees keys 2..5 among [4 empty slots + 6 new keys];
                   then t=2..5 are written to slots 2, 3, 0, 1       -> pos = [4, 5, 2, 3]
    decode t=6 (C=1, write first): slot 6 % 4 = 2 drops position 2  -> pos = [4, 5, 6, 3]
                   query 6 attends to positions 3, 4, 5, 6 (W keys including itself)
    decode t=7: slot 3 drops position 3                               -> pos = [4, 5, 6, 7]

The buffers are updated in place and the returned cache shares them, like a JAX function whose cache
argument is donated: always continue from the returned cache, never from the one passed in. Under vmap,
forward-mode AD or nested gradients (which cannot write a transformed value into a plain buffer) the
returned cache holds new buffers instead; the values are the same.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from mistral_fn import tracing
from mistral_fn.config import MistralConfig
from mistral_fn.errors import InputError
from mistral_fn.attention import KeyMask

Cache = dict


def init_cache(params, config: MistralConfig, batch: int, max_len: int) -> Cache:
    """An empty cache for `batch` rows and `max_len` columns (prompt + new tokens), in the params'
    dtype and device, with the local kv heads of `params` (so a TP rank gets its own heads)."""
    if not 0 < max_len <= config.max_seq_len:
        raise InputError(f"cache length {max_len} must be in [1, max_seq_len={config.max_seq_len}]")
    window = config.sliding_window
    slots = min(window, max_len) if window is not None else max_len
    wk = params["layers"][0]["attn"]["wk"]
    shape = (batch, slots, wk.shape[0] // config.head_dim, config.head_dim)
    return {
        "k": [torch.zeros(shape, dtype=wk.dtype, device=wk.device) for _ in params["layers"]],
        "v": [torch.zeros(shape, dtype=wk.dtype, device=wk.device) for _ in params["layers"]],
        "pos": torch.full((batch, slots), -1, dtype=torch.int64, device=wk.device),
        "written": 0,
    }


@dataclasses.dataclass(frozen=True)
class CacheStep:
    """How one chunk of C columns meets the cache (shared by all layers of one forward).

    `index` `[n]`: slots receiving the chunk's last n = min(C, S) tokens; `write_first`: see the module
    docstring; `mask`: which of the K keys attended to (S, or S + C) each of the C queries sees, as
    positions (`mask.rows(i, j)` is the bool `[B, 1, j - i, K]` block; no `[C, K]` tensor is kept), or
    None when the queries attend over the chunk's own keys by index (see the module docstring);
    `pos`: the cache's `pos` after the write.
    """

    index: torch.Tensor
    write_first: bool
    mask: KeyMask | None
    pos: torch.Tensor


def plan_step(cache: Cache, positions: torch.Tensor, window: int | None) -> CacheStep:
    """Plan writing a chunk at `positions` `[B, C]` (negative = padding) into `cache`."""
    old = cache["pos"]
    (batch, chunk), slots, start = positions.shape, old.shape[1], cache["written"]
    if old.shape[0] != batch:
        raise InputError(f"positions have {batch} rows but the kv cache was made for {old.shape[0]}")
    ring = window is not None and slots >= window
    if isinstance(start, int) and not ring and start + chunk > slots:
        raise InputError(f"kv cache of {slots} slots is full: {start} written, {chunk} more requested")
    n = min(chunk, slots)
    columns = start + torch.arange(chunk, device=old.device)
    index = columns[chunk - n:] % slots
    stored = positions.masked_fill(positions < 0, -1)
    pos = old.index_copy(1, index, stored[:, chunk - n:])
    write_first = not ring or chunk == 1
    if _starts_empty(start, positions):
        return CacheStep(index, True, None, pos)
    if write_first:
        key_pos, own = pos, columns % slots
    else:
        key_pos, own = torch.cat([old, stored], dim=1), slots + torch.arange(chunk, device=old.device)
    # Empty slots and padding (position -1) are never visible, except that every query sees its own
    # key, so padding rows are never fully masked (which would give NaN).
    return CacheStep(index, write_first, KeyMask(positions, key_pos, window, key_pos >= 0, own), pos)


def _starts_empty(written, positions: torch.Tensor) -> bool:
    """Whether a chunk at `positions` `[B, C]` is the first of an empty cache with positions `0..C-1` in every
    row (read only where the values are concrete: `tracing.values_readable`)."""
    if not (isinstance(written, int) and written == 0 and tracing.values_readable(positions)):
        return False
    return torch.equal(positions, torch.arange(positions.shape[1], device=positions.device).expand_as(positions))


def layer_update(cache: Cache, layer: int, step: CacheStep) -> Callable:
    """`kv(k, v) -> (keys, values)` for layer `layer` of the cache `advance` returned: writes the chunk's
    k/v `[B, C, KV, hd]` into the cache and returns the `[B, K, KV, hd]` keys/values its queries
    attend over."""
    n = step.index.numel()

    def kv(k, v):
        k_buf, v_buf = cache["k"][layer], cache["v"][layer]
        attended = (k, v) if step.mask is None else None
        if not step.write_first:  # the old slots with the new keys, read before the write
            attended = torch.cat([k_buf, k], dim=1), torch.cat([v_buf, v], dim=1)
        cache["k"][layer] = _write(k_buf, step.index, k[:, k.shape[1] - n:])
        cache["v"][layer] = _write(v_buf, step.index, v[:, v.shape[1] - n:])
        return attended or (cache["k"][layer], cache["v"][layer])

    return kv


def _write(buf: torch.Tensor, index: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`buf` with slots `index` (dim 1) set to `x`: in place, or as a new tensor when a transform is
    active that cannot write into a plain buffer (see the module docstring)."""
    if tracing.only_reverse_mode():
        return buf.index_copy_(1, index, x)
    return buf.index_copy(1, index, x)


def as_decode_cache(cache: Cache) -> Cache:
    """`cache` with `written` as a 0-d int64 tensor on the cache's device, for a loop of compiled decode
    steps (a Python int would be a constant of the compiled graph, recompiled at every new value). The caller
    sizes the cache for the whole loop: a full cache without a window is no longer refused."""
    return {**cache, "written": torch.tensor(cache["written"], device=cache["pos"].device)}


def advance(cache: Cache, step: CacheStep, chunk: int) -> Cache:
    """The cache after `step` writes `chunk` columns: new `pos` and `written`, and new lists holding the
    same buffers, which `layer_update` then writes (so the caller's lists are never modified)."""
    return {**cache, "k": list(cache["k"]), "v": list(cache["v"]), "pos": step.pos,
            "written": cache["written"] + chunk}
