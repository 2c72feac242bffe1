"""Checkpoint conversion: a loader gives `(config, lazy params)`, a saver writes them.

Inputs are HF, Megatron (ModelLink legacy, any TP x PP) and native training checkpoints (their model);
outputs are HF and Megatron. Loaders read tensors only when a saver asks (one layer at a time), so
memory stays far below the checkpoint size. An HF output into an existing HF model directory writes
its `mg2hg/` subfolder, as ModelLink's `save_huggingface_llama` does: that directory (the original
model) supplies the config, the dtype and the companion files (tokenizer, generation config, ...).

With LoRA adapters (`lora_dir`, as ModelLink's `--lora-dir`) the output is the merged model, each
adapted weight merged as it is read; the "peft" saver writes the adapters themselves as a PEFT adapter
directory for the input model.

Writes never delete what they read: an output that equals, contains or lies inside an input is
refused, with or without `overwrite`; only `mg2hg/` inside the reference HF directory is allowed,
since only that directory's top-level files are read. `overwrite` replaces an existing checkpoint of
the output's format (or an empty directory), never other files.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Callable

import torch

from checkpoints.auto import detect_format, load_lora, open_checkpoint
from checkpoints.hf import save_hf
from checkpoints.lazy import LazyTensor, tree_stats
from checkpoints.megatron import CONVERTER_ITERATION, check_parallel, save_megatron
from checkpoints.peft import CONFIG_FILE as PEFT_CONFIG, save_peft
from mistral_fn import lora
from mistral_fn.config import MistralConfig
from mistral_fn.errors import CheckpointError, ConfigError
from mistral_fn.params import cast, leaves_with_paths, map_with_path

LOADERS = ("hf", "megatron", "native")
SAVERS = ("hf", "megatron", "peft")
MG2HG = "mg2hg"
# HF output shard size: `save_hf` holds one shard in memory (twice, while safetensors serialises it),
# so 1 GB shards keep HF writing near the one-layer bound (a Mistral-7B layer is 0.44 GB in bf16).
HF_SHARD_BYTES = 10**9
# Architecture fields a reference HF config must share with a native input.
_MODEL_FIELDS = ("n_layers", "dim", "ffn_dim", "n_heads", "n_kv_heads", "head_dim", "vocab_size", "rope_theta")
_HF_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclasses.dataclass(frozen=True)
class Summary:
    out_dir: Path
    tensors: int
    bytes: int
    seconds: float

    def __str__(self) -> str:
        return (f"wrote {self.tensors} tensors, {self.bytes / 1e9:.3f} GB to {self.out_dir} "
                f"in {self.seconds:.1f} s ({self.bytes / 1e9 / max(self.seconds, 1e-9):.2f} GB/s)")


def convert(loader: str | None, saver: str, load_dir, save_dir, *, tp: int = 1, pp: int = 1,
            dtype: torch.dtype | None = None, make_vocab_size_divisible_by: int = 1, hf_config=None,
            rotary_base: float | None = None, tokenizer=None, lora_dir=None, overwrite: bool = False,
            progress: Callable[[int], Callable[[], None]] | None = None) -> Summary:
    """Convert `load_dir` to `save_dir` in format `saver` ("hf", "megatron" or "peft").

    `loader` names the input format ("hf", "megatron", "native"), or None to detect it; "megatron"
    also reads a native training checkpoint (a trained `ckpt/` of this project). `dtype` None keeps
    the stored dtype, except into `mg2hg/`, which takes the reference's `torch_dtype`; float16 output
    refuses weights beyond its range. `hf_config` (an HF `config.json` or model directory) describes a
    Megatron or native input: it is checked against it, supplies the output config and the rope base
    ModelLink does not store (`rotary_base` takes precedence for that). `tokenizer` (a directory or
    `tokenizer.model`) is copied into HF output. Megatron output keeps the input's iteration (1 from
    HF). `progress(total_layers)` returns a callback ticked once per layer written.

    `lora_dir`: LoRA adapters for the input model (a LoRA run's native checkpoint or a PEFT directory,
    `load_lora`): HF and Megatron outputs hold the merged model (`mf.lora.merge`); "peft" (which needs
    them) writes only the adapters, in PEFT's format, naming `load_dir` as their base model.
    """
    if saver not in SAVERS:
        raise ConfigError(f"--saver={saver!r}: expected one of {', '.join(SAVERS)}")
    if loader is not None and loader not in LOADERS:
        raise ConfigError(f"--loader={loader!r}: expected one of {', '.join(LOADERS)}")
    start = time.perf_counter()
    load_dir, out_dir = Path(load_dir), Path(save_dir)
    fmt = detect_format(load_dir)
    if loader not in (None, fmt) and (loader, fmt) != ("megatron", "native"):
        raise CheckpointError(f"{load_dir}: is a {fmt} checkpoint, not {loader} (--loader)")
    if saver == "peft" and lora_dir is None:
        raise ConfigError("--saver=peft writes LoRA adapters: pass them as --lora_dir")
    if hf_config is not None and fmt == "hf":
        raise ConfigError("--hf_config describes a Megatron or native input; an HF input has its own config.json")
    reference = Path(hf_config) if hf_config is not None else None
    if saver == "hf" and fmt != "hf" and (out_dir / "config.json").is_file():
        reference, out_dir = reference or out_dir, out_dir / MG2HG
    reference_dir = None if reference is None else reference if reference.is_dir() else reference.parent
    check_output(out_dir, saver, [load_dir, tokenizer, lora_dir], reference_dir, overwrite)

    source = open_checkpoint(load_dir, fmt, rotary_base=rotary_base, hf_dir=reference)
    config, params = source.config, source.params
    if fmt == "native" and reference is not None:
        config = _agreeing_reference(config, reference, load_dir)
    adapters = load_lora(lora_dir, config) if lora_dir is not None else None
    if saver == "peft":
        adapters = adapters if dtype is None else cast(adapters, dtype)
        save_peft(out_dir, config, adapters, base_model_name_or_path=str(load_dir), overwrite=overwrite)
        modules = [(adapter["a"], b) for *_, adapter in lora.adapters(adapters) for leaf, b in adapter.items()
                   if leaf != "a"]  # PEFT stores an A and a B per module, a shared A once per module
        count, nbytes = tree_stats(modules)
        return Summary(out_dir, count, nbytes, time.perf_counter() - start)
    if adapters is not None:
        params = _merged(params, adapters)
    if saver == "megatron":
        check_parallel(config, tp, pp, make_vocab_size_divisible_by)
        tick = progress(tp * config.n_layers) if progress else None
        count, nbytes = save_megatron(out_dir, config, params, tp=tp, pp=pp, dtype=dtype,
                                      make_vocab_size_divisible_by=make_vocab_size_divisible_by,
                                      iteration=CONVERTER_ITERATION if fmt == "hf" else source.iteration,
                                      overwrite=overwrite, on_layer=tick)
    else:
        dtype = dtype or (_stored_dtype(reference) if reference is not None else None)
        tick = progress(config.n_layers) if progress else None
        save_hf(out_dir, config, _ticking(params, tick) if tick else params, dtype=dtype,
                max_shard_bytes=HF_SHARD_BYTES, tokenizer=tokenizer,
                companions=load_dir if fmt == "hf" else reference_dir, overwrite=overwrite)
        count, nbytes = tree_stats(params, dtype)
    return Summary(out_dir, count, nbytes, time.perf_counter() - start)


def check_output(out_dir: Path, saver: str, inputs, reference_dir: Path | None, overwrite: bool) -> None:
    """Raise unless writing `out_dir` leaves every input intact and replaces nothing but a checkpoint.

    `inputs` (paths, None skipped) are read whole: the output may not equal, contain or lie inside
    one. `reference_dir` is read at its top level only: the output may lie inside it, nothing more.
    """
    out = out_dir.resolve()
    read = [(Path(p), True) for p in inputs if p is not None]
    read += [(reference_dir, False)] if reference_dir is not None else []
    for given, whole in read:
        src = given.resolve()
        relation = ("is" if out == src else "contains" if out in src.parents
                    else "lies inside" if whole and src in out.parents else None)
        if relation:
            raise CheckpointError(f"{out_dir}: the output {relation} the input {given}; writing it would delete "
                                  "what is being read (choose another save directory)")
    if not out_dir.exists():
        return
    if not overwrite:
        raise CheckpointError(f"{out_dir}: already exists; pass --overwrite to replace it")
    if not out_dir.is_dir() or (any(out_dir.iterdir()) and _format_or_none(out_dir) != saver):
        kind = {"hf": "an HF checkpoint", "megatron": "a Megatron checkpoint", "peft": "a PEFT adapter directory"}
        raise CheckpointError(f"{out_dir}: is not {kind[saver]}; --overwrite replaces only a checkpoint of the output "
                              "format")


def _format_or_none(path: Path) -> str | None:
    if (path / PEFT_CONFIG).is_file():
        return "peft"
    try:
        return detect_format(path)
    except CheckpointError:
        return None


def _agreeing_reference(config: MistralConfig, reference: Path, source: Path) -> MistralConfig:
    """The reference HF config, after checking it describes the same model as `config`."""
    ref = MistralConfig.from_hf(reference)
    for field in _MODEL_FIELDS:
        if getattr(ref, field) != getattr(config, field):
            raise CheckpointError(f"{source}: {field}={getattr(config, field)!r} does not match the HF config's "
                                  f"{field}={getattr(ref, field)!r} ({reference})")
    return ref


def _stored_dtype(reference: Path) -> torch.dtype | None:
    """The `torch_dtype` (transformers 5: `dtype`) a reference HF config records, if one we write."""
    file = reference / "config.json" if reference.is_dir() else reference
    hf = json.loads(file.read_text(encoding="utf-8"))  # already parsed by `MistralConfig.from_hf`
    return _HF_DTYPES.get(hf.get("dtype") or hf.get("torch_dtype"))


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


def _merged(params, adapters: lora.LoraTree):
    """`params` (lazy) whose adapted leaves fold in their adapter as they are read (`mf.lora.merge` on a
    one-leaf tree: the leaf's B and its target's A)."""
    owners = {f"layers/{i}/{group}/{leaf}": (group, target, leaf, adapter)
              for i, group, target, adapter in lora.adapters(adapters) for leaf in adapter if leaf != "a"}

    def leaf(path: str, x):
        if path not in owners:
            return x
        group, target, name, adapter = owners.pop(path)
        one = lora.LoraTree({"layers": [{group: {target: {"a": adapter["a"], name: adapter[name]}}}]},
                            alpha=adapters.alpha)
        read = lambda: lora.merge({"layers": [{group: {name: x.load()}}]}, one)["layers"][0][group][name]  # noqa: E731
        return LazyTensor(tuple(x.shape), x.dtype, read)

    merged = map_with_path(leaf, params)
    if owners:
        raise CheckpointError(f"the LoRA adapters adapt {next(iter(owners))}, which the model does not have")
    return merged
