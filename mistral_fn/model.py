"""The Mistral decoder as pure functions over the parameter pytree (see `params.py` for the layout).

Every function takes what it uses as arguments and returns new tensors. Tensor parallelism enters
only through the `tp` argument (`parallel.TensorParallel`): the same code runs on full weights
(`tp=SINGLE_DEVICE`, no collective) or on one rank's Megatron shards, where head counts, the ffn
width and the vocab slice are read from the local weight shapes. With sequence parallelism the
residual stream between `tp.reduce_from` and `tp.copy_to` is this rank's slice of the sequence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mistral_fn import attention, kernels, kv_cache, remat, tracing
from mistral_fn.config import MistralConfig
from mistral_fn.errors import InputError
from mistral_fn.parallel import SINGLE_DEVICE, TensorParallel
from mistral_fn.params import check_params


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos, sin `[B, T, 1, head_dim]` for integer `positions` `[B, T]`, computed in `promote(float32,
    dtype)` (float32 for bf16/fp16/fp32, float64 for float64) and cast to `dtype`."""
    compute = torch.promote_types(dtype, torch.float32)
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).to(compute) / head_dim
    inv_freq = 1.0 / theta ** exponents
    freqs = positions.to(compute)[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def embed(table: torch.Tensor, tokens: torch.Tensor, tp: TensorParallel = SINGLE_DEVICE) -> torch.Tensor:
    """Token embedding `[B, T, D]`. Under TP, `table` holds rows `[rank*n, (rank+1)*n)` of the vocab
    (under SP the result is this rank's `[B, T/tp, D]` slice of the sequence)."""
    if tp.size == 1:
        return F.embedding(tokens, table)
    rows = table.shape[0]
    local = tokens - tp.rank * rows
    outside = (local < 0) | (local >= rows)
    out = F.embedding(local.masked_fill(outside, 0), table).masked_fill(outside[..., None], 0.0)
    return tp.reduce_from(out)


def self_attention(p, h, norm, cos, sin, mask, config: MistralConfig, tp: TensorParallel = SINGLE_DEVICE, kv=None):
    """Attention sub-block on the residual stream `h` `[B, T, D]`: RMSNorm with `norm`, column-parallel q/k/v
    (rotated; local head counts under TP), row-parallel wo.

    `kv` (`kv_cache.layer_update`) maps this chunk's keys/values to those attended over (with a cache).
    """
    q, k, v = kernels.norm_linear(h, norm, config.norm_eps, tp, p["wq"], p["wk"], p["wv"])
    B, T, hd = q.shape[0], q.shape[1], config.head_dim  # T: the whole sequence under SP
    q, k = kernels.apply_rope(q.view(B, T, -1, hd), cos, sin), kernels.apply_rope(k.view(B, T, -1, hd), cos, sin)
    v = v.view(B, T, -1, hd)
    if kv is not None:
        k, v = kv(k, v)
    out = attention.attention(q, k, v, mask, config.sliding_window)
    return tp.reduce_from(kernels.linear(out.flatten(2), p["wo"]))


def mlp(p: dict, h: torch.Tensor, norm: torch.Tensor, config: MistralConfig,
        tp: TensorParallel = SINGLE_DEVICE) -> torch.Tensor:
    """SwiGLU MLP on the residual stream `h`: `w_down(silu(w_gate x) * w_up x)`, x = RMSNorm(h) with `norm`;
    column-parallel gate/up, row-parallel down."""
    gate, up = kernels.norm_linear(h, norm, config.norm_eps, tp, p["w_gate"], p["w_up"])
    return tp.reduce_from(kernels.swiglu_linear(gate, up, p["w_down"]))


def block(p, h, cos, sin, mask, config: MistralConfig, tp: TensorParallel = SINGLE_DEVICE, kv=None):
    """One pre-norm decoder layer (`kv`: see `self_attention`)."""
    h = h + self_attention(p["attn"], h, tp.replicated(p["attn_norm"]), cos, sin, mask, config, tp, kv)
    return h + mlp(p["mlp"], h, tp.replicated(p["mlp_norm"]), config, tp)


def check_tokens(tokens: torch.Tensor, config: MistralConfig) -> None:
    """Raise `InputError` unless `tokens` is an integer `[B, T]` tensor of ids in `[0, vocab_size)`.

    The ids are read only where the tensor is concrete (`tracing.values_readable`): under vmap, inside
    `torch.compile` or on `meta` the shape and dtype are checked and the values are not.
    """
    if tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32):
        raise InputError(f"tokens must be an int64 tensor [batch, seq], got {tokens.dtype} {tuple(tokens.shape)}")
    if tokens.numel() == 0 or not tracing.values_readable(tokens):
        return
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi >= config.vocab_size:
        bad = lo if lo < 0 else hi
        raise InputError(f"token id {bad} is outside the vocabulary [0, {config.vocab_size})")


