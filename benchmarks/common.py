"""Shared benchmark plumbing: the machine and its measured limits, one case per fresh process, peak memory.

Every benchmark states the machine it ran on and measures, in the same run, the two limits its results
are compared with: the peak matmul FLOP/s (the best of torch's default matmul and oneDNN's, which
`mistral_fn.kernels` uses on CPUs) and the read bandwidth (a sum over a buffer far larger than the caches).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time

import torch

from mistral_fn import fused


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_seconds(fn, repeats: int, device: torch.device) -> float:
    """The fastest of `repeats` timed calls of `fn` (after one untimed call): on a shared machine other
    work only ever adds time, so the minimum is the least disturbed measurement."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def describe_machine(device: torch.device) -> str:
    """One line: the processor (or GPU), its cores and relevant ISA flags, and torch's thread count."""
    if device.type == "cuda":
        memory = torch.cuda.get_device_properties(device).total_memory / 2**30
        return f"{torch.cuda.get_device_name(device)} ({memory:.0f} GiB), torch {torch.__version__}"
    name, flags = platform.processor() or "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    name = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{name}, {os.cpu_count()} cores ({', '.join(isa) or 'no AVX2'}), {torch.get_num_threads()} torch " \
           f"threads, torch {torch.__version__}"


def matmul_peak_flops(device: torch.device, dtype: torch.dtype, n: int = 2048, repeats: int = 10) -> dict[str, float]:
    """Measured FLOP/s of an n x n x n matmul: `torch.mm` (MKL's sgemm on CPUs) and, on CPUs, oneDNN's
    (`fused.matmul_t`); `peak` is the larger. On a shared machine this underestimates the hardware."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = {"torch.mm": 2 * n**3 / best_seconds(lambda: a @ b, repeats, device)}
    if device.type == "cpu" and fused.ONEDNN:
        out["oneDNN"] = 2 * n**3 / best_seconds(lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], ""),
                                                repeats, device)
    out["peak"] = max(out.values())
    return out


def read_bandwidth(device: torch.device, nbytes: int = 512 * 2**20, repeats: int = 30) -> float:
    """Bytes per second read by a sum over an `nbytes` float32 buffer (best of `repeats`): the practical
    limit of any kernel that streams its operands from memory once."""
    x = torch.ones(nbytes // 4, device=device)
    return nbytes / best_seconds(lambda: x.sum(), repeats, device)


def limits_line(device: torch.device, dtype: torch.dtype) -> tuple[str, float, float]:
    """`(text, peak FLOP/s, read bytes/s)` measured now."""
    peaks, bandwidth = matmul_peak_flops(device, dtype), read_bandwidth(device)
    detail = ", ".join(f"{k} {v / 1e9:,.0f}" for k, v in peaks.items() if k != "peak")
    text = f"measured: matmul peak {peaks['peak'] / 1e9:,.0f} GFLOP/s {str(dtype).removeprefix('torch.')} " \
           f"({detail}); read bandwidth {bandwidth / 1e9:.1f} GB/s"
    return text, peaks["peak"], bandwidth


def resident_bytes() -> int:
    """The process's current resident set size (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_bytes(device: torch.device) -> int:
    """CUDA: peak allocated; CPU: the process's peak RSS (compare growth within one fresh process)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak(device: torch.device) -> int:
    """The baseline for `peak_bytes`: CUDA resets its peak counter; CPU returns the peak RSS so far (it cannot
    be reset: measure growth in a fresh process)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    return peak_bytes(device)


def run_isolated(module: str, args: list[str], timeout: float | None = None) -> dict:
    """Run `python -m module args...` and parse the JSON object on its last stdout line."""
    try:
        done = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if done.returncode:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def print_json(record: dict) -> None:
    print(json.dumps(record), flush=True)
