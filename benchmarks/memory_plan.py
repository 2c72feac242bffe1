"""Per-rank memory of one training step (parameters, gradients, optimizer state, activations) for a mesh and
the memory flags, and a check of the prediction against the measured peak of real steps.

    python -m benchmarks.memory_plan --model=mistral-7b --seq_length=32768 --tp=8 --dp=1 --sequence_parallel \\
        --distributed_optimizer --recompute_granularity=full --bf16
    python -m benchmarks.memory_plan --validate      # small configs under torchrun on CPU: predicted vs measured

The model counts what this implementation keeps, not a textbook formula: per decoder layer autograd saves
(per token, e = compute bytes, t = tp, D dim, H/KV heads of hd, F ffn)

    2 RMSNorms   2 (e D + 4)                  input, float32 1/rms (`fused.NormLinear`)   (/t with SP)
    attention    e (2 H + 2 KV) hd / t + 4 H / t   q, k, v, output, logsumexp
    MLP          2 e F / t                    gate, up (`fused.SwiGLULinear`)

where the normalised inputs of the column-parallel matmuls (the whole gathered sequence under SP) are
rebuilt in backward, as Megatron does, rather than stored. With recomputation a layer keeps only its input, and its
activations exist again while its backward runs. The peak is the largest of: forward end, each layer's
backward (saved activations of the layers below, the gradients produced so far, that layer's backward
workspace) and the optimizer update. Parameters, gradient buffers and moments follow `train.make_train_step`
with `donate=True` (float32 master weights, float32 gradient accumulation, AdamW moments, ZeRO-1 blocks).

`--validate` measures on CPU: each case runs two steps in fresh torchrun processes, and a rank's measured
peak is its peak resident set size (`ru_maxrss`) minus its resident size after a warm-up of the same code
on a tiny model (imports, process groups, lazily loaded code); glibc's malloc runs with a fixed mmap
threshold (`MEASURE_ENV`) so that freed tensors leave the resident set. Params are created at their sharded
size, so no full model is ever allocated.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import resource
import subprocess
import sys
import time

import torch

import mistral_fn as mf
import sharding

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Setup:
    config: mf.MistralConfig
    seq_length: int
    micro_batch_size: int = 1
    micro_batches: int = 1  # per dp rank and step (gradient accumulation)
    tp: int = 1
    dp: int = 1
    sequence_parallel: bool = False
    distributed_optimizer: bool = False
    recompute: bool = False
    compute_dtype: torch.dtype = torch.float32
    loss_chunk: int | None = 4096
    make_vocab_size_divisible_by: int = 1


def local_param_counts(s: Setup) -> dict[str, int]:
    """Elements of one rank's params: `layer` (one decoder layer), `embed`, `output`, `norm`, `total`."""
    rules = sharding.mistral_rules(s.config, s.make_vocab_size_divisible_by)
    rows = sharding.layout(mf.init_params(s.config, device="meta"), rules, {"tp": s.tp})
    count = {path: math.prod(row["local_shape"]) for path, row in rows.items()}
    out = {"layer": sum(n for path, n in count.items() if path.startswith("layers/0/")),
           "embed": count["embed"], "output": count["output"], "norm": count["norm"]}
    return {**out, "total": sum(count.values())}


