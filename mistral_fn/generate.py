"""Batched autoregressive generation over the KV cache, on one device or a TP group.

Prompts are lists of token ids of any lengths. They are left-padded into one `[B, T]` matrix; row b's
positions are `column - pad_b` (padding negative, never attended to), so every row computes exactly
what it would alone. The prompt is prefilled in chunks, then one token per step is decoded. Under TP
the vocab-slice logits of the ranks are combined (`full_vocab_logits`) and every rank samples with the same
seeded generator, so all ranks emit the same tokens.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Sequence

import torch

from mistral_fn import kv_cache, sampling
from mistral_fn.config import MistralConfig
from mistral_fn.errors import InputError
from mistral_fn.kv_cache import init_cache
from mistral_fn.model import hidden_states_with_cache, output_logits
from mistral_fn.parallel import SINGLE_DEVICE, TensorParallel
from mistral_fn.params import check_params

DEFAULT_PREFILL_CHUNK = 4096  # a prompt up to this long is one chunk: causal attention over its own keys


def check_prompts(prompts: Sequence[Sequence[int]], config: MistralConfig, max_new_tokens: int) -> None:
    """Raise `InputError` on no prompts, an empty prompt, or a prompt + `max_new_tokens` past the context."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise InputError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    if len(prompts) == 0:
        raise InputError("no prompts given")
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise InputError(f"prompt {i} is empty")
        if len(prompt) + max_new_tokens > config.max_seq_len:
            raise InputError(f"prompt {i} has {len(prompt)} tokens; with max_new_tokens={max_new_tokens} it exceeds "
                             f"the context of {config.max_seq_len}")


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """`(tokens, positions)`, both int64 `[B, max_len]`: prompts right-aligned after `pad_id`s, positions
    counting from 0 at each prompt's first token (negative on the padding)."""
    width = max(len(p) for p in prompts)
    tokens = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts], dtype=torch.int64, device=device)
    pads = torch.tensor([width - len(p) for p in prompts], device=device)
    return tokens, torch.arange(width, device=device) - pads[:, None]


def full_vocab_logits(params, h: torch.Tensor, config: MistralConfig, tp: TensorParallel) -> torch.Tensor:
    """float32 logits `[B, V]` over the whole vocabulary for the last hidden states of `h` `[B, T, D]`.

    Under TP each rank's vocab slice is placed at its offset in a zero `[B, V_padded]` tensor and the
    tensors are summed over the group (every column has one owner, so the result is exact and the same
    on every rank). The slice is made contiguous: a strided input takes a slow batched-matmul path.
    """
    logits = output_logits(params, h[:, -1:].contiguous(), config, tp)[:, 0]
    if tp.size > 1:
        local = logits.shape[-1]
        full = logits.new_zeros(logits.shape[0], local * tp.size)
        full[:, tp.rank * local:(tp.rank + 1) * local] = logits
        logits = tp.all_reduce(full)
    return logits[:, :config.vocab_size]


def decode_logits(params, tokens, config: MistralConfig, cache, positions, *, tp: TensorParallel = SINGLE_DEVICE):
    """`(logits [B, V], cache)` of the last column after running the chunk `tokens` `[B, C]` through the
    cache: one decode step (C = 1), the function `generate_stream(compile_decode=True)` compiles."""
    h, cache = hidden_states_with_cache(params, tokens, config, cache, positions, tp=tp)
    return full_vocab_logits(params, h, config, tp), cache


