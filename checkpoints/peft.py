"""PEFT LoRA adapter directories for `MistralForCausalLM` to and from `mistral_fn.lora` trees (peft is never
imported):

    <dir>/adapter_config.json        {"peft_type": "LORA", "r": 16, "lora_alpha": 32, "target_modules": [...]}
    <dir>/adapter_model.safetensors  base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight  [r, in]
                                     base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight  [out, r]

`peft.PeftModel.from_pretrained(model, dir)` loads what `save_peft` writes. PEFT adapts transformers'
separate projections, so an adapter on a fused ModelLink target (`query_key_value`, `dense_h_to_4h`) is
written as one module per leaf, each with the shared A and its own B: the same function exactly.
`load_peft` returns PEFT's module names as targets (`q_proj`, ...), one A per module.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from checkpoints.hf import LAYER_NAMES, _write_json
from checkpoints.lazy import write_safetensors
from mistral_fn.atomic import atomic_dir
from mistral_fn.config import MistralConfig
from mistral_fn.errors import CheckpointError
from mistral_fn.lora import PEFT_TARGETS, TARGETS, LoraTree, adapters
from mistral_fn.params import cast, param_shapes

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# our leaf -> PEFT module path inside a layer, e.g. "attn/wq" -> "self_attn.q_proj"
MODULES = {leaf: name.removesuffix(".weight") for leaf, name in LAYER_NAMES.items() if "norm" not in leaf}
_KEY = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.(\w+\.\w+)\.lora_([AB])\.weight")
# adapter_config.json settings that change the math; a file must hold these values (or omit them)
_REQUIRED = {"use_rslora": False, "use_dora": False, "fan_in_fan_out": False, "bias": "none", "lora_bias": False,
             "rank_pattern": {}, "alpha_pattern": {}}


def save_peft(out_dir: str | os.PathLike, config: MistralConfig, lora: LoraTree, *,
              base_model_name_or_path: str | None = None, overwrite: bool = False) -> Path:
    """Write `lora` (the full, unsharded adapters of a model of `config`) as a PEFT adapter directory,
    atomically; tensors keep their dtype. A shape that is not the model's is a `CheckpointError`."""
    rank, tensors = lora.rank, {}
    for i, group, _, adapter in adapters(lora):
        for leaf, b in adapter.items():
            if leaf == "a":
                continue
            prefix = f"base_model.model.model.layers.{i}.{MODULES[f'{group}/{leaf}']}"
            for half, x in (("A", adapter["a"]), ("B", b)):
                name, want = f"{prefix}.lora_{half}.weight", _shape(config, f"{group}/{leaf}", half, rank)
                if tuple(x.shape) != want:
                    raise CheckpointError(f"lora layers/{i}/{group}: {name} would have shape {list(x.shape)}, "
                                          f"expected {list(want)} (a TP shard? save the unsharded adapters)")
                tensors[name] = x.detach().to("cpu").clone(memory_format=torch.contiguous_format)
    modules = sorted({MODULES[f"{group}/{leaf}"].split(".")[1] for _, group, _, adapter in adapters(lora)
                      for leaf in adapter if leaf != "a"})
    settings = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": lora.alpha,
                "target_modules": modules, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
                "use_rslora": False, "use_dora": False, "init_lora_weights": True, "inference_mode": True,
                "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None, "layers_to_transform": None,
                "base_model_name_or_path": base_model_name_or_path}
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        write_safetensors(tensors, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        _write_json(tmp / CONFIG_FILE, settings)
    return out_dir


def load_peft(adapter_dir: str | os.PathLike, config: MistralConfig, dtype: torch.dtype | None = None) -> LoraTree:
    """The lora tree of a PEFT LoRA directory for a Mistral model of `config` (targets: PEFT's module names;
    tensors as stored unless `dtype`). Names, shapes and the settings PEFT would apply differently
    (rslora, DoRA, per-module ranks or alphas, biases) are checked; a mismatch is one `CheckpointError`."""
    adapter_dir = Path(adapter_dir)
    settings = _read_config(adapter_dir / CONFIG_FILE)
    found = _read_tensors(adapter_dir / WEIGHTS_FILE, config, settings["r"])
    layers = []
    for i in range(config.n_layers):
        layer: dict[str, dict] = {}
        for target in PEFT_TARGETS:
            group, (leaf,) = TARGETS[target]
            a, b = found.pop((i, f"{group}/{leaf}", "A"), None), found.pop((i, f"{group}/{leaf}", "B"), None)
            if a is None and b is None:
                continue
            if a is None or b is None:
                module = f"base_model.model.model.layers.{i}.{MODULES[f'{group}/{leaf}']}"
                raise CheckpointError(f"{adapter_dir / WEIGHTS_FILE}: {module}.lora_{'A' if a is None else 'B'}"
                                      ".weight is missing")
            layer.setdefault(group, {})[target] = {"a": a, leaf: b}
        layers.append(layer)
    if not any(layers):
        raise CheckpointError(f"{adapter_dir / WEIGHTS_FILE}: no LoRA tensors")
    tree = LoraTree({"layers": layers}, alpha=settings["lora_alpha"])
    return tree if dtype is None else cast(tree, dtype)


def _read_tensors(path: Path, config: MistralConfig, rank: int) -> dict[tuple[int, str, str], torch.Tensor]:
    """`{(layer, leaf path, "A" | "B"): tensor}` of a PEFT safetensors file, names and shapes checked."""
    leaf_of = {module: leaf for leaf, module in MODULES.items()}
    out = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():
                key = _KEY.fullmatch(name)
                if not key or key[2] not in leaf_of or int(key[1]) >= config.n_layers:
                    raise CheckpointError(f"{path}: tensor {name} is not a LoRA A/B of a layer of this "
                                          f"{config.n_layers}-layer Mistral model")
                leaf = leaf_of[key[2]]
                want = _shape(config, leaf, key[3], rank)
                tensor = f.get_tensor(name)
                if tuple(tensor.shape) != want:
                    raise CheckpointError(f"{path}: tensor {name} has shape {list(tensor.shape)}, expected "
                                          f"{list(want)} (r={rank})")
                out[int(key[1]), leaf, key[3]] = tensor
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: unreadable safetensors file ({e})") from None
    return out


def _shape(config: MistralConfig, leaf: str, half: str, rank: int) -> tuple[int, int]:
    """The shape of lora_A (`half` "A": `[r, in]`) or lora_B ("B": `[out, r]`) of the leaf `attn/wq`, ..."""
    group, name = leaf.split("/")
    rows, fan_in = param_shapes(config)["layers"][0][group][name]
    return (rank, fan_in) if half == "A" else (rows, rank)


def _read_config(path: Path) -> dict:
    """adapter_config.json, checked: a LORA config with a positive int `r`, a positive `lora_alpha`, and the
    `_REQUIRED` settings."""
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; not a PEFT adapter directory") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable adapter config ({e})") from None
    if not isinstance(settings, dict) or settings.get("peft_type") != "LORA":
        got = settings.get("peft_type") if isinstance(settings, dict) else type(settings).__name__
        raise CheckpointError(f"{path}: peft_type is {got!r}, expected 'LORA'")
    r, alpha = settings.get("r"), settings.get("lora_alpha")
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise CheckpointError(f"{path}: r={r!r}, expected a positive integer")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not alpha > 0:
        raise CheckpointError(f"{path}: lora_alpha={alpha!r}, expected a positive number")
    for key, value in _REQUIRED.items():
        if settings.get(key) not in (value, None):
            raise CheckpointError(f"{path}: {key}={settings[key]!r} is not supported (expected {value!r})")
    return settings