def layer_activations(s: Setup) -> int:
    """Bytes autograd saves for one decoder layer and one micro-batch (see the module docstring)."""
    c, e, t = s.config, s.compute_dtype.itemsize, s.tp
    b, seq = s.micro_batch_size, s.seq_length
    local_seq = seq // t if s.sequence_parallel else seq
    norms = 2 * b * local_seq * (e * c.dim + 4)
    attn = b * seq * (e * (2 * c.n_heads + 2 * c.n_kv_heads) * c.head_dim // t + 4 * c.n_heads // t)
    mlp = b * seq * 2 * e * c.ffn_dim // t
    return norms + attn + mlp


def layer_backward_workspace(s: Setup) -> int:
    """Transient bytes while one layer's backward runs (per token; fitted to `--validate`'s cases):
    `fused.SwiGLULinear`'s recomputed sigmoid, silu and product and the gradients of the product and of up
    (5 `[F]`), the gradients of the layer's input and output (2 `[D]`); under TP `fused.NormLinear`'s
    rebuilt (gathered) input, its gradient before and after the reduction and the norm's float32 copies
    (4 `[D]`); with recomputation the recomputed layer's output and the sub-block outputs its vjp holds (4 `[D]`)."""
    c, e, t = s.config, s.compute_dtype.itemsize, s.tp
    d = 2 + (4 if t > 1 else 0) + (4 if s.recompute else 0)
    return s.micro_batch_size * s.seq_length * e * (5 * c.ffn_dim // t + d * c.dim)


def head_workspace(s: Setup, padded_vocab: int) -> int:
    """Transient bytes of the output head and loss for one chunk of positions. Under TP (each chunk recomputed
    in backward): its float32 logits, shifted logits, exponentials and softmax on this rank's vocab slice, and
    the gradient of the head input. One device (`loss._ChunkedHeadLoss`): the logits of two chunks (the next
    is computed while the last is still referenced), and the head's float32 gradient and the input's
    gradient, formed during the forward."""
    c, e, t, b = s.config, s.compute_dtype.itemsize, s.tp, s.micro_batch_size
    positions = min(s.loss_chunk or s.seq_length, s.seq_length)
    if s.sequence_parallel:
        positions = max(positions // t, 1) * t
    logits = b * positions * (padded_vocab // t)
    cast = logits * e if e != 4 else 0  # the matmul's output before `.float()`
    local_seq = s.seq_length // t if s.sequence_parallel else s.seq_length
    if chunked_head_loss(s):
        return 2 * (4 * logits + cast) + padded_vocab * c.dim * 4 + b * local_seq * c.dim * e
    return 4 * 4 * logits + cast + b * local_seq * c.dim * e


def chunked_head_loss(s: Setup) -> bool:
    """Whether the loss runs `loss._ChunkedHeadLoss` (one device, chunked), which forms the head's gradient
    during the forward."""
    return s.tp == 1 and bool(s.loss_chunk)


def plan(s: Setup) -> dict[str, int]:
    """Bytes per rank at the step's peak: params, gradients, optimizer state, activations; the peak and the
    phase of the step where it occurs."""
    c, e = s.config, s.compute_dtype.itemsize
    mixed = s.compute_dtype != torch.float32
    count = local_param_counts(s)
    n, zero = count["total"], s.distributed_optimizer
    # state: float32 masters (+ the compute copy cast for the step); ZeRO-1: compute params + master blocks
    params = (e * n + (4 * n // s.dp if mixed else 0)) if zero else (4 * n + (e * n if mixed else 0))
    optimizer = 8 * n // (s.dp if zero else 1)
    # float32 gradient accumulation: bucket buffers over dp / ZeRO-1; on one rank, the (cast) first gradients
    buckets = s.dp > 1 or zero
    accumulate = 4 * n if (buckets or mixed or s.micro_batches > 1) else 0

    # one micro-batch's activations and gradients, phase by phase (backward walks the layers from the top)
    full, ws = layer_activations(s), layer_backward_workspace(s)
    local_seq = s.seq_length // s.tp if s.sequence_parallel else s.seq_length
    kept = s.micro_batch_size * local_seq * c.dim * e if s.recompute else full
    final = s.micro_batch_size * local_seq * (2 * e * c.dim + 4)  # final norm and head input
    head = head_workspace(s, sharding.padded_vocab_size(c.vocab_size, s.tp, s.make_vocab_size_divisible_by))
    phases = {"loss": (c.n_layers * kept + final + head, 0 if chunked_head_loss(s) else e * count["output"])}
    for i in reversed(range(c.n_layers)):  # backward of layer i: the layers below keep theirs
        grads = e * (count["output"] + count["norm"] + (c.n_layers - i) * count["layer"])
        phases[f"backward layer {i}"] = (i * kept + full + ws, grads)
    # the optimizer update: the last micro-batch's gradients are gone; ZeRO-1 gathers new full params while
    # the old ones are still referenced
    phases["update"] = (e * n if zero else 0, 0)
    best = max(phases, key=lambda k: sum(phases[k]))
    activations, grads = phases[best]
    out = {"params": params, "gradients": accumulate + grads, "optimizer": optimizer, "activations": activations}
    return {**out, "peak": sum(out.values()), "phase": best}


# ---- the command line --------------------------------------------------------------------------------

def setup_from_args(args) -> Setup:
    cfg = mf.MistralConfig.preset({"mistral-7b": "mistral-7b-instruct-v0.2"}.get(args.model, args.model))
    if args.dim:
        cfg = cfg.replace(vocab_size=args.vocab, dim=args.dim, n_layers=args.layers, n_heads=args.heads,
                          n_kv_heads=args.kv_heads, ffn_dim=args.ffn, head_dim=None)
    cfg = cfg.replace(max_seq_len=max(cfg.max_seq_len, args.seq_length))
    return Setup(cfg, args.seq_length, args.micro_batch_size, args.micro_batches, args.tp, args.dp,
                 args.sequence_parallel, args.distributed_optimizer, args.recompute_granularity == "full",
                 torch.bfloat16 if args.bf16 else torch.float32, args.loss_chunk_size or None)


def print_plan(s: Setup, device_gb: float) -> None:
    p = plan(s)
    c = s.config
    flags = [f for f, on in (("sequence_parallel", s.sequence_parallel), ("distributed_optimizer",
             s.distributed_optimizer), ("recompute full", s.recompute)) if on]
    print(f"{mf.count_params(mf.init_params(c, device='meta')) / 1e9:.2f}B params, {c.n_layers} layers; "
          f"micro-batch {s.micro_batch_size} x {s.seq_length} tokens; tp={s.tp} dp={s.dp}; "
          f"{str(s.compute_dtype).removeprefix('torch.')} compute; {', '.join(flags) or 'no memory flags'}")
    for key in ("params", "gradients", "optimizer", "activations"):
        print(f"  {key:<12} {p[key] / GIB:8.2f} GiB")
    verdict = "fits" if p["peak"] <= device_gb * 1e9 else "does NOT fit"
    print(f"  {'peak':<12} {p['peak'] / GIB:8.2f} GiB per rank (at {p['phase']}): {verdict} a {device_gb:g} GB device")


# ---- measurement (one rank of a torchrun job) --------------------------------------------------------

def _resident() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _two_steps(s: Setup, mesh) -> float:
    """Build this rank's state for `s` (params created at their sharded size), run two steps; the seconds of
    the second one."""
    import functools

    from mistral_fn import optim, train
    rules = sharding.mistral_rules(s.config, s.make_vocab_size_divisible_by)
    specs = sharding.match(mf.init_params(s.config, device="meta"), rules)
    local = sharding.shard(mf.init_params(s.config, device="meta"), specs, mesh.shape, mesh.coords)
    g = torch.Generator().manual_seed(mesh.rank)
    params = mf.params.tree_map(lambda x: torch.randn(x.shape, generator=g) * 0.02 if x.dim() > 1
                                else torch.ones(x.shape), local)
    sharded = {p for p, spec in mf.params.leaves_with_paths(specs, is_leaf=lambda x: isinstance(x, sharding.P))
               if any(a is not None for a in spec.axes)}
    opt = optim.adamw(1e-4, b2=0.95, weight_decay=0.1, mask=optim.decay_mask)
    mixed = s.compute_dtype != torch.float32
    state = train.init_train_state(params, opt, dp=mesh.dp, distributed_optimizer=s.distributed_optimizer,
                                   compute_dtype=s.compute_dtype if s.distributed_optimizer and mixed else None)
    del params, local
    loss = functools.partial(mf.loss_fn, config=s.config, tp=mesh.tp, recompute=s.recompute, chunk_size=s.loss_chunk)
    step = train.make_train_step(loss, opt, micro_batch_size=s.micro_batch_size, dp=mesh.dp, tp=mesh.tp,
                                 sharded_paths=sharded, max_grad_norm=1.0, donate=True,
                                 compute_dtype=s.compute_dtype if mixed else None,
                                 distributed_optimizer=s.distributed_optimizer)
    n = s.micro_batch_size * s.micro_batches
    for k in range(2):
        x = torch.randint(0, s.config.vocab_size, (n, s.seq_length + 1), generator=torch.Generator().manual_seed(k))
        start = time.perf_counter()
        state, _ = step(state, {"tokens": x[:, :-1], "labels": x[:, 1:], "loss_mask": torch.ones_like(x[:, 1:])})
    return time.perf_counter() - start


def measure(s: Setup) -> dict[str, list]:
    """`{"peaks": [bytes per rank], "seconds": [per rank]}`: every rank's peak resident bytes over two real steps,
    over its resident size before building anything, and the time of the second step.

    A warm-up of the same code paths on a tiny model comes first, so that what a process loads once (modules,
    lazily loaded code, kernel caches) is part of the baseline and not of the step."""
    torch.set_num_threads(1)
    mesh = sharding.Mesh({"dp": s.dp, "tp": s.tp}, "cpu", sequence_parallel=s.sequence_parallel)
    tiny = s.config.replace(vocab_size=1000, dim=64, n_layers=1, n_heads=8, n_kv_heads=8, ffn_dim=64 * s.tp,
                            head_dim=None)
    _two_steps(dataclasses.replace(s, config=tiny, seq_length=16 * s.tp, loss_chunk=8), mesh)
    gc.collect()
    base = _resident()
    seconds = _two_steps(s, mesh)
    mine = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base, seconds)
    ranks = [mine]
    if mesh.size > 1:
        ranks = [None] * mesh.size
        torch.distributed.all_gather_object(ranks, mine)
    mesh.close()
    return {"peaks": [peak for peak, _ in ranks], "seconds": [sec for _, sec in ranks]}


# glibc malloc with a fixed mmap threshold: blocks of 64 KiB and more are mapped on allocation and unmapped
# when freed, so the resident size follows the live tensors (with the default, adaptive threshold, freed blocks
# stay in the heap and the resident peak overstates the live peak by up to ~40% here)
MEASURE_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}

# Two small shapes: activations of the decoder layers dominate the first; the output head and loss the second.
LAYER_BOUND = Setup(mf.MistralConfig(vocab_size=4000, dim=256, n_layers=4, n_heads=8, n_kv_heads=4, ffn_dim=768,
                                     max_seq_len=4096), 2048, loss_chunk=256)
HEAD_BOUND = dataclasses.replace(LAYER_BOUND, config=LAYER_BOUND.config.replace(vocab_size=16000), seq_length=1024,
                                 loss_chunk=512)


def validation_cases() -> list[tuple[str, Setup]]:
    cases = []
    for recompute in (False, True):
        r = ", recompute" if recompute else ""
        cases += [
            (f"tp2{r}", dataclasses.replace(LAYER_BOUND, tp=2, recompute=recompute)),
            (f"tp2 SP{r}", dataclasses.replace(LAYER_BOUND, tp=2, sequence_parallel=True, recompute=recompute)),
            (f"dp2{r}", dataclasses.replace(LAYER_BOUND, dp=2, recompute=recompute)),
            (f"dp2 ZeRO-1{r}", dataclasses.replace(LAYER_BOUND, dp=2, distributed_optimizer=True, recompute=recompute)),
        ]
    return cases + [
        ("head-bound tp2 SP", dataclasses.replace(HEAD_BOUND, tp=2, sequence_parallel=True)),
        ("head-bound dp2 ZeRO-1 bf16 2 micro", dataclasses.replace(
            HEAD_BOUND, dp=2, distributed_optimizer=True, compute_dtype=torch.bfloat16, micro_batches=2)),
    ]


def _case_args(s: Setup) -> list[str]:
    c = s.config
    args = [f"--vocab={c.vocab_size}", f"--dim={c.dim}", f"--layers={c.n_layers}", f"--heads={c.n_heads}",
            f"--kv_heads={c.n_kv_heads}", f"--ffn={c.ffn_dim}", f"--seq_length={s.seq_length}",
            f"--micro_batch_size={s.micro_batch_size}", f"--micro_batches={s.micro_batches}", f"--tp={s.tp}",
            f"--dp={s.dp}", f"--loss_chunk_size={s.loss_chunk or 0}",
            f"--recompute_granularity={'full' if s.recompute else 'none'}"]
    return args + [f"--{flag}" for flag, on in (("sequence_parallel", s.sequence_parallel), ("distributed_optimizer",
                   s.distributed_optimizer), ("bf16", s.compute_dtype == torch.bfloat16)) if on]


def run_measure(s: Setup) -> dict[str, list]:
    """`measure(s)` in fresh torchrun processes (one per rank) with `MEASURE_ENV`."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={s.tp * s.dp}",
           "-m", "benchmarks.memory_plan", "--measure", *_case_args(s)]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **MEASURE_ENV})
    if done.returncode:
        raise SystemExit(f"measuring {_case_args(s)} failed: {done.stderr.strip().splitlines()[-1]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def validate() -> list[dict]:
    rows = []
    print(f"{'case':<36} {'predicted':>10} {'measured':>10} {'ratio':>6}  (MiB per rank, peak over ranks)")
    for name, s in validation_cases():
        measured = max(run_measure(s)["peaks"])
        predicted = plan(s)["peak"]
        rows.append({"case": name, "predicted": predicted, "measured": measured})
        print(f"{name:<36} {predicted / 2**20:10.1f} {measured / 2**20:10.1f} {measured / predicted:6.3f}  "
              f"{plan(s)['phase']}", flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="mistral-7b", help="a preset (mistral-7b = mistral-7b-instruct-v0.2)")
    for name in ("vocab", "dim", "layers", "heads", "kv_heads", "ffn"):
        p.add_argument(f"--{name}", type=int, default=None, help="with --dim: a custom shape instead of --model")
    p.add_argument("--seq_length", type=int, default=32768)
    p.add_argument("--micro_batch_size", type=int, default=1)
    p.add_argument("--micro_batches", type=int, default=1, help="micro-batches per dp rank and step")
    p.add_argument("--tp", type=int, default=8)
    p.add_argument("--dp", type=int, default=1)
    p.add_argument("--sequence_parallel", action="store_true")
    p.add_argument("--distributed_optimizer", action="store_true")
    p.add_argument("--recompute_granularity", choices=["full", "none"], default="none")
    p.add_argument("--bf16", action="store_true", help="bf16 compute, float32 master weights")
    p.add_argument("--loss_chunk_size", type=int, default=4096, help="0: the whole sequence at once")
    p.add_argument("--device_gb", type=float, default=64.0)
    p.add_argument("--validate", action="store_true", help="predicted vs measured peak on small CPU configs")
    p.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.validate:
        validate()
    elif args.measure:
        result = measure(setup_from_args(args))
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps(result), flush=True)
    else:
        print_plan(setup_from_args(args), args.device_gb)


if __name__ == "__main__":
    main()
