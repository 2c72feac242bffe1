"""Gradient mechanism × activation recomputation: time and peak memory of one loss+gradient.

    python -m benchmarks.bench_grad_mechanisms [--dim 256 --layers 4 --seq 512 --batch 2 --chunk 128]

Mechanisms: `torch.func.grad_and_value` and `train.value_and_grad` (`torch.autograd.grad` over
detached leaves). Recompute: none, `mistral_fn.remat.checkpoint` per layer (works under both), and
`torch.utils.checkpoint` (non-reentrant; autograd only: it fails under torch.func). Each case runs in a fresh process and
reports the growth of the peak RSS over the state after building params and batch (CPU) or
`torch.cuda.max_memory_allocated` (CUDA).
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import torch
import torch.utils.checkpoint as torch_ckpt

import mistral_fn as mf
from benchmarks.common import peak_bytes, reset_peak, run_isolated, sync
from mistral_fn import kernels, train
from mistral_fn.loss import _masked_loss_sum
from mistral_fn.model import attention_inputs, block, embed

CASES = [("func", "none"), ("func", "remat"), ("func", "torch_checkpoint"),
         ("autograd", "none"), ("autograd", "remat"), ("autograd", "torch_checkpoint")]


def torch_checkpoint_loss(params, batch, config, chunk_size=None):
    """The model with each layer under `torch.utils.checkpoint` (for comparison only)."""
    tokens = batch["tokens"]
    h = embed(params["embed"], tokens)
    cos, sin, mask = attention_inputs(None, *tokens.shape, config, tokens.device, h.dtype)
    for p in params["layers"]:
        h = torch_ckpt.checkpoint(block, p, h, cos, sin, mask, config, use_reentrant=False)
    h = kernels.rms_norm(h, params["norm"], config.norm_eps)
    m = batch["loss_mask"].float()
    return _masked_loss_sum(params["output"], h, batch["labels"], m, config, mf.SINGLE_DEVICE, chunk_size) / m.sum()


def run_case(args) -> dict:
    device = torch.device(args.device)
    cfg = mf.MistralConfig(vocab_size=32000, dim=args.dim, n_layers=args.layers, n_heads=8, n_kv_heads=4,
                           ffn_dim=args.dim * 11 // 4, max_seq_len=args.seq)
    params = mf.init_params(cfg, seed=0, device=device)
    x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(0))
    x = x.to(device)
    batch = {"tokens": x[:, :-1], "labels": x[:, 1:], "loss_mask": torch.ones_like(x[:, 1:])}
    chunk = args.chunk or None
    loss = functools.partial(torch_checkpoint_loss, chunk_size=chunk) if args.remat == "torch_checkpoint" else \
        functools.partial(mf.loss_fn, recompute=args.remat == "remat", chunk_size=chunk)
    grad_fn = torch.func.grad_and_value(loss) if args.mechanism == "func" else train.value_and_grad(loss)
    base = reset_peak(device)
    try:
        grad_fn(params, batch, cfg)  # warm-up
    except Exception as e:  # noqa: BLE001 - a benchmark reports what fails
        return {"mechanism": args.mechanism, "remat": args.remat, "error": f"{type(e).__name__}: {str(e)[:80]}"}
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        out = grad_fn(params, batch, cfg)
        sync(device)
        times.append(time.perf_counter() - start)
        del out
    return {"mechanism": args.mechanism, "remat": args.remat, "seconds": min(times),
            "peak_mib": (peak_bytes(device) - base) / 2**20}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=128, help="loss chunk size (0: whole sequence)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--mechanism")
    parser.add_argument("--remat")
    args = parser.parse_args()
    if args.mechanism:
        print(json.dumps(run_case(args)))
        return
    print(f"dim {args.dim}, layers {args.layers}, batch {args.batch} x seq {args.seq}, loss chunk {args.chunk}, "
          f"{args.device}")
    print(f"{'mechanism':10} {'recompute':18} {'seconds':>8} {'peak MiB':>9}")
    for mechanism, remat in CASES:
        r = run_isolated("benchmarks.bench_grad_mechanisms", ["--mechanism", mechanism, "--remat", remat] + [
            f"--{k}={getattr(args, k)}" for k in ("dim", "layers", "seq", "batch", "repeats", "chunk", "device")])
        if "error" in r:
            print(f"{mechanism:10} {remat:18} fails: {r['error']}")
        else:
            print(f"{mechanism:10} {remat:18} {r['seconds']:8.3f} {r['peak_mib']:9.1f}")


if __name__ == "__main__":
    main()
