"""One training step at tp=2 under torchrun, sequence parallelism on vs off: peak memory per rank (measured and
`memory_plan`'s prediction) and seconds per step, over growing sequence lengths.

    python -m benchmarks.bench_sequence_parallel                       # 4K..16K tokens, a 2-layer model, CPU
    python -m benchmarks.bench_sequence_parallel --seq 8192 32768 --layers 4 --recompute

Each case runs in fresh processes (`memory_plan.run_measure`: two steps, the peak resident size over the
resident size after a warm-up, glibc malloc with a fixed mmap threshold); the time is the second step's.
"""

from __future__ import annotations

import argparse

import torch

import mistral_fn as mf
from benchmarks.memory_plan import Setup, plan, run_measure

MIB = 2**20


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq", type=int, nargs="+", default=[4096, 8192, 16384])
    for name, default in (("vocab", 4000), ("dim", 256), ("layers", 2), ("heads", 8), ("kv_heads", 4),
                          ("ffn", 768), ("chunk", 1024)):
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--recompute", action="store_true")
    p.add_argument("--bf16", action="store_true")
    args = p.parse_args(argv)
    cfg = mf.MistralConfig(vocab_size=args.vocab, dim=args.dim, n_layers=args.layers, n_heads=args.heads,
                           n_kv_heads=args.kv_heads, ffn_dim=args.ffn, max_seq_len=max(args.seq))
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    print(f"tp=2 on CPU (gloo, 1 thread per rank); {mf.count_params(mf.init_params(cfg, device='meta')) / 1e6:.1f}M "
          f"params, dim {cfg.dim}, {cfg.n_layers} layers; {str(dtype).removeprefix('torch.')}; loss chunk "
          f"{args.chunk}; recompute {args.recompute}")
    print(f"{'tokens':>7} {'SP':>4} {'measured MiB':>13} {'predicted MiB':>14} {'s/step':>7}   (peak per rank, the "
          "larger rank)")
    for seq in args.seq:
        measured = {}
        for sp in (False, True):
            s = Setup(cfg, seq, tp=2, sequence_parallel=sp, recompute=args.recompute, compute_dtype=dtype,
                      loss_chunk=args.chunk)
            result = run_measure(s)
            measured[sp] = max(result["peaks"])
            print(f"{seq:>7} {'on' if sp else 'off':>4} {measured[sp] / MIB:13.1f} {plan(s)['peak'] / MIB:14.1f} "
                  f"{max(result['seconds']):7.2f}", flush=True)
        print(f"{seq:>7} SP / no SP peak memory: {measured[True] / measured[False]:.2f}")


if __name__ == "__main__":
    main()
