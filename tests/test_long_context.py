"""Long context in linear memory: a training step's peak memory grows linearly in T, with and without
a sliding window, because attention never holds a `[T, T]` score or mask tensor.

The blocked kernels are checked against `attention.attention_reference` (explicit softmax over the whole
mask) for values and gradients, past the block size, with arbitrary positions and through the KV cache.

The memory points run in fresh processes (`python tests/test_long_context.py T [--window W]` prints
the growth of the peak RSS over one forward + backward of a small model: the tiny preset's shape with a
256-token vocabulary, so the head does not dominate). Several lengths print a table:
`python tests/test_long_context.py 2048 4096 8192 16384 --window 512`.
"""

import argparse
import json
import resource
import subprocess
import sys

import pytest
import torch

import mistral_fn as mf
from mistral_fn import attention
from mistral_fn.generate import left_pad

MB = 2**20
LONG = mf.MistralConfig.tiny().replace(vocab_size=256, n_layers=1)


def peak_growth_mb(seq: int, window: int | None) -> float:
    """Peak RSS growth (MiB) of one value-and-grad of the loss over one `[1, seq]` sequence."""
    config = LONG.replace(sliding_window=window, max_seq_len=seq)
    params = mf.init_params(config, seed=0)
    x = torch.randint(0, config.vocab_size, (1, seq + 1), generator=torch.Generator().manual_seed(0))
    batch = {"tokens": x[:, :-1], "labels": x[:, 1:], "loss_mask": torch.ones(1, seq, dtype=torch.int64)}
    with open("/proc/self/statm") as f:
        before = int(f.read().split()[1]) * resource.getpagesize()
    mf.value_and_grad(lambda p: mf.loss_fn(p, batch, config))(params)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before) / MB


def measure(seq: int, window: int | None) -> float:
    """`peak_growth_mb` in a fresh process."""
    args = [sys.executable, __file__, str(seq)] + ([] if window is None else ["--window", str(window)])
    done = subprocess.run(args, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])[str(seq)]



@pytest.mark.slow
def test_peak_memory_grows_linearly_in_sequence_length():
    """8K -> 16K tokens: the peak grows about 2x (a [T, T] mask or score tensor would make it ~4x)."""
    for window in (None, 512):
        short, long = measure(8192, window), measure(16384, window)
        assert long < 2.5 * short, f"window={window}: +{short:.0f} MiB at 8K but +{long:.0f} MiB at 16K"


def _qkv(seq, heads=4, kv_heads=2, head_dim=8, seed=0, batch=2):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seq, heads, head_dim, generator=g, requires_grad=True)
    k = torch.randn(batch, seq, kv_heads, head_dim, generator=g, requires_grad=True)
    v = torch.randn(batch, seq, kv_heads, head_dim, generator=g, requires_grad=True)
    return q, k, v


def _values_and_grads(fn, q, k, v):
    out = fn(q, k, v)
    grads = torch.autograd.grad((out * torch.linspace(-1, 1, out.shape[-1])).sum(), (q, k, v))
    return out, grads


def _assert_matches_reference(mask, window, q, k, v):
    ours = _values_and_grads(lambda *x: attention.attention(*x, mask, window), q, k, v)
    ref = _values_and_grads(lambda *x: attention.attention_reference(*x, mask, window), q, k, v)
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(ours[1], ref[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("seq,window", [(20, 1), (20, 7), (21, 20), (40, 19), (1300, 600), (1100, None)])
def test_causal_and_sliding_window_blocks_equal_reference(seq, window):
    """Windows of 1, shorter than, equal to and longer than the block size; partial last blocks."""
    _assert_matches_reference(None, window, *_qkv(seq))


@pytest.mark.parametrize("window", [None, 5])
def test_position_masks_equal_reference_past_the_block_size(window):
    """Arbitrary positions (repeats, gaps, decreasing runs, negatives) over three query blocks."""
    seq = 2 * attention.QUERY_BLOCK + 37
    g = torch.Generator().manual_seed(1)
    positions = torch.randint(-3, seq // 4, (2, seq), generator=g)
    _assert_matches_reference(attention.KeyMask(positions, positions, window), window, *_qkv(seq))


def test_no_mask_or_score_tensor_is_quadratic(monkeypatch):
    """Every SDPA call of a 2,000-token window-64 forward + backward sees at most QUERY_BLOCK query rows
    against a key band, or a causal call with no mask at all."""
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording_sdpa(q, k, v, attn_mask=None, **kw):
        seen.append((q.shape[2], k.shape[2], None if attn_mask is None else attn_mask.shape[-2:]))
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", recording_sdpa)
    q, k, v = _qkv(2000, batch=1)
    _values_and_grads(lambda *x: attention.attention(*x, None, 64), q, k, v)
    assert seen[0] == (64, 64, None)
    for rows, keys, mask in seen[1:]:
        assert rows <= attention.QUERY_BLOCK and keys == rows + 63 and mask == (rows, keys)


def test_prefill_of_2048_tokens_uses_flash_blocks_and_equals_the_uncached_forward(monkeypatch):
    """A 2,048-token prefill in one chunk (left-padded rows): the flash kernel runs on blocks of at
    most QUERY_BLOCK query rows (no [T, T] float32 scores, no [T, T] mask), and the logits equal the
    uncached forward of each row."""
    config = LONG.replace(max_seq_len=2048)
    params = mf.init_params(config, seed=0)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (2048, 2000)]
    tokens, positions = left_pad(prompts, config.eos_id)
    cache = mf.init_cache(params, config, 2, 2048)
    mask_rows = []
    rows = attention.KeyMask.rows
    monkeypatch.setattr(attention.KeyMask, "rows", lambda self, i, j: mask_rows.append(j - i) or rows(self, i, j))
    with torch.profiler.profile() as prof:
        logits, _ = mf.forward_with_cache(params, tokens, config, cache, positions)
    ops = {e.name for e in prof.events()}
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in ops and "aten::softmax" not in ops
    assert max(mask_rows) == attention.QUERY_BLOCK
    for b, prompt in enumerate(prompts):
        alone = mf.forward(params, torch.tensor([prompt]), config)[0]
        torch.testing.assert_close(logits[b, -len(prompt):], alone, rtol=1e-4, atol=1e-4)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("seq", type=int, nargs="+")
    parser.add_argument("--window", type=int, default=None)
    cli = parser.parse_args()
    if len(cli.seq) == 1:
        print(json.dumps({str(cli.seq[0]): peak_growth_mb(cli.seq[0], cli.window)}))
    else:
        for seq in cli.seq:
            print(f"T={seq:6d} window={cli.window}: peak +{measure(seq, cli.window):7.0f} MiB", flush=True)
