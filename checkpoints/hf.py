"""HuggingFace Mistral checkpoints (`config.json` + safetensors, single or sharded with an index)
to and from the parameter pytree, by name mapping alone (transformers is never imported).

Loading streams one tensor at a time from `safe_open`; the index may name only files inside the
directory. Saving writes bounded shards, the index, `config.json` and `generation_config.json` into a
temporary directory renamed when complete, plus the companion files of a source directory
(tokenizer files, generation config, chat templates: everything but weights and `config.json`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path, PurePosixPath

import torch

from checkpoints.dtypes import cast_leaf
from checkpoints.lazy import LazyTensor, materialize, open_safetensors, read_tensor, write_safetensors
from mistral_fn.atomic import atomic_dir
from mistral_fn.config import MistralConfig
from mistral_fn.errors import CheckpointError
from mistral_fn.params import leaves_with_paths, map_with_path, param_shapes

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
DEFAULT_SHARD_BYTES = 5 * 10**9  # transformers' "5GB"
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # non-persistent buffers some old exports carry
# Files of an HF directory that hold weights (or their index): never copied as companion files.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".npz", ".index.json")
SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}

# Per-layer leaves in transformers' state_dict order (self_attn, mlp, then the two norms).
LAYER_NAMES = {
    "attn/wq": "self_attn.q_proj.weight",
    "attn/wk": "self_attn.k_proj.weight",
    "attn/wv": "self_attn.v_proj.weight",
    "attn/wo": "self_attn.o_proj.weight",
    "mlp/w_gate": "mlp.gate_proj.weight",
    "mlp/w_up": "mlp.up_proj.weight",
    "mlp/w_down": "mlp.down_proj.weight",
    "attn_norm": "input_layernorm.weight",
    "mlp_norm": "post_attention_layernorm.weight",
}
TOP_NAMES = {"embed": "model.embed_tokens.weight", "norm": "model.norm.weight", "output": "lm_head.weight"}


def hf_names(config: MistralConfig) -> dict[str, str]:
    """`{pytree path: HF tensor name}` for every leaf, in HF module (and shard-filling) order."""
    names = {"embed": TOP_NAMES["embed"]}
    for i in range(config.n_layers):
        names.update({f"layers/{i}/{leaf}": f"model.layers.{i}.{hf}" for leaf, hf in LAYER_NAMES.items()})
    names.update({"norm": TOP_NAMES["norm"], "output": TOP_NAMES["output"]})
    return names


def weight_map(hf_dir: str | os.PathLike) -> dict[str, Path]:
    """`{HF tensor name: safetensors file}` from the index, or every tensor of `model.safetensors`."""
    hf_dir = Path(hf_dir)
    index = hf_dir / INDEX_FILE
    if index.exists():
        try:
            entries = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e!r})") from None
        for name, fname in entries.items():
            if not _is_local(fname):
                raise CheckpointError(f"{index}: {name} points outside the checkpoint directory ({fname!r}); "
                                      "index entries must be file names inside it")
        files = {name: hf_dir / fname for name, fname in entries.items()}
        for f in sorted(set(files.values())):
            if not f.exists():
                raise CheckpointError(f"{f}: shard listed in {INDEX_FILE} is missing")
        return files
    single = hf_dir / SINGLE_FILE
    if single.exists():
        with open_safetensors(single) as f:
            return {name: single for name in f.keys()}
    if not hf_dir.is_dir():
        raise CheckpointError(f"{hf_dir}: no such HF model directory")
    raise CheckpointError(f"{hf_dir}: no {SINGLE_FILE} or {INDEX_FILE} (only safetensors checkpoints are read)")


def _is_local(fname) -> bool:
    """True for a relative path without `..` (symlinked files, as in the hub cache, stay allowed)."""
    if not isinstance(fname, str) or not fname:
        return False
    path = PurePosixPath(fname)
    return not path.is_absolute() and ".." not in path.parts


def lazy_hf(hf_dir: str | os.PathLike) -> tuple[MistralConfig, dict]:
    """`(config, lazy params)` of an HF Mistral directory; each leaf opens its safetensors file when read.

    Names and shapes are checked against `config.json` up front, from the file headers only.
    """
    config = MistralConfig.from_hf(hf_dir)
    files = weight_map(hf_dir)
    names = hf_names(config)
    missing = [name for name in names.values() if name not in files]
    if missing:
        raise CheckpointError(f"{hf_dir}: missing tensor {missing[0]}"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    expected = set(names.values())
    unexpected = [n for n in files if n not in expected and not n.endswith(IGNORED_SUFFIXES)]
    if unexpected:
        raise CheckpointError(f"{hf_dir}: unexpected tensor {unexpected[0]} for a Mistral checkpoint")
    headers = {file: _header(file) for file in sorted({files[name] for name in expected})}

    def leaf(path: str, shape: tuple[int, ...]) -> LazyTensor:
        name, file = names[path], files[names[path]]
        if name not in headers[file]:
            raise CheckpointError(f"{file}: tensor {name} is listed in the index but not in the file")
        stored, dtype = headers[file][name]
        if stored != shape:
            raise CheckpointError(f"{file}: tensor {name} has shape {list(stored)}, expected {list(shape)}")
        if dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{file}: tensor {name} has unsupported dtype {dtype}")
        return LazyTensor(shape, SAFETENSORS_DTYPES[dtype], lambda: read_tensor(file, name))

    return config, map_with_path(leaf, param_shapes(config), is_leaf=lambda x: isinstance(x, tuple))


def _header(file: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """`{name: (shape, safetensors dtype)}` of a file, from its header only."""
    with open_safetensors(file) as f:
        return {name: (tuple(f.get_slice(name).get_shape()), f.get_slice(name).get_dtype()) for name in f.keys()}


def load_hf(hf_dir: str | os.PathLike, dtype: torch.dtype | None = None, device="cpu"):
    """Read an HF Mistral directory into `(config, params)`.

    Names and shapes are checked (by `lazy_hf`) before any tensor is read; tensors are then read,
    converted to `dtype` (default: as stored) and moved to `device` one at a time.
    """
    config, lazy = lazy_hf(hf_dir)
    return config, materialize(lazy, dtype, device)


def save_hf(
    out_dir: str | os.PathLike,
    config: MistralConfig,
    params,
    *,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    tokenizer: str | os.PathLike | None = None,
    companions: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> Path:
    """Write an HF directory loadable by `MistralForCausalLM.from_pretrained`, atomically.

    Shards fill greedily in module order up to `max_shard_bytes`; one shard is `model.safetensors`
    (no index). A float16 `dtype` refuses weights beyond its range. `companions` is an HF directory
    whose `companion_files` are copied (its generation config replaces ours); `tokenizer` is a
    directory whose tokenizer files are copied, or a `tokenizer.model`.
    """
    names = hf_names(config)
    leaves = dict(leaves_with_paths(params))
    if set(leaves) != set(names):
        diff = sorted(set(names) ^ set(leaves))
        raise CheckpointError(f"params do not match the config: leaf {diff[0]} is missing or extra")
    shards: list[list[str]] = [[]]
    size = 0
    for path in names:
        nbytes = leaves[path].numel() * (dtype.itemsize if dtype else leaves[path].element_size())
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(path)
        size += nbytes
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        weight_index, total = {}, 0
        for i, shard in enumerate(shards):
            fname = SINGLE_FILE if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            tensors = {names[p]: cast_leaf(names[p], leaves[p].detach().cpu(), dtype).contiguous() for p in shard}
            write_safetensors(tensors, tmp / fname, metadata={"format": "pt"})
            total += sum(t.numel() * t.element_size() for t in tensors.values())
            weight_index.update({name: fname for name in tensors})
            del tensors
        if len(shards) > 1:
            _write_json(tmp / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_index})
        stored = dtype or leaves["embed"].dtype
        _write_json(tmp / "config.json", config.to_hf(dtype=str(stored).removeprefix("torch.")))
        _write_json(tmp / "generation_config.json", {"bos_token_id": config.bos_id, "eos_token_id": config.eos_id})
        for file in companion_files(companions) if companions is not None else ():
            shutil.copyfile(file, tmp / file.name)
        if tokenizer is not None:
            copy_tokenizer_files(tokenizer, tmp)
    return out_dir


def companion_files(hf_dir: str | os.PathLike) -> list[Path]:
    """The top-level files of an HF directory that travel with its weights: everything except weight
    files, their index, `config.json` (rewritten for the new weights) and hidden files."""
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise CheckpointError(f"{hf_dir}: no such HF model directory")
    return [p for p in sorted(hf_dir.iterdir()) if p.is_file() and p.name != "config.json"
            and not p.name.startswith(".") and not p.name.endswith(WEIGHT_SUFFIXES)]


def copy_tokenizer_files(source: str | os.PathLike, dest: str | os.PathLike) -> list[str]:
    """Copy the tokenizer files found in `source` (a directory, or a `tokenizer.model` file) to `dest`."""
    source, dest = Path(source), Path(dest)
    if source.is_file():
        shutil.copyfile(source, dest / "tokenizer.model")
        return ["tokenizer.model"]
    copied = [name for name in TOKENIZER_FILES if (source / name).is_file()]
    if not copied:
        raise CheckpointError(f"{source}: no tokenizer files ({', '.join(TOKENIZER_FILES)}) to copy")
    for name in copied:
        shutil.copyfile(source / name, dest / name)
    return copied


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")
