"""Gradient reduction over dp=2 under torchrun: seconds per training step of the plain data-parallel step and
of ZeRO-1, each with its bucket collectives started after backward or overlapped with it
(`overlap_grad_reduce`).

    python -m benchmarks.bench_grad_reduce                 # CPU, gloo, 1 compute thread per rank
    python -m benchmarks.bench_grad_reduce --device=cuda   # nccl

All four variants run in the same processes on the same batches, steps alternating (so machine load hits them
alike); each reports the median of `--steps` steps after one warm-up step.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time

import torch

import mistral_fn as mf
import sharding
from benchmarks.common import sync
from mistral_fn import optim, train

VARIANTS = {"all-reduce": {}, "all-reduce, overlapped": {"overlap_grad_reduce": True},
            "ZeRO-1": {"distributed_optimizer": True},
            "ZeRO-1, overlapped": {"distributed_optimizer": True, "overlap_grad_reduce": True}}


def worker(args) -> dict:
    torch.set_num_threads(1)
    mesh = sharding.Mesh({"dp": 2}, args.device)
    cfg = mf.MistralConfig(vocab_size=args.vocab, dim=args.dim, n_layers=args.layers, n_heads=8, n_kv_heads=4,
                           ffn_dim=args.dim * 3, max_seq_len=args.seq)
    params = mf.params.tree_map(lambda x: x.to(mesh.device), mf.init_params(cfg, seed=0))
    n = mf.count_params(params)
    opt = optim.adamw(1e-4, b2=0.95, weight_decay=0.1, mask=optim.decay_mask)
    loss = functools.partial(mf.loss_fn, config=cfg, chunk_size=args.seq)
    states, steps = {}, {}
    for name, kw in VARIANTS.items():
        states[name] = train.init_train_state(mf.params.tree_map(torch.clone, params), opt, dp=mesh.dp,
                                              distributed_optimizer=kw.get("distributed_optimizer", False))
        steps[name] = train.make_train_step(loss, opt, micro_batch_size=1, dp=mesh.dp, max_grad_norm=1.0,
                                            donate=True, bucket_size=n // args.buckets, **kw)
    times = {name: [] for name in VARIANTS}
    g = torch.Generator().manual_seed(mesh.rank)
    for k in range(args.steps + 1):
        x = torch.randint(0, cfg.vocab_size, (args.micro_batches, args.seq + 1), generator=g).to(mesh.device)
        batch = {"tokens": x[:, :-1], "labels": x[:, 1:], "loss_mask": torch.ones_like(x[:, 1:])}
        for name in VARIANTS:
            sync(mesh.device)
            start = time.perf_counter()
            states[name], _ = steps[name](states[name], batch)
            sync(mesh.device)
            if k:
                times[name].append(time.perf_counter() - start)
    mesh.close()
    return {"params": n, **{name: sorted(t)[len(t) // 2] for name, t in times.items()}}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, default in (("vocab", 8000), ("dim", 512), ("layers", 6), ("seq", 256), ("micro_batches", 2),
                          ("buckets", 8), ("steps", 10)):
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--device", default="cpu")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        result = worker(args)
        if int(os.environ["RANK"]) == 0:
            print(json.dumps(result), flush=True)
        return
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "benchmarks.bench_grad_reduce", "--worker", *(argv if argv is not None else sys.argv[1:])]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode:
        raise SystemExit(done.stderr.strip().splitlines()[-1])
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"dp=2 on {args.device}; {result['params'] / 1e6:.1f}M params in {args.buckets} buckets; "
          f"{args.micro_batches} micro-batches of {args.seq} tokens per rank and step; median of {args.steps} steps")
    for name in VARIANTS:
        print(f"  {name:<24} {result[name]:.3f} s/step  ({result[name] / result['all-reduce']:.2f}x all-reduce)")


if __name__ == "__main__":
    main()
