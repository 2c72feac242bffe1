"""One training step (forward + backward + AdamW) of ours against transformers' `MistralForCausalLM` with
`torch.optim.AdamW`, same config, same machine, same run.

    python -m benchmarks.bench_train_step                       # ~100M-parameter Mistral shape, CPU fp32
    python -m benchmarks.bench_train_step --device=cuda --dtype=bf16 --dim=4096 --layers=2 --heads=32 \\
        --kv_heads=8 --ffn=14336 --seq=4096                      # 7B-layer shape on a GPU

Ours: `train.make_train_step(donate=True)` with `loss_fn(chunk_size=...)` (float32 logits for `--chunk`
positions at a time) and `optim.adamw`; bf16 runs keep float32 master weights and moments, as
Megatron's `--bf16`. Theirs: `model(tokens).logits` + `F.cross_entropy`, `torch.optim.AdamW` (its
default implementation); bf16 runs use autocast over float32 weights.

Speed: both sides in one process, steps alternating, median wall and CPU (process) time per step; on
a shared machine the CPU-time ratio is the steadier one. Memory: each side alone in a fresh process.
Prints tokens/s, peak memory growth, model TFLOP/s and the fraction of the measured matmul peak, and
the ratios ours / theirs.
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import torch
import torch.nn.functional as F

import mistral_fn as mf
from benchmarks.common import matmul_peak_flops, peak_bytes, reset_peak, run_isolated, sync
from mistral_fn import optim, train

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def config(args) -> mf.MistralConfig:
    return mf.MistralConfig(vocab_size=args.vocab, dim=args.dim, n_layers=args.layers, n_heads=args.heads,
                            n_kv_heads=args.kv_heads, ffn_dim=args.ffn, max_seq_len=args.seq)


def batches(cfg, args, device):
    g = torch.Generator().manual_seed(0)
    for _ in range(args.steps + 1):
        x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=g).to(device)
        yield {"tokens": x[:, :-1], "labels": x[:, 1:], "loss_mask": torch.ones_like(x[:, 1:])}


def ours(cfg, args, device):
    dtype = DTYPES[args.dtype]
    opt = optim.adamw(1e-4, b2=0.95, weight_decay=0.1)
    loss = functools.partial(mf.loss_fn, config=cfg, chunk_size=args.chunk or None, recompute=args.recompute)
    step = train.make_train_step(loss, opt, micro_batch_size=args.batch, max_grad_norm=1.0,
                                 compute_dtype=None if dtype == torch.float32 else dtype, donate=True)
    state = train.init_train_state(mf.init_params(cfg, seed=0, device=device), opt)

    def run(batch):
        nonlocal state
        state, _ = step(state, batch)

    return run


def theirs(cfg, args, device):
    import transformers
    hf_config = transformers.MistralConfig(**cfg.to_hf())
    hf_config._attn_implementation = "sdpa"
    model = transformers.MistralForCausalLM(hf_config).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    autocast = args.dtype != "fp32"

    def run(batch):
        with torch.autocast(device.type, dtype=DTYPES[args.dtype], enabled=autocast):
            logits = model(batch["tokens"]).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return run


def run_case(args) -> dict:
    """`--side ours|theirs`: peak memory growth of warm-up + `--steps` steps, alone in this process.
    `--side both`: both sides resident, steps alternating, so machine load hits them alike: median
    seconds per step of each."""
    device = torch.device(args.device)
    cfg = config(args)
    torch.manual_seed(0)
    if args.side == "both":
        runs = {"ours": ours(cfg, args, device), "theirs": theirs(cfg, args, device)}
        data = list(batches(cfg, args, device))
        times = {(side, clock): [] for side in runs for clock in ("wall", "cpu")}
        for i, batch in enumerate(data):
            for side, run in runs.items():
                wall, cpu = time.perf_counter(), time.process_time()
                run(batch)
                sync(device)
                if i:  # the first step of each side is a warm-up
                    times[side, "wall"].append(time.perf_counter() - wall)
                    times[side, "cpu"].append(time.process_time() - cpu)
        tokens = args.batch * args.seq
        return {f"{side}_{clock}": tokens / sorted(t)[len(t) // 2] for (side, clock), t in times.items()}
    base = reset_peak(device)
    run = (ours if args.side == "ours" else theirs)(cfg, args, device)
    for batch in batches(cfg, args, device):
        run(batch)
    sync(device)
    return {"peak_mib": (peak_bytes(device) - base) / 2**20}


def flops_per_token(cfg: mf.MistralConfig, seq: int) -> float:
    """6 x (params - embedding) + causal attention 6 L T (H hd): the usual model FLOPs (no recompute)."""
    n = mf.count_params(mf.init_params(cfg, device="meta")) - cfg.vocab_size * cfg.dim
    return 6.0 * n + 6.0 * cfg.n_layers * seq * cfg.n_heads * cfg.head_dim


def main():
    p = argparse.ArgumentParser()
    for name, default in (("vocab", 32000), ("dim", 768), ("layers", 8), ("heads", 12), ("kv_heads", 4),
                          ("ffn", 2048), ("seq", 512), ("batch", 1), ("steps", 4), ("chunk", 128)):
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--recompute", action="store_true", help="ours: per-layer activation recomputation")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--side", choices=["ours", "theirs", "both"])
    args = p.parse_args()
    if args.side:
        print(json.dumps(run_case(args)))
        return
    cfg = config(args)
    device = torch.device(args.device)
    peak = matmul_peak_flops(device, DTYPES[args.dtype])
    fpt = flops_per_token(cfg, args.seq)
    print(f"{mf.count_params(mf.init_params(cfg, device='meta')) / 1e6:.1f}M params (dim {cfg.dim}, {cfg.n_layers} "
          f"layers, vocab {cfg.vocab_size}); batch {args.batch} x {args.seq}; {args.dtype} on {device}; "
          f"loss chunk {args.chunk}, recompute {args.recompute}; measured matmul peak {peak / 1e12:.3f} TFLOP/s")
    passthrough = [f"--{k}={getattr(args, k)}" for k in ("vocab", "dim", "layers", "heads", "kv_heads", "ffn", "seq",
                                                         "batch", "steps", "chunk", "dtype", "device")]
    passthrough += ["--recompute"] if args.recompute else []
    speed = run_isolated("benchmarks.bench_train_step", ["--side", "both", *passthrough])
    memory = {side: run_isolated("benchmarks.bench_train_step", ["--side", side, *passthrough])
              for side in ("ours", "theirs")}
    for r in (speed, *memory.values()):
        if "error" in r:
            raise SystemExit(f"benchmark failed: {r['error']}")
    for side in ("ours", "theirs"):
        tflops = speed[f"{side}_wall"] * fpt / 1e12
        print(f"{side:7} {speed[f'{side}_wall']:10.1f} tokens/s ({speed[f'{side}_cpu']:.1f} per CPU-second)  "
              f"peak +{memory[side]['peak_mib']:8.1f} MiB  {tflops:.3f} model TFLOP/s = {tflops * 1e12 / peak:.0%} "
              f"of matmul peak")
    print(f"ours / transformers: speed {speed['ours_wall'] / speed['theirs_wall']:.2f}x wall, "
          f"{speed['ours_cpu'] / speed['theirs_cpu']:.2f}x CPU time; "
          f"peak memory {memory['ours']['peak_mib'] / memory['theirs']['peak_mib']:.2f}x")

if __name__ == "__main__":
    main()
