"""HF ⇄ Megatron conversion: a loader gives `(config, lazy params)`, a saver writes them.

Loaders read tensors only when a saver asks (one layer at a time), so memory stays far below the
checkpoint size. Megatron → HF into an existing HF model directory writes its `mg2hg/` subfolder,
taking the config (and tokenizer files) from that directory, as ModelLink's `save_huggingface_llama` does.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable

import torch

from checkpoints.hf import TOKENIZER_FILES, lazy_hf, save_hf
from checkpoints.lazy import LazyTensor, tree_stats
from checkpoints.megatron import CONVERTER_ITERATION, check_parallel, read_megatron, save_megatron
from mistral_fn.config import MistralConfig
from mistral_fn.errors import CheckpointError, ConfigError
from mistral_fn.params import leaves_with_paths, map_with_path

FORMATS = ("hf", "megatron")
MG2HG = "mg2hg"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# HF output shard size: `save_hf` holds one shard in memory (twice, while safetensors serialises it),
# so 1 GB shards keep HF writing near the one-layer bound (a Mistral-7B layer is 0.44 GB in bf16).
HF_SHARD_BYTES = 10**9


@dataclasses.dataclass(frozen=True)
class Summary:
    out_dir: Path
    tensors: int
    bytes: int
    seconds: float

    def __str__(self) -> str:
        return (f"wrote {self.tensors} tensors, {self.bytes / 1e9:.3f} GB to {self.out_dir} "
                f"in {self.seconds:.1f} s ({self.bytes / 1e9 / max(self.seconds, 1e-9):.2f} GB/s)")


def convert(loader: str, saver: str, load_dir, save_dir, *, tp: int = 1, pp: int = 1,
            dtype: torch.dtype | None = None, make_vocab_size_divisible_by: int = 1, hf_config=None,
            tokenizer=None, overwrite: bool = False,
            progress: Callable[[int], Callable[[], None]] | None = None) -> Summary:
    """Convert `load_dir` (format `loader`) to `save_dir` (format `saver`); `dtype` None keeps the stored dtype.

    `hf_config` is an HF `config.json` or model directory: it supplies what Megatron args lack
    (`rotary_base`) and is checked against them. `tokenizer` (a directory or `tokenizer.model`) is
    copied into HF output. `progress(total_layers)` returns a callback ticked once per layer written.
    """
    for name, fmt in (("loader", loader), ("saver", saver)):
        if fmt not in FORMATS:
            raise ConfigError(f"--{name}={fmt!r}: expected one of {', '.join(FORMATS)}")
    if hf_config is not None and loader != "megatron":
        raise ConfigError("--hf_config describes a Megatron input; an HF input has its own config.json")
    start = time.perf_counter()
    out_dir = Path(save_dir)
    reference = Path(hf_config) if hf_config is not None else None
    if loader == "megatron" and saver == "hf" and (out_dir / "config.json").is_file():
        reference, out_dir = reference or out_dir, out_dir / MG2HG
    if out_dir.exists() and not overwrite:
        raise CheckpointError(f"{out_dir}: already exists; pass --overwrite to replace it")
    hf = MistralConfig.from_hf(reference) if reference is not None else None
    if loader == "hf":
        (config, params), iteration = lazy_hf(load_dir), CONVERTER_ITERATION
    else:
        config, source, params = read_megatron(load_dir, hf)
        iteration = source.iteration
    if saver == "megatron":
        check_parallel(config, tp, pp, make_vocab_size_divisible_by)
        tick = progress(tp * config.n_layers) if progress else None
        count, nbytes = save_megatron(out_dir, config, params, tp=tp, pp=pp, dtype=dtype,
                                      make_vocab_size_divisible_by=make_vocab_size_divisible_by,
                                      iteration=iteration, overwrite=overwrite, on_layer=tick)
    else:
        tick = progress(config.n_layers) if progress else None
        save_hf(out_dir, config, _ticking(params, tick) if tick else params, dtype=dtype,
                max_shard_bytes=HF_SHARD_BYTES, tokenizer=tokenizer or _tokenizer_source(reference),
                overwrite=overwrite)
        count, nbytes = tree_stats(params, dtype)
    return Summary(out_dir, count, nbytes, time.perf_counter() - start)


def _tokenizer_source(reference: Path | None) -> Path | None:
    """The reference HF directory when it holds tokenizer files (ModelLink's mg2hg copies none)."""
    if reference is None:
        return None
    folder = reference if reference.is_dir() else reference.parent
    return folder if any((folder / name).is_file() for name in TOKENIZER_FILES) else None


def _ticking(params, tick: Callable[[], None]):
    """`params` whose lazy leaves call `tick()` when the last leaf of a layer has been read."""
    left: dict[str, int] = {}
    for path, _ in leaves_with_paths(params):
        if path.startswith("layers/"):
            layer = path.split("/", 2)[1]
            left[layer] = left.get(layer, 0) + 1

    def wrap(path: str, x: LazyTensor) -> LazyTensor:
        if not path.startswith("layers/"):
            return x
        layer = path.split("/", 2)[1]

        def read():
            tensor = x.load()
            left[layer] -= 1
            if not left[layer]:
                tick()
            return tensor

        return LazyTensor(x.shape, x.dtype, read)

    return map_with_path(wrap, params)
