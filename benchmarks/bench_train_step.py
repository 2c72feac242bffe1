"""One training step (forward, backward, clipping, AdamW) of ours against transformers' `MistralForCausalLM`
with `torch.optim.AdamW`: same config, same machine, same run.

    python -m benchmarks.bench_train_step                      # 125M Mistral shape, fp32 CPU, 2x512 and 1x2048
    python -m benchmarks.bench_train_step --shapes=2x512 --compile
    python -m benchmarks.bench_train_step --device=cuda --dtype=bf16 --dim=4096 --layers=2 --heads=32 \\
        --kv_heads=8 --ffn=14336 --shapes=1x4096              # 7B-layer shape on a GPU

Ours: what `experiments.training` builds: `train.make_train_step(donate=True)`, `loss_fn(chunk_size=--chunk)`
(float32 logits for `--chunk` positions at a time), clipping at 1.0, `optim.adamw(fused=True)`; `--compile`
compiles the forward and backward (`train.make_train_step(compile=True)`); bf16 keeps float32 master weights
and moments (Megatron's `--bf16`). Theirs: `model(tokens).logits` + `F.cross_entropy`, `clip_grad_norm_`,
`torch.optim.AdamW` (its default implementation); bf16 under autocast over float32 weights.

Speed: per shape, `--rounds` fresh processes hold both sides and alternate their steps, so load from other
work hits both alike; tokens/s from the median step time over all rounds (and from the fastest step).
Memory: each side alone in a fresh process per round (the order alternating), peak RSS (CUDA: peak
allocated) over the process's size before the model exists, the smaller of the rounds. The model FLOPs of
a step are 6 x (params - embedding) + 6 L T (H hd) per token; the fraction of the measured matmul peak is
printed for both sides.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import torch
import torch.nn.functional as F

import mistral_fn as mf
from benchmarks.common import describe_machine, limits_line, matmul_peak_flops, peak_bytes, print_json, reset_peak, \
    resident_bytes, run_isolated, sync
from mistral_fn import optim, train

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SIZES = (("vocab", 32000), ("dim", 768), ("layers", 12), ("heads", 12), ("kv_heads", 4), ("ffn", 2048),
         ("steps", 5), ("chunk", 128), ("rounds", 2))
MEMORY_STEPS = 2  # the peak is reached in the first step after the warm-up (moments exist from the start)


def config(args, seq: int) -> mf.MistralConfig:
    return mf.MistralConfig(vocab_size=args.vocab, dim=args.dim, n_layers=args.layers, n_heads=args.heads,
                            n_kv_heads=args.kv_heads, ffn_dim=args.ffn, max_seq_len=seq)


def batches(cfg, batch: int, seq: int, count: int, device, prompt_fraction: float = 0.0):
    """Random token batches; the first `prompt_fraction` of each sequence carries no loss (instruction data)."""
    g = torch.Generator().manual_seed(0)
    for _ in range(count):
        x = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=g).to(device)
        mask = torch.ones_like(x[:, 1:])
        mask[:, :int(prompt_fraction * seq)] = 0
        yield {"tokens": x[:, :-1], "labels": x[:, 1:], "loss_mask": mask}


def ours(cfg, args, device):
    dtype = DTYPES[args.dtype]
    opt = optim.adamw(1e-4, b2=0.95, weight_decay=0.1, mask=optim.decay_mask, fused=True)
    loss = functools.partial(mf.loss_fn, config=cfg, chunk_size=args.chunk or None)
    step = train.make_train_step(loss, opt, micro_batch_size=args.batch, max_grad_norm=1.0, donate=True,
                                 compute_dtype=None if dtype == torch.float32 else dtype, compile=args.compile)
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
        labels = batch["labels"].masked_fill(batch["loss_mask"] == 0, -100)
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return run


SIDES = {"ours": ours, "theirs": theirs}


def run_case(args) -> dict:
    """`--side both`: both sides resident, one warm-up step each, then `--steps` steps alternating: the
    seconds of each step. `--side ours|theirs`: that side alone for a warm-up and `--steps` steps: the
    growth of the peak memory over the process's size before the model existed."""
    device = torch.device(args.device)
    batch, seq = args.batch, args.seq
    cfg = config(args, seq)
    torch.manual_seed(0)
    steps = args.steps if args.side == "both" else MEMORY_STEPS
    data = list(batches(cfg, batch, seq, steps + 1, device, args.prompt_fraction))
    if args.side == "both":
        runs = {side: make(cfg, args, device) for side, make in SIDES.items()}
        seconds = {side: [] for side in runs}
        seconds["peak_flops"] = matmul_peak_flops(device, DTYPES[args.dtype])["peak"]
        for i, b in enumerate(data):
            for side, run in runs.items():
                start = time.perf_counter()
                run(b)
                sync(device)
                if i:
                    seconds[side].append(time.perf_counter() - start)
        return seconds
    import transformers  # noqa: F401 - imported by both sides before the baseline, so neither counts it
    base = resident_bytes() if device.type == "cpu" else reset_peak(device)
    run = SIDES[args.side](cfg, args, device)
    for b in data:
        run(b)
    sync(device)
    return {"peak_mib": (peak_bytes(device) - base) / 2**20}


