"""Decode tokens/s (batch 1 and 8) and prefill time of `mistral_fn.generate` against transformers'
`generate` with its KV cache, on the same ~100M-parameter random model in the same run, plus the
fraction of the memory-bandwidth limit reached (weight bytes read per decode step against a measured
copy bandwidth). Not a test: it prints numbers and ratios.

    python -m benchmarks.bench_generate [--new_tokens=32 --prompt_len=128 --threads=0]
"""

from __future__ import annotations

import time

import torch
import transformers
from absl import app, flags

import mistral_fn as mf
from mistral_fn.generate import generate_stream
from mistral_fn.params import tree_bytes, tree_map
from tests.hf_reference import hf_model

_NEW = flags.DEFINE_integer("new_tokens", 32, "tokens decoded per run")
_PROMPT = flags.DEFINE_integer("prompt_len", 128, "prompt tokens per row")
_BATCHES = flags.DEFINE_list("batch_sizes", ["1", "8"], "batch sizes")
_THREADS = flags.DEFINE_integer("threads", 0, "torch CPU threads (0: torch's default)")
_REPEATS = flags.DEFINE_integer("repeats", 2, "runs per measurement; the fastest counts")
_DTYPE = flags.DEFINE_string("dtype", "float32", "float32 or bfloat16")
_DEVICE = flags.DEFINE_string("device", "cpu", "cpu or cuda")
_COMPILE = flags.DEFINE_bool("compile", True, "also measure decode with the torch.compile'd step")

# ~110M parameters: a Mistral shape scaled down (GQA 12/4, full vocabulary).
CONFIG = mf.MistralConfig(vocab_size=32000, dim=768, n_layers=12, n_heads=12, n_kv_heads=4, ffn_dim=2048,
                          max_seq_len=4096, sliding_window=None)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(device, nbytes=512 * 2**20) -> float:
    """Bytes moved per second (read + write) by a large tensor copy: the practical memory-bandwidth limit."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * nbytes / best


def ours(params, prompts, device, compile_decode=False):
    """(prefill seconds, decode seconds per step) from the streaming generator's step times."""
    times = [time.perf_counter()]
    for _ in generate_stream(params, prompts, CONFIG, max_new_tokens=_NEW.value, stop_ids=(),
                             compile_decode=compile_decode):
        sync(device)
        times.append(time.perf_counter())
    return times[1] - times[0], (times[-1] - times[1]) / (len(times) - 2)


def theirs(model, prompts, device):
    """(prefill seconds, decode seconds per step): generate 1 token, then `new_tokens`, greedy, with cache."""
    ids = torch.tensor(prompts, device=device)

    def run(n):
        sync(device)
        start = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n, min_new_tokens=n,
                       pad_token_id=0, eos_token_id=None)
        sync(device)
        return time.perf_counter() - start

    first = run(1)
    return first, (run(_NEW.value) - first) / (_NEW.value - 1)


def best_of(fn, *args):
    results = [fn(*args) for _ in range(_REPEATS.value)]
    return min(r[0] for r in results), min(r[1] for r in results)


def main(argv):
    del argv
    if _THREADS.value:
        torch.set_num_threads(_THREADS.value)
    device = torch.device(_DEVICE.value)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[_DTYPE.value]
    params = tree_map(lambda x: x.to(device=device, dtype=dtype), mf.init_params(CONFIG, seed=0))
    model = hf_model(CONFIG, params).to(device=device, dtype=dtype)
    transformers.logging.set_verbosity_error()
    # Per decode step every weight matrix is read once; of the embedding only B rows (negligible).
    weight_bytes = tree_bytes(params) - params["embed"].numel() * params["embed"].element_size()
    bandwidth = copy_bandwidth(device)
    print(f"model {mf.count_params(params) / 1e6:.0f}M params, {dtype}, {device}, {torch.get_num_threads()} threads; "
          f"prompt {_PROMPT.value}, {_NEW.value} new tokens; copy bandwidth {bandwidth / 1e9:.1f} GB/s; "
          f"weights read per step {weight_bytes / 1e6:.0f} MB")
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for batch in map(int, _BATCHES.value):
            prompts = torch.randint(3, CONFIG.vocab_size, (batch, _PROMPT.value), generator=g).tolist()
            ours(params, prompts, device)  # warm-up
            theirs(model, prompts, device)
            our_prefill, our_step = best_of(ours, params, prompts, device)
            hf_prefill, hf_step = best_of(theirs, model, prompts, device)
            limit = weight_bytes / bandwidth  # seconds per step if only weight reads cost time
            print(f"batch {batch}: decode ours {batch / our_step:,.1f} tok/s vs transformers {batch / hf_step:,.1f} "
                  f"tok/s (x{hf_step / our_step:.2f}); bandwidth limit reached: ours {limit / our_step:.0%}, "
                  f"transformers {limit / hf_step:.0%}; prefill ours {our_prefill * 1e3:,.0f} ms vs transformers "
                  f"{hf_prefill * 1e3:,.0f} ms (x{hf_prefill / our_prefill:.2f})")
            if _COMPILE.value:
                ours(params, prompts, device, True)  # compiles (tens of seconds)
                _, compiled_step = best_of(ours, params, prompts, device, True)
                print(f"batch {batch}: decode ours compiled {batch / compiled_step:,.1f} tok/s "
                      f"(x{hf_step / compiled_step:.2f} transformers); bandwidth limit reached "
                      f"{limit / compiled_step:.0%}")


if __name__ == "__main__":
    app.run(main)
