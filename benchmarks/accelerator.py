"""The accelerator run: one command on a GPU machine that prints model FLOPs utilisation of a 7B-shaped train
step, its ratio to transformers on the same device, and 7B-shaped decode against the HBM bandwidth.

    bash benchmarks/accelerator.sh                     # CUDA, a few minutes, its own timeout
    python -m benchmarks.accelerator --tiny            # the same code on a CPU with a tiny shape (a test runs it)

Train: Mistral-7B's layer shape (dim 4096, ffn 14336, 32/8 heads, vocab 32000) with `--layers` layers, bf16
compute over float32 master weights and moments, `--seq` tokens, one sequence per step; ours is
`train.make_train_step` as `experiments.training` builds it (chunked loss, clipping, fused AdamW, donation),
eager and with `compile=True`; theirs `MistralForCausalLM` under bf16 autocast + `torch.optim.AdamW`. MFU =
model FLOPs/s (6 x matmul params + 6 L T H hd per token) over the device's dense bf16 peak (its datasheet
value where the device is listed in `PEAK_BF16`, and the measured matmul peak).

Decode: the same shape with `--decode_layers` layers in bf16, batch 1, greedy, `--new` tokens after a
32-token prompt: eager, `compile_decode=True`, and `compile_decode="reduce-overhead"` (CUDA graphs), against
transformers' `generate`; the fraction of the bandwidth limit is (weight bytes per step / step time) over the
measured read bandwidth (and the datasheet HBM bandwidth). Each measurement that fails prints its error and
the run goes on. The last line is every number as JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
import traceback

import torch

import mistral_fn as mf
from benchmarks import bench_generate, bench_train_step
from benchmarks.common import describe_machine, matmul_peak_flops, read_bandwidth, sync
from mistral_fn.params import tree_bytes

# Dense bf16 tensor-core peak (TFLOP/s) and HBM bandwidth (GB/s) from the vendors' datasheets.
PEAK_BF16 = {"H200": 989.4, "H100 SXM": 989.4, "H100 80GB HBM3": 989.4, "H100 PCIe": 756.0, "H100 NVL": 835.0,
             "A100": 312.0, "L40S": 362.1, "L4": 121.0, "A10G": 70.0, "A10": 125.0}
HBM_GBPS = {"H200": 4800.0, "H100 SXM": 3350.0, "H100 80GB HBM3": 3350.0, "H100 PCIe": 2000.0, "H100 NVL": 3900.0,
            "A100-SXM4-80GB": 2039.0, "A100 80GB PCIe": 1935.0, "A100": 1555.0, "L40S": 864.0, "L4": 300.0,
            "A10G": 600.0, "A10": 600.0}

SEVEN_B = dict(vocab=32000, dim=4096, heads=32, kv_heads=8, ffn=14336)
TINY = dict(vocab=512, dim=64, heads=4, kv_heads=2, ffn=224)


def datasheet(table: dict[str, float], device_name: str) -> float | None:
    """The entry whose key occurs in `device_name` (the longest such key), else None."""
    keys = [k for k in table if k in device_name]
    return table[max(keys, key=len)] if keys else None


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def attempt(results: dict, name: str, fn):
    """`results[name] = fn()`, or the error's last line (the run goes on)."""
    try:
        results[name] = fn()
    except Exception as e:  # noqa: BLE001 - report and continue: one failing path must not hide the others
        results[name] = {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"}
        traceback.print_exc()
    return results[name]


def train_side(make, cfg, args, device, compile_step=False) -> dict:
    """Median seconds per step of one side (`bench_train_step.ours`/`theirs`) and its peak memory."""
    options = argparse.Namespace(dtype=args.dtype, chunk=args.chunk, batch=1, compile=compile_step)
    data = list(bench_train_step.batches(cfg, 1, args.seq, args.steps + 1, device))
    release(device)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    run = make(cfg, options, device)
    seconds = []
    for i, batch in enumerate(data):
        sync(device)
        start = time.perf_counter()
        run(batch)
        sync(device)
        if i:
            seconds.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated(device) - base) / 2**30 if device.type == "cuda" else None
    del run
    release(device)
    return {"seconds": sorted(seconds)[len(seconds) // 2], "peak_gib": peak}


def train(args, shape: dict, device, peaks: dict) -> dict:
    cfg = mf.MistralConfig(vocab_size=shape["vocab"], dim=shape["dim"], n_layers=args.layers, n_heads=shape["heads"],
                           n_kv_heads=shape["kv_heads"], ffn_dim=shape["ffn"], max_seq_len=args.seq)
    fpt = bench_train_step.flops_per_token(cfg, args.seq)
    out = {}
    for name, make, compiled in (("ours", bench_train_step.ours, False), ("ours_compiled", bench_train_step.ours, True),
                                 ("transformers", bench_train_step.theirs, False)):
        result = attempt(out, name, lambda: train_side(make, cfg, args, device, compiled))
        if "error" in result:
            print(f"train {name}: FAILED {result['error']}", flush=True)
            continue
        flops = args.seq / result["seconds"] * fpt
        result["tflops"] = flops / 1e12
        result.update({f"mfu_{k}": flops / v for k, v in peaks.items() if v})
        mfu = ", ".join(f"{result[f'mfu_{k}']:.1%} of the {k} peak" for k, v in peaks.items() if v)
        memory = f", peak memory {result['peak_gib']:.1f} GiB" if result["peak_gib"] is not None else ""
        print(f"train {name}: {args.seq / result['seconds']:,.0f} tokens/s, {result['tflops']:.1f} model TFLOP/s = "
              f"{mfu}{memory}", flush=True)
    if "seconds" in out.get("transformers", {}):
        for name in ("ours", "ours_compiled"):
            if "seconds" in out.get(name, {}):
                out[f"{name}_vs_transformers"] = out["transformers"]["seconds"] / out[name]["seconds"]
                print(f"train {name} / transformers: x{out[f'{name}_vs_transformers']:.2f}", flush=True)
    return out


def random_params(cfg: mf.MistralConfig, device, dtype):
    """N(0, 0.02²) matrices and unit norms made on the device (the seeded host init of a 7B tree is slow)."""
    return mf.params.tree_map(lambda x: (torch.randn(x.shape, device=device, dtype=dtype) * 0.02 if x.dim() > 1
                                         else torch.ones(x.shape, device=device, dtype=dtype)),
                              mf.init_params(cfg, device="meta"))


def decode(args, shape: dict, device, bandwidths: dict) -> dict:
    cfg = mf.MistralConfig(vocab_size=shape["vocab"], dim=shape["dim"], n_layers=args.decode_layers,
                           n_heads=shape["heads"], n_kv_heads=shape["kv_heads"], ffn_dim=shape["ffn"],
                           max_seq_len=32 + args.new, sliding_window=None)
    dtype = bench_train_step.DTYPES[args.dtype]
    params = random_params(cfg, device, dtype)
    weight_bytes = tree_bytes(params) - params["embed"].numel() * params["embed"].element_size()
    prompt = torch.randint(3, cfg.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0)).tolist()
    out = {"weight_gb": weight_bytes / 1e9}
    runs = {"ours": lambda: bench_generate.ours(params, cfg, prompt, args.new, device),
            "ours_compiled": lambda: bench_generate.ours(params, cfg, prompt, args.new, device, compile_decode=True)}
    if device.type == "cuda":
        runs["ours_cuda_graphs"] = lambda: bench_generate.ours(params, cfg, prompt, args.new, device,
                                                               compile_decode="reduce-overhead")
    with torch.inference_mode():
        for name, run in runs.items():
            attempt(out, name, lambda: min(run()[1] for _ in range(3)))
        try:
            from tests.hf_reference import hf_model
            model = hf_model(cfg, params, attn="sdpa").to(device=device, dtype=dtype)
            attempt(out, "transformers", lambda: min(bench_generate.theirs(model, prompt, args.new, device)[1]
                                                     for _ in range(2)))
            del model
        except Exception as e:  # noqa: BLE001
            out["transformers"] = {"error": f"{type(e).__name__}: {e}"}
    for name in (*runs, "transformers"):
        step = out.get(name)
        if not isinstance(step, float):
            print(f"decode {name}: FAILED {step['error']}", flush=True)
            continue
        fractions = ", ".join(f"{weight_bytes / step / bw:.0%} of the {k} bandwidth" for k, bw in bandwidths.items()
                              if bw)
        print(f"decode {name}: {1 / step:,.1f} tokens/s ({step * 1e3:.2f} ms/step): {weight_bytes / step / 1e9:,.0f} "
              f"GB/s of weights = {fractions}", flush=True)
        out[f"{name}_fraction"] = {k: weight_bytes / step / bw for k, bw in bandwidths.items() if bw}
    if isinstance(out.get("transformers"), float):
        for name in runs:
            if isinstance(out.get(name), float):
                print(f"decode {name} / transformers: x{out['transformers'] / out[name]:.2f}", flush=True)
    del params
    release(device)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="a tiny shape (CPU smoke run)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=sorted(bench_train_step.DTYPES), default="bf16")
    p.add_argument("--layers", type=int, default=4, help="train: decoder layers")
    p.add_argument("--seq", type=int, default=4096, help="train: tokens per step")
    p.add_argument("--steps", type=int, default=4, help="train: timed steps per side (after one warm-up)")
    p.add_argument("--chunk", type=int, default=4096, help="train: loss chunk (positions)")
    p.add_argument("--decode_layers", type=int, default=8, help="decode: decoder layers")
    p.add_argument("--new", type=int, default=64, help="decode: new tokens")
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    shape = TINY if args.tiny else SEVEN_B
    if args.tiny:
        args.layers, args.seq, args.steps, args.chunk, args.decode_layers, args.new = 2, 128, 2, 64, 2, 8
    dtype = bench_train_step.DTYPES[args.dtype]
    measured = matmul_peak_flops(device, dtype, n=512 if args.tiny else 8192, repeats=3 if args.tiny else 20)["peak"]
    bandwidth = read_bandwidth(device, nbytes=(64 if args.tiny else 4096) * 2**20)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    peaks = {"datasheet": (datasheet(PEAK_BF16, name) or 0) * 1e12, "measured": measured}
    bandwidths = {"datasheet": (datasheet(HBM_GBPS, name) or 0) * 1e9, "measured": bandwidth}
    print(f"{time.strftime('%Y-%m-%d %H:%M')}: {describe_machine(device)}\nmatmul peak {args.dtype}: measured "
          f"{measured / 1e12:.1f} TFLOP/s, datasheet {peaks['datasheet'] / 1e12 or float('nan'):.1f}; read bandwidth "
          f"measured {bandwidth / 1e9:,.0f} GB/s, datasheet {bandwidths['datasheet'] / 1e9 or float('nan'):,.0f}\n"
          f"shape: dim {shape['dim']}, ffn {shape['ffn']}, heads {shape['heads']}/{shape['kv_heads']}, vocab "
          f"{shape['vocab']}; train {args.layers} layers x {args.seq} tokens, decode {args.decode_layers} layers",
          flush=True)
    results = {"device": describe_machine(device), "date": time.strftime("%Y-%m-%d"),
               "peak_tflops": {k: v / 1e12 for k, v in peaks.items()},
               "bandwidth_gbps": {k: v / 1e9 for k, v in bandwidths.items()}}
    results["train"] = train(args, shape, device, peaks)
    results["decode"] = decode(args, shape, device, bandwidths)
    print(json.dumps(results, default=float), flush=True)


if __name__ == "__main__":
    main()
