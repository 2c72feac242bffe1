"""Greedy decoding and prefill of `mistral_fn.generate` against transformers' `generate` (its KV cache), the
same random 125M Mistral in the same run, and decode against the memory-bandwidth limit.

    python -m benchmarks.bench_generate                  # fp32 CPU: decode batch 1 and 8, prefill 2,048
    python -m benchmarks.bench_generate --dtype=bf16     # where the CPU multiplies bf16 natively
    python -m benchmarks.bench_generate --device=cuda --dtype=bf16

Decode: a `--prompt`-token prompt, then `--new` tokens (no stop token); seconds per step from the time of
the first token to the last. transformers: `generate` of 1 token, then of `--new`, the difference over
`--new - 1` steps. Prefill: the time to the first token of a `--prefill`-token prompt. The bandwidth limit of
a decode step is the bytes of the weights it reads (all matrices, not the embedding table) over the read
bandwidth measured in the same run; the fraction reached is limit / measured step time. Ours eager and with
`compile_decode=True` (compiled once before timing). Every measurement alternates ours and theirs
`--repeats` times and keeps the fastest, the least disturbed by other work on a shared machine.
"""

from __future__ import annotations

import argparse
import time

import torch
import transformers

import mistral_fn as mf
from benchmarks.common import best_seconds, describe_machine, limits_line, read_bandwidth, sync
from mistral_fn import kernels
from mistral_fn.generate import generate_stream
from mistral_fn.params import tree_bytes, tree_map
from tests.hf_reference import hf_model

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# 125M parameters: the Mistral shape scaled down (GQA 12/4, the full vocabulary), as bench_train_step.
CONFIG = mf.MistralConfig(vocab_size=32000, dim=768, n_layers=12, n_heads=12, n_kv_heads=4, ffn_dim=2048,
                          max_seq_len=4096, sliding_window=None)


def ours(params, config, prompts, new_tokens, device, compile_decode=False):
    """(seconds to the first token, seconds per decode step)."""
    times = [time.perf_counter()]
    for _ in generate_stream(params, prompts, config, max_new_tokens=new_tokens, stop_ids=(),
                             compile_decode=compile_decode):
        sync(device)
        times.append(time.perf_counter())
    return times[1] - times[0], (times[-1] - times[1]) / max(len(times) - 2, 1)


def theirs(model, prompts, new_tokens, device):
    """(seconds to the first token, seconds per decode step) of transformers' greedy `generate`."""
    ids = torch.tensor(prompts, device=device)

    def run(n):
        sync(device)
        start = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n, min_new_tokens=n,
                       pad_token_id=0, eos_token_id=None)
        sync(device)
        return time.perf_counter() - start

    first = run(1)
    return first, ((run(new_tokens) - first) / (new_tokens - 1) if new_tokens > 1 else 0.0)


def products_alone(params, device, repeats: int) -> float:
    """Seconds of only the one-row products a decode step must do (every weight matrix once, as
    `kernels.linear` computes them under torch.compile), in one compiled graph: the floor of the
    compiled step, set by how fast that kernel streams the weights."""
    weights = [w for layer in params["layers"] for sub in (layer["attn"], layer["mlp"]) for w in sub.values()]
    weights.append(params["output"])
    inputs = [torch.zeros(1, w.shape[1], dtype=w.dtype, device=device) for w in weights]
    products = torch.compile(lambda xs, ws: [kernels.linear(x, w) for x, w in zip(xs, ws)])
    return best_seconds(lambda: products(inputs, weights), repeats, device)


def fastest(runs: dict, repeats: int) -> dict:
    """`{name: (first, step)}`: each of `runs` (name -> callable) called `repeats` times, alternating; the
    fastest first-token time and step time of each."""
    best = {name: (float("inf"), float("inf")) for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            first, step = run()
            best[name] = (min(best[name][0], first), min(best[name][1], step))
    return best


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompt", type=int, default=32, help="decode: prompt tokens per row")
    p.add_argument("--new", type=int, default=96, help="decode: new tokens per row")
    p.add_argument("--batches", default="1,8", help="decode batch sizes")
    p.add_argument("--prefill", type=int, default=2048, help="prefill: prompt tokens (0: skip)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    params = tree_map(lambda x: x.to(device=device, dtype=dtype), mf.init_params(CONFIG, seed=0))
    model = hf_model(CONFIG, params, attn="sdpa").to(device=device, dtype=dtype)
    transformers.logging.set_verbosity_error()
    weight_bytes = tree_bytes(params) - params["embed"].numel() * params["embed"].element_size()
    limits, _, bandwidth = limits_line(device, dtype)
    print(f"{time.strftime('%Y-%m-%d')}: {describe_machine(device)}\n{limits}\n"
          f"model {mf.count_params(params) / 1e6:.0f}M params, {args.dtype}; a decode step reads "
          f"{weight_bytes / 1e6:.0f} MB of weights", flush=True)
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for batch in map(int, args.batches.split(",")):
            prompts = torch.randint(3, CONFIG.vocab_size, (batch, args.prompt), generator=g).tolist()
            ours(params, CONFIG, prompts, 4, device, compile_decode=True)  # compiles (tens of seconds on a CPU)
            best = fastest({"ours": lambda: ours(params, CONFIG, prompts, args.new, device),
                            "compiled": lambda: ours(params, CONFIG, prompts, args.new, device, compile_decode=True),
                            "theirs": lambda: theirs(model, prompts, args.new, device)}, args.repeats)
            step = {name: s for name, (_, s) in best.items()}
            bandwidth = max(bandwidth, read_bandwidth(device))  # other work only ever lowers a measurement
            limit = weight_bytes / bandwidth  # seconds per decode step if reading the weights were all it cost
            print(f"decode limit: {weight_bytes / 1e6:.0f} MB at {bandwidth / 1e9:.1f} GB/s (the best read "
                  f"bandwidth measured so far) = {limit * 1e3:.2f} ms per step", flush=True)
            print(f"decode batch {batch}: transformers {batch / step['theirs']:,.1f} tokens/s "
                  f"({limit / step['theirs']:.0%} of the bandwidth limit); ours {batch / step['ours']:,.1f} tokens/s "
                  f"(x{step['theirs'] / step['ours']:.2f}, {limit / step['ours']:.0%}); ours compiled "
                  f"{batch / step['compiled']:,.1f} tokens/s (x{step['theirs'] / step['compiled']:.2f}, "
                  f"{limit / step['compiled']:.0%})", flush=True)
            if batch == 1:
                alone = products_alone(params, device, 5 * args.repeats)
                print(f"decode profile: the step's one-row products alone, one compiled graph, {alone * 1e3:.2f} ms = "
                      f"{weight_bytes / alone / 1e9:.1f} GB/s ({limit / alone:.0%} of the bandwidth limit); the "
                      f"compiled step {step['compiled'] * 1e3:.2f} ms", flush=True)
        if args.prefill:
            prompt = torch.randint(3, CONFIG.vocab_size, (1, args.prefill), generator=g).tolist()
            best = fastest({"ours": lambda: ours(params, CONFIG, prompt, 1, device),
                            "theirs": lambda: theirs(model, prompt, 1, device)}, args.repeats)
            first = {name: f for name, (f, _) in best.items()}
            print(f"prefill {args.prefill} tokens: ours {first['ours'] * 1e3:,.0f} ms, transformers "
                  f"{first['theirs'] * 1e3:,.0f} ms (x{first['theirs'] / first['ours']:.2f}); "
                  f"{args.prefill / first['ours']:,.0f} vs {args.prefill / first['theirs']:,.0f} tokens/s", flush=True)


if __name__ == "__main__":
    main()