def check_tensor_parallel(tp: TensorParallel) -> None:
    """Raise `InputError` if TP collectives meet a transform they cannot follow: their autograd rules
    cover one reverse pass, not vmap, forward mode or a gradient of a gradient."""
    if tp.size > 1 and not tracing.only_reverse_mode():
        raise InputError(f"tensor parallelism (tp={tp.size}) supports one level of reverse-mode AD only, not vmap, "
                         "jvp/jacfwd or nested gradients; apply those transforms to the single-device model")


def attention_inputs(positions: torch.Tensor | None, batch: int, seq: int, config: MistralConfig, device, dtype):
    """(cos, sin, mask) for self-attention over `seq` tokens at `positions` (`[T]` or `[B, T]`;
    default `0..T-1`). The mask is None for the default positions (the kernels' causal and sliding-window
    paths), else an `attention.KeyMask` comparing positions (never a `[T, T]` tensor)."""
    default = positions is None
    positions = torch.arange(seq, device=device) if default else positions
    positions = positions.expand(batch, seq) if positions.dim() == 1 else positions
    mask = None if default else attention.KeyMask(positions, positions, config.sliding_window)
    cos, sin = rope_tables(positions, config.head_dim, config.rope_theta, dtype)
    return cos, sin, mask


def hidden_states(params, tokens, config: MistralConfig, *, positions=None, tp: TensorParallel = SINGLE_DEVICE,
                  recompute: bool = False):
    """Final-normed hidden states `[B, T, D]` in the params' dtype (`[B, T/tp, D]`, this rank's slice of the
    sequence, under sequence parallelism). `recompute` wraps each layer in `remat.checkpoint` (activations
    recomputed in backward; works under autograd and torch.func)."""
    check_params(params, config, tp.size)
    check_tokens(tokens, config)
    check_tensor_parallel(tp)
    h = embed(params["embed"], tokens, tp)
    cos, sin, mask = attention_inputs(positions, *tokens.shape, config, tokens.device, h.dtype)

    def layer_fn(p, x, c, s, m):
        return block(p, x, c, s, m, config, tp)

    layer_fn = remat.checkpoint(layer_fn) if recompute else layer_fn
    for layer in params["layers"]:
        h = layer_fn(layer, h, cos, sin, mask)
    return kernels.rms_norm(h, tp.replicated(params["norm"]), config.norm_eps)


def output_logits(params, h: torch.Tensor, config: MistralConfig, tp: TensorParallel = SINGLE_DEVICE) -> torch.Tensor:
    """Logits `[B, T, V_local]` over this rank's vocab slice, in float32 (float64 for float64 params);
    padded vocab columns are -inf. Under SP, `h` is this rank's `[B, T/tp, D]` slice; the logits cover the
    slices of all ranks in rank order."""
    head = params["output"]
    logits = kernels.linear(tp.copy_to(h), head)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    start = tp.rank * head.shape[0]
    if start + head.shape[0] > config.vocab_size:
        padded = torch.arange(start, start + head.shape[0], device=logits.device) >= config.vocab_size
        logits = logits.masked_fill(padded, float("-inf"))
    return logits


def forward(params, tokens, config: MistralConfig, *, positions=None, tp: TensorParallel = SINGLE_DEVICE) -> torch.Tensor:
    """tokens `[B, T]` int64 -> float32 logits `[B, T, V]` (`[B, T, V_padded/tp]` on a TP rank).

    `positions` (`[T]` or `[B, T]`, default `0..T-1`) set the rotary phases and the causal/window mask.
    """
    return output_logits(params, hidden_states(params, tokens, config, positions=positions, tp=tp), config, tp)


def hidden_states_with_cache(params, tokens, config: MistralConfig, cache, positions, *,
                             tp: TensorParallel = SINGLE_DEVICE):
    """`(hidden [B, C, D], cache)` for a chunk `tokens` `[B, C]` at `positions` `[B, C]` continuing `cache`
    (`kv_cache.init_cache`; donated: continue from the returned one). Negative positions mark left
    padding: computed, never attended to by real tokens."""
    check_params(params, config, tp.size)
    check_tokens(tokens, config)
    check_tensor_parallel(tp)
    if positions.shape != tokens.shape:
        raise InputError(f"positions {tuple(positions.shape)} do not match tokens {tuple(tokens.shape)}")
    h = embed(params["embed"], tokens, tp)
    step = kv_cache.plan_step(cache, positions, config.sliding_window)
    cache = kv_cache.advance(cache, step, tokens.shape[1])
    cos, sin = rope_tables(positions, config.head_dim, config.rope_theta, h.dtype)
    for i, layer in enumerate(params["layers"]):
        h = block(layer, h, cos, sin, step.mask, config, tp, kv_cache.layer_update(cache, i, step))
    return kernels.rms_norm(h, params["norm"], config.norm_eps), cache


def forward_with_cache(params, tokens, config: MistralConfig, cache, positions, *, tp: TensorParallel = SINGLE_DEVICE):
    """`(logits [B, C, V] float32, cache)`: `forward` of one chunk continuing a KV cache (see
    `hidden_states_with_cache`); the same logits as the uncached forward over the whole sequence."""
    h, cache = hidden_states_with_cache(params, tokens, config, cache, positions, tp=tp)
    return output_logits(params, h, config, tp), cache