def flops_per_token(cfg: mf.MistralConfig, seq: int) -> float:
    """6 x (params - embedding) + causal attention 6 L T (H hd): the usual model FLOPs (no recompute)."""
    n = mf.count_params(mf.init_params(cfg, device="meta")) - cfg.vocab_size * cfg.dim
    return 6.0 * n + 6.0 * cfg.n_layers * seq * cfg.n_heads * cfg.head_dim


def measure_shape(args, batch: int, seq: int, peak: float) -> float:
    """Speed and memory of both sides at one shape, printed; returns the best matmul peak measured so far."""
    passthrough = [f"--{k}={getattr(args, k)}" for k, _ in SIZES] + [
        f"--batch={batch}", f"--seq={seq}", f"--dtype={args.dtype}", f"--device={args.device}",
        f"--prompt_fraction={args.prompt_fraction}"]
    passthrough += ["--compile"] if args.compile else []
    seconds = {"ours": [], "theirs": []}
    peaks = {"ours": [], "theirs": []}
    for r in range(args.rounds):
        speed = run_isolated("benchmarks.bench_train_step", ["--side=both", *passthrough])
        order = ("ours", "theirs") if r % 2 == 0 else ("theirs", "ours")
        memory = {side: run_isolated("benchmarks.bench_train_step", [f"--side={side}", *passthrough]) for side in order}
        for record in (speed, *memory.values()):
            if "error" in record:
                raise SystemExit(f"benchmark failed: {record['error']}")
        for side in seconds:
            seconds[side] += speed[side]
            peaks[side].append(memory[side]["peak_mib"])
        peak = max(peak, speed["peak_flops"])  # load from other work only ever lowers a measurement
    tokens, fpt = batch * seq, flops_per_token(config(args, seq), seq)
    rate = {side: tokens / statistics.median(s) for side, s in seconds.items()}
    fastest = {side: tokens / min(s) for side, s in seconds.items()}
    mem = {side: min(p) for side, p in peaks.items()}
    for side in ("ours", "theirs"):
        print(f"  {batch}x{seq} {side:6} {rate[side]:9.1f} tokens/s (fastest step {fastest[side]:.1f})  "
              f"{rate[side] * fpt / 1e12:.3f} model TFLOP/s = {rate[side] * fpt / peak:.0%} of the matmul peak  "
              f"peak memory +{mem[side]:,.0f} MiB")
    print(f"  {batch}x{seq} ours / transformers: speed {rate['ours'] / rate['theirs']:.2f}x (fastest steps "
          f"{fastest['ours'] / fastest['theirs']:.2f}x), peak memory {mem['ours'] / mem['theirs']:.2f}x; matmul peak "
          f"{peak / 1e9:,.0f} GFLOP/s (the best measured)", flush=True)
    return peak


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in SIZES:
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--shapes", default="2x512,1x2048", help="comma-separated batch x sequence length")
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    p.add_argument("--seq", type=int, help=argparse.SUPPRESS)
    p.add_argument("--compile", action="store_true", help="ours: compiled forward and backward")
    p.add_argument("--prompt_fraction", type=float, default=0.0,
                   help="leading fraction of each sequence without loss (instruction data; theirs: label -100)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--side", choices=["ours", "theirs", "both"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.side:
        print_json(run_case(args))
        return
    device = torch.device(args.device)
    limits, peak, _ = limits_line(device, DTYPES[args.dtype])
    cfg = config(args, max(int(shape.lower().split("x")[1]) for shape in args.shapes.split(",")))
    print(f"{time.strftime('%Y-%m-%d')}: {describe_machine(device)}\n{limits}\n"
          f"{mf.count_params(mf.init_params(cfg, device='meta')) / 1e6:.1f}M params (dim {cfg.dim}, {cfg.n_layers} "
          f"layers, {cfg.n_heads}/{cfg.n_kv_heads} heads, ffn {cfg.ffn_dim}, vocab {cfg.vocab_size}), {args.dtype}; "
          f"ours: loss chunk {args.chunk}, fused AdamW{', compiled' if args.compile else ''}; {args.rounds} rounds of "
          f"{args.steps} steps{f'; no loss on the first {args.prompt_fraction:.0%} of each sequence' if args.prompt_fraction else ''}",
          flush=True)
    for shape in args.shapes.split(","):
        batch, seq = (int(v) for v in shape.lower().split("x"))
        peak = measure_shape(args, batch, seq, peak)


if __name__ == "__main__":
    main()