def prefill(params, tokens, config: MistralConfig, cache, positions, *, chunk: int = DEFAULT_PREFILL_CHUNK,
            tp: TensorParallel = SINGLE_DEVICE):
    """`(logits [B, V] of the last column, cache)` after running `tokens` `[B, T]` through the cache in
    chunks of at most `chunk` columns."""
    if chunk < 1:
        raise InputError(f"prefill chunk must be >= 1, got {chunk}")
    for start in range(0, tokens.shape[1] - chunk, chunk):
        cols = slice(start, start + chunk)
        _, cache = hidden_states_with_cache(params, tokens[:, cols], config, cache, positions[:, cols], tp=tp)
    last = slice((tokens.shape[1] - 1) // chunk * chunk, None)
    return decode_logits(params, tokens[:, last], config, cache, positions[:, last], tp=tp)


def next_token_logits(params, prompts: Sequence[Sequence[int]], config: MistralConfig, *,
                      prefill_chunk: int = DEFAULT_PREFILL_CHUNK, tp: TensorParallel = SINGLE_DEVICE) -> torch.Tensor:
    """float32 logits `[B, V]` of the token following each prompt (a batched, cached prefill)."""
    check_prompts(prompts, config, 0)
    check_params(params, config, tp.size)  # before the cache reads the tree
    tokens, positions = left_pad(prompts, config.eos_id, params["embed"].device)
    cache = init_cache(params, config, len(prompts), tokens.shape[1])
    return prefill(params, tokens, config, cache, positions, chunk=prefill_chunk, tp=tp)[0]


def generate_stream(params, prompts: Sequence[Sequence[int]], config: MistralConfig, *, max_new_tokens: int,
                    temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                    repetition_penalty: float = 1.0, seed: int = 0, stop_ids: Sequence[int] | None = None,
                    stop_strings: Sequence[str] = (), tokenizer=None, prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
                    compile_decode: bool | str = False,
                    tp: TensorParallel = SINGLE_DEVICE) -> Iterator[list[int | None]]:
    """Yield, once per decoding step, a list with the new token of each prompt, or None for a prompt
    that has finished (at this step or before).

    A prompt finishes when it emits one of `stop_ids` (default: `config.eos_id`; the stop token is not
    yielded), when the text of its new tokens contains one of `stop_strings` (needs `tokenizer`; the
    token completing the string is yielded), or after `max_new_tokens`. `temperature=0` is greedy;
    otherwise tokens are drawn with a generator seeded by `seed` (see `sampling.sample`).
    `compile_decode` runs the one-token decode step (`decode_logits`: the model, the cache update and the
    head) as one `torch.compile`d graph with static shapes: compiled once, tens of seconds on a CPU; then
    no per-op overhead, and on a CPU each weight matrix is read in one fused pass (`kernels.linear`). A string
    is a `torch.compile` mode, e.g. `"reduce-overhead"` (CUDA graphs on a GPU).
    """
    check_prompts(prompts, config, max_new_tokens)
    check_params(params, config, tp.size)  # before the cache reads the tree
    sampling.check_options(temperature, top_k, top_p, repetition_penalty)
    if stop_strings and tokenizer is None:
        raise InputError("stop_strings need a tokenizer to decode the generated text")
    if max_new_tokens == 0:
        return
    device = params["embed"].device
    tokens, positions = left_pad(prompts, config.eos_id, device)
    cache = init_cache(params, config, len(prompts), tokens.shape[1] + max_new_tokens - 1)
    logits, cache = prefill(params, tokens, config, cache, positions, chunk=prefill_chunk, tp=tp)
    stops = {config.eos_id} if stop_ids is None else set(stop_ids)
    generator = torch.Generator(device=device).manual_seed(seed)
    seen = None
    if repetition_penalty != 1.0:
        seen = torch.zeros(len(prompts), config.vocab_size, dtype=torch.bool, device=device)
        rows = [row for row, prompt in enumerate(prompts) for _ in prompt]
        seen[rows, [token for prompt in prompts for token in prompt]] = True
    outputs: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    position = positions[:, -1:]
    decode = decode_logits
    if compile_decode:  # sized for every step below; `written` as a tensor keeps one compiled graph
        mode = compile_decode if isinstance(compile_decode, str) else None
        decode, cache = torch.compile(decode_logits, mode=mode), kv_cache.as_decode_cache(cache)
    for step in range(max_new_tokens):
        next_ids = sampling.sample(logits, temperature=temperature, top_k=top_k, top_p=top_p,
                                   repetition_penalty=repetition_penalty, seen=seen, generator=generator)
        emitted: list[int | None] = []
        for row, token in enumerate(next_ids.tolist()):
            if done[row] or token in stops:
                done[row] = True
                emitted.append(None)
                continue
            outputs[row].append(token)
            emitted.append(token)
            done[row] = bool(stop_strings) and _ends_with_stop(tokenizer, outputs[row], stop_strings)
        yield emitted
        if all(done) or step == max_new_tokens - 1:
            return
        if seen is not None:
            seen.scatter_(1, next_ids[:, None], True)
        position = position + 1
        logits, cache = decode(params, next_ids[:, None], config, cache, position, tp=tp)


def generate(params, prompts: Sequence[Sequence[int]], config: MistralConfig, *, max_new_tokens: int,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None, seed: int = 0,
             **options) -> list[list[int]]:
    """The new token ids of each prompt (stop token excluded); greedy at `temperature=0`.

    `options`: `repetition_penalty`, `stop_ids`, `stop_strings`, `tokenizer`, `prefill_chunk`,
    `compile_decode`, `tp` (see `generate_stream`).
    """
    outputs: list[list[int]] = [[] for _ in prompts]
    for emitted in generate_stream(params, prompts, config, max_new_tokens=max_new_tokens, temperature=temperature,
                                   top_k=top_k, top_p=top_p, seed=seed, **options):
        for row, token in enumerate(emitted):
            if token is not None:
                outputs[row].append(token)
    return outputs


def stream_text(tokenizer, tokens: Iterable[int]) -> Iterator[str]:
    """Text pieces of a growing token sequence, yielded as soon as they are complete: their
    concatenation is `tokenizer.decode(all tokens)` (an incomplete UTF-8 character is held back)."""
    ids: list[int] = []
    shown = ""
    for token in tokens:
        ids.append(token)
        text = tokenizer.decode(ids)
        if text.endswith("\ufffd") or not text.startswith(shown):
            continue
        if len(text) > len(shown):
            yield text[len(shown):]
            shown = text
    text = tokenizer.decode(ids)
    if text.startswith(shown) and len(text) > len(shown):
        yield text[len(shown):]


def _ends_with_stop(tokenizer, ids: list[int], stop_strings: Sequence[str]) -> bool:
    """Whether the text of the last tokens contains a stop string (a UTF-8 character spans at most
    4 byte-fallback tokens, so 4 tokens per character of the longest string suffice)."""
    tail = tokenizer.decode(ids[-(4 * max(len(s) for s in stop_strings) + 4):])
    return any(s in tail for s in stop_strings)
