"""Peak memory and speed of a LoRA training step against a full fine-tuning step, ours on both sides.

    python -m benchmarks.bench_lora                              # ~100M-parameter Mistral shape, CPU, fp32 and bf16
    python -m benchmarks.bench_lora --device=cuda --dtypes=bf16 --dim=4096 --layers=4 --heads=32 --kv_heads=8 \\
        --ffn=14336 --seq=4096                                   # 7B-layer shape on a GPU

Full: `make_train_step` over all parameters with `optim.adamw`; bf16 runs keep float32 master weights and
moments (Megatron's `--bf16`). LoRA: the base stays frozen in the compute dtype, closed over by the loss
`loss_fn(lora.apply(base, adapters), ...)`; the train state holds only the adapters (float32) and their
moments. Both: `donate=True`, `loss_fn(chunk_size=--chunk)`, grad clipping 1.0.

Each case runs alone in a fresh process: peak memory growth from before the parameters are created to
after `--steps` steps (CUDA: peak allocated; CPU: peak RSS), and the median wall / CPU time per step.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import mistral_fn as mf
from benchmarks.common import peak_bytes, reset_peak, run_isolated, sync
from mistral_fn import optim, train
from mistral_fn.params import tree_bytes

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def config(args) -> mf.MistralConfig:
    return mf.MistralConfig(vocab_size=args.vocab, dim=args.dim, n_layers=args.layers, n_heads=args.heads,
                            n_kv_heads=args.kv_heads, ffn_dim=args.ffn, max_seq_len=args.seq)


def step_and_state(cfg, args, device):
    """(step, state, bytes held between steps: frozen base + trainable state) of `--side`."""
    dtype = DTYPES[args.dtype]
    compute = None if dtype == torch.float32 else dtype
    opt = optim.adamw(1e-4, b2=0.95, weight_decay=0.1)
    if args.side == "full":
        params = mf.init_params(cfg, seed=0, device=device)  # float32 master weights

        def loss(p, batch):
            return mf.loss_fn(p, batch, cfg, chunk_size=args.chunk)

        state, frozen = train.init_train_state(params, opt), 0
    else:
        base = mf.init_params(cfg, seed=0, device=device, dtype=dtype)  # frozen, in the compute dtype
        adapters = mf.lora.init(base, cfg, rank=args.rank, alpha=2 * args.rank, targets=args.targets, seed=0,
                                dtype=torch.float32)

        def loss(p, batch):
            return mf.loss_fn(mf.lora.apply(base, p), batch, cfg, chunk_size=args.chunk)

        state, frozen = train.init_train_state(adapters, opt), tree_bytes(base)
    step = train.make_train_step(loss, opt, micro_batch_size=args.batch, max_grad_norm=1.0, compute_dtype=compute,
                                 donate=True)
    held = frozen + tree_bytes(state.params) + tree_bytes(state.opt_state.mu) + tree_bytes(state.opt_state.nu)
    return step, state, held


def run_case(args) -> dict:
    device = torch.device(args.device)
    cfg = config(args)
    g = torch.Generator().manual_seed(0)
    data = [torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=g) for _ in range(args.steps + 1)]
    base = reset_peak(device)
    step, state, held = step_and_state(cfg, args, device)
    walls, cpus = [], []
    for i, x in enumerate(data):
        x = x.to(device)
        batch = {"tokens": x[:, :-1], "labels": x[:, 1:], "loss_mask": torch.ones_like(x[:, 1:])}
        wall, cpu = time.perf_counter(), time.process_time()
        state, metrics = step(state, batch)
        sync(device)
        if i:  # the first step is a warm-up
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
    trainable = mf.count_params(state.params)
    return {"peak_mib": (peak_bytes(device) - base) / 2**20, "held_mib": held / 2**20, "trainable": trainable,
            "wall_s": sorted(walls)[len(walls) // 2], "cpu_s": sorted(cpus)[len(cpus) // 2], "loss": metrics["loss"]}


def main():
    p = argparse.ArgumentParser()
    for name, default in (("vocab", 32000), ("dim", 768), ("layers", 8), ("heads", 12), ("kv_heads", 4),
                          ("ffn", 2048), ("seq", 512), ("batch", 1), ("steps", 3), ("chunk", 128), ("rank", 16)):
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--targets", nargs="+", default=list(mf.lora.MODELLINK_TARGETS))
    p.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: " + ", ".join(DTYPES))
    p.add_argument("--dtype", choices=sorted(DTYPES), help=argparse.SUPPRESS)
    p.add_argument("--device", default="cpu")
    p.add_argument("--side", choices=["full", "lora"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.side:
        print(json.dumps(run_case(args)))
        return
    cfg = config(args)
    print(f"{mf.count_params(mf.init_params(cfg, device='meta')) / 1e6:.1f}M params (dim {cfg.dim}, {cfg.n_layers} "
          f"layers, vocab {cfg.vocab_size}); batch {args.batch} x {args.seq} on {args.device}; LoRA r={args.rank} "
          f"alpha={2 * args.rank} on {' '.join(args.targets)}")
    shared = [f"--{k}={getattr(args, k)}" for k in ("vocab", "dim", "layers", "heads", "kv_heads", "ffn", "seq",
                                                     "batch", "steps", "chunk", "rank", "device")]
    shared += ["--targets", *args.targets]
    for dtype in args.dtypes.split(","):
        result = {side: run_isolated("benchmarks.bench_lora", ["--side", side, f"--dtype={dtype}", *shared])
                  for side in ("full", "lora")}
        for r in result.values():
            if "error" in r:
                raise SystemExit(f"benchmark failed: {r['error']}")
        for side, r in result.items():
            print(f"{dtype} {side:4}  trainable {r['trainable'] / 1e6:8.2f}M  held between steps {r['held_mib']:8.1f} "
                  f"MiB  peak +{r['peak_mib']:8.1f} MiB  {r['wall_s']:.3f} s/step wall ({r['cpu_s']:.3f} CPU)")
        full, lora = result["full"], result["lora"]
        print(f"{dtype} lora / full: peak memory {lora['peak_mib'] / full['peak_mib']:.2f}x, held "
              f"{lora['held_mib'] / full['held_mib']:.2f}x, step time {lora['wall_s'] / full['wall_s']:.2f}x wall, "
              f"{lora['cpu_s'] / full['cpu_s']:.2f}x CPU")


if __name__ == "__main__":
    main()
