"""Memory benchmark of `experiments.convert_ckpt`: a 7B-shaped random bf16 HF checkpoint to Megatron tp8-pp1
(and, with --back, back to HF), each conversion a child process whose wall time and peak RSS
(`os.wait4` rusage) are printed next to the checkpoint size. Not a test. The parent imports no torch
(a forked child's peak RSS starts at its parent's size), so the input is generated in a child too.

    python -m benchmarks.bench_convert [--layers=32] [--workdir=workdir/bench_convert] [--back]

Needs about 2x the checkpoint size on disk (14.5 GB each at 32 layers); `--layers` scales it down.
The input is written just before the conversion, so it is partly in the page cache when read.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import zlib
from pathlib import Path

from absl import app, flags

_LAYERS = flags.DEFINE_integer("layers", 32, "decoder layers of the 7B-shaped model (32 = the real size)")
_WORKDIR = flags.DEFINE_string("workdir", "workdir/bench_convert", "scratch directory (removed at the end)")
_TP = flags.DEFINE_integer("tp", 8, "target tensor-parallel size")
_BACK = flags.DEFINE_bool("back", False, "also convert the Megatron output back to HF")
_GENERATE = flags.DEFINE_string("generate", None, "internal: write the random HF checkpoint to this directory")


def generate(hf_dir: Path, n_layers: int) -> None:
    """Write a 7B-shaped random bf16 HF checkpoint tensor by tensor (1 GB shards)."""
    import checkpoints
    import mistral_fn as mf

    config = mf.MistralConfig.mistral_7b_instruct_v0_2().replace(n_layers=n_layers)
    checkpoints.save_hf(hf_dir, config, random_lazy_params(config), max_shard_bytes=10**9)
    print(f"model: Mistral-7B shape with {n_layers}/32 layers, "
          f"{mf.count_params(mf.init_params(config, device='meta')):,} params bf16", flush=True)


def random_lazy_params(config, dtype=None):
    """Lazy random leaves (norms ones, matrices N(0, 0.02^2)), each generated when written."""
    import torch

    from checkpoints.lazy import LazyTensor
    from mistral_fn.params import map_with_path, param_shapes

    dtype = dtype or torch.bfloat16

    def leaf(path: str, shape):
        seed = zlib.crc32(path.encode())

        def make():
            if len(shape) == 1:
                return torch.ones(shape, dtype=dtype)
            return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype).mul_(0.02)

        return LazyTensor(tuple(shape), dtype, make)

    return map_with_path(leaf, param_shapes(config), is_leaf=lambda x: isinstance(x, tuple))


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run_child(args: list[str]) -> tuple[float, int]:
    """Run `python <args>`; return (wall seconds, peak RSS bytes) of that child alone."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                       os.environ.get("PYTHONPATH", "")]))
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, *args], env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(args[:2])} failed with status {os.waitstatus_to_exitcode(status)}")
    return wall, usage.ru_maxrss * 1024  # Linux reports KiB


def report(name: str, size: int, wall: float, rss: int) -> None:
    print(f"{name}: checkpoint {size / 1e9:.2f} GB, wall {wall:.1f} s ({size / 1e9 / wall:.2f} GB/s), "
          f"peak RSS {rss / 1e9:.2f} GB = {rss / size:.1%} of the checkpoint", flush=True)


def main(argv):
    del argv
    if _GENERATE.value:
        generate(Path(_GENERATE.value), _LAYERS.value)
        return
    work = Path(_WORKDIR.value)
    shutil.rmtree(work, ignore_errors=True)
    hf_dir, mg_dir = work / "hf", work / f"tp{_TP.value}-pp1"
    convert = ["-m", "experiments.convert_ckpt"]
    try:
        wall, _ = run_child(["-m", "benchmarks.bench_convert", f"--generate={hf_dir}", f"--layers={_LAYERS.value}"])
        size = dir_bytes(hf_dir)
        print(f"HF input: {size / 1e9:.2f} GB written in {wall:.1f} s", flush=True)
        wall, rss = run_child([*convert, "--loader=hf", "--saver=megatron", f"--load_dir={hf_dir}",
                               f"--save_dir={mg_dir}", f"--target_tensor_parallel_size={_TP.value}",
                               "--target_pipeline_parallel_size=1"])
        report(f"HF -> Megatron tp{_TP.value}-pp1", size, wall, rss)
        if _BACK.value:
            shutil.rmtree(hf_dir)
            wall, rss = run_child([*convert, "--loader=megatron", "--saver=hf", f"--load_dir={mg_dir}",
                                   f"--save_dir={work / 'back'}"])
            report(f"Megatron tp{_TP.value}-pp1 -> HF", dir_bytes(mg_dir), wall, rss)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    app.run(main)
