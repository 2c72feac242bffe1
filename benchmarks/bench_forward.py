"""Forward and forward+backward of mistral_fn vs transformers' MistralForCausalLM, same weights, same run.

    python -m benchmarks.bench_forward [--dim 256 --layers 4 --seq 512 --batch 2 --repeats 5]

Prints median milliseconds and the ratio transformers / ours (> 1 means we are faster). Not a test.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import mistral_fn as mf
from tests.hf_reference import hf_model


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--window", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile(mf.forward)")
    args = ap.parse_args()
    cfg = mf.MistralConfig(vocab_size=32000, dim=args.dim, n_layers=args.layers, n_heads=8, n_kv_heads=2,
                           ffn_dim=args.dim * 7 // 2, sliding_window=args.window)
    params = mf.init_params(cfg, seed=0)
    model = hf_model(cfg, params, attn="sdpa")
    x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1))
    batch = {"tokens": x[:, :-1], "labels": x[:, 1:], "loss_mask": torch.ones_like(x[:, 1:])}

    def ours_fwd():
        with torch.no_grad():
            mf.forward(params, batch["tokens"], cfg)

    def hf_fwd():
        with torch.no_grad():
            model(batch["tokens"])

    def ours_grad():
        torch.func.grad(mf.loss_fn)(params, batch, cfg)

    def hf_grad():
        model.zero_grad(set_to_none=True)
        logits = model(batch["tokens"]).logits.float()
        F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten()).backward()

    print(f"config: dim {cfg.dim}, layers {cfg.n_layers}, heads 8/2, vocab {cfg.vocab_size}, "
          f"batch {args.batch} x {args.seq} tokens, window {cfg.sliding_window}, threads {torch.get_num_threads()}")
    rows = [("forward", ours_fwd, hf_fwd), ("forward+backward", ours_grad, hf_grad)]
    if args.compile:
        compiled = torch.compile(mf.forward)

        def ours_compiled():
            with torch.no_grad():
                compiled(params, batch["tokens"], cfg)

        rows.append(("compiled forward", ours_compiled, hf_fwd))
    for name, ours, ref in rows:
        a, b = median_ms(ours, args.repeats), median_ms(ref, args.repeats)
        print(f"{name:>17}: mistral_fn {a:8.1f} ms   transformers {b:8.1f} ms   ratio {b / a:.2f}x")


if __name__ == "__main__":
    main()
