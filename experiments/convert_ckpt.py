"""Convert checkpoints between HF safetensors, Megatron/ModelLink legacy (any TP x PP) and this project's
native training checkpoints, streaming one layer at a time. ModelLink's command lines run unchanged:

    # HF -> Megatron tp8-pp1, for training
    python -m experiments.convert_ckpt --model-type GPT --loader llama2_hf --saver megatron \\
        --load-dir ./model_from_hf/Mistral-7B-Instruct-v0.2/ \\
        --save-dir ./model_weights/Mistral-7B-Instruct-v0.2-tp8-pp1/ \\
        --tokenizer-model ./model_from_hf/Mistral-7B-Instruct-v0.2/tokenizer.model \\
        --target-tensor-parallel-size 8 --target-pipeline-parallel-size 1
    # Megatron (or a trained native ckpt/) -> HF, written to <original HF dir>/mg2hg/
    python -m experiments.convert_ckpt --target-tensor-parallel-size 1 --target-pipeline-parallel-size 1 \\
        --model-type GPT --loader megatron --saver megatron --save-model-type save_huggingface_llama \\
        --load-dir ./model_weights/Mistral-7B-Instruct-v0.2-tp8-pp1/ \\
        --save-dir ./model_from_hf/Mistral-7B-Instruct-v0.2/

    # LoRA: the base with the adapters merged (ModelLink's --lora-dir), or the adapters as a PEFT directory
    python -m experiments.convert_ckpt --loader megatron --saver megatron --load-dir ./ckpt/base-tp8-pp1/ \
        --lora-dir ./ckpt/lora/ --save-dir ./ckpt/merged-tp8-pp1/ --target-tensor-parallel-size 8
    python -m experiments.convert_ckpt --saver peft --load-dir ./model_from_hf/Mistral-7B-Instruct-v0.2/ \
        --lora-dir ./ckpt/lora/ --save-dir ./adapters/

Flags keep ModelLink's meaning, with two differences: `--loader` may be left out (the input's format is
detected) and `--loader megatron` also reads a native training checkpoint; without `--params-dtype` the
input's dtype is kept (ModelLink's converter writes fp16, which cannot hold every bf16 weight).
"""

from __future__ import annotations

import sys
from pathlib import Path

from absl import flags
from tqdm import tqdm

from checkpoints.convert import LOADERS, MG2HG, SAVERS, convert
from checkpoints.dtypes import DTYPES
from experiments import cli
from experiments.cli import main_guard
from mistral_fn.errors import ConfigError

# ModelLink's loader names -> ours (None: detect; its "megatron" loader reads native checkpoints too).
LOADER_NAMES = {"llama2_hf": "hf", **{name: name for name in LOADERS}}
SAVE_HF = "save_huggingface_llama"  # ModelLink: --saver megatron --save-model-type save_huggingface_llama

_MODEL_TYPE = flags.DEFINE_string("model_type", "GPT", "ModelLink's --model-type; only GPT (decoder-only) is supported")
_LOADER = flags.DEFINE_string(
    "loader", None, f"format of --load_dir: {', '.join(LOADER_NAMES)}; default: detected. 'megatron' also reads a "
    "native training checkpoint")
_SAVER = flags.DEFINE_string("saver", "megatron", f"format to write: {', '.join(SAVERS)}")
_SAVE_MODEL_TYPE = flags.DEFINE_string(
    "save_model_type", "megatron", f"ModelLink's Megatron saver target: megatron, or {SAVE_HF} (HF output into "
    f"<save_dir>/{MG2HG}/, --save_dir being the original HF model directory)")
_LOAD_DIR = flags.DEFINE_string("load_dir", None, "checkpoint to read: HF model, Megatron or native training directory")
_SAVE_DIR = flags.DEFINE_string(
    "save_dir", None, "where to write; for HF output from Megatron/native input, an existing HF model directory gets "
    f"the output in its {MG2HG}/ subfolder and supplies config.json, dtype and tokenizer files")
_TP = flags.DEFINE_integer("target_tensor_parallel_size", 1, "tensor-parallel size of Megatron output")
_PP = flags.DEFINE_integer("target_pipeline_parallel_size", 1, "pipeline-parallel size of Megatron output")
_TOKENIZER = flags.DEFINE_string(
    "tokenizer_model", None, "tokenizer.model (or a directory with tokenizer files): copied into HF output, "
    "checked to exist for Megatron output")
_DIVISIBLE = flags.DEFINE_integer(
    "make_vocab_size_divisible_by", 1, "Megatron pads the vocab to a multiple of this x tp (ModelLink's converter: 1)")
_DTYPE = flags.DEFINE_string(
    "params_dtype", None, f"dtype of the written tensors ({', '.join(DTYPES)}); default: keep the input's (into "
    f"{MG2HG}/: the original model's). fp16 refuses weights beyond its range")
_HF_CONFIG = flags.DEFINE_string(
    "hf_config", None, "HF config.json or model directory for a Megatron or native input: checked against it, "
    "supplies the output config and the rope base ModelLink does not store")
_LORA_DIR = flags.DEFINE_string(
    "lora_dir", None, "LoRA adapters for --load_dir's model (a LoRA run's native checkpoint or a PEFT directory): "
    "merged into HF/Megatron output; --saver peft writes them alone as a PEFT adapter directory")
_ROTARY_BASE = flags.DEFINE_float("rotary_base", None, "rope base of a Megatron input whose args have none")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "replace an existing output checkpoint")
for _name in ("load_dir", "save_dir"):
    flags.mark_flag_as_required(_name)


def formats() -> tuple[str | None, str]:
    """`(loader, saver)` in `checkpoints.convert`'s names, from ModelLink's flag values (checked)."""
    if _MODEL_TYPE.value != "GPT":
        raise ConfigError(f"--model-type={_MODEL_TYPE.value!r}: only GPT is supported")
    if _LOADER.value is not None and _LOADER.value not in LOADER_NAMES:
        raise ConfigError(f"--loader={_LOADER.value!r}: expected one of {', '.join(LOADER_NAMES)}")
    if _SAVER.value not in SAVERS:
        raise ConfigError(f"--saver={_SAVER.value!r}: expected one of {', '.join(SAVERS)}")
    if _SAVE_MODEL_TYPE.value not in ("megatron", SAVE_HF):
        raise ConfigError(f"--save-model-type={_SAVE_MODEL_TYPE.value!r}: expected megatron or {SAVE_HF}")
    loader = LOADER_NAMES[_LOADER.value] if _LOADER.value else None
    if _SAVE_MODEL_TYPE.value != SAVE_HF:
        return loader, _SAVER.value
    if _SAVER.value != "megatron":
        raise ConfigError(f"--save-model-type={SAVE_HF} belongs to --saver megatron (ModelLink's spelling)")
    if (_TP.value, _PP.value) != (1, 1):
        raise ConfigError(f"--save-model-type={SAVE_HF} writes an HF model: pass --target-tensor-parallel-size 1 "
                          "--target-pipeline-parallel-size 1")
    if not (Path(_SAVE_DIR.value) / "config.json").is_file():
        raise ConfigError(f"--save-dir={_SAVE_DIR.value}: no config.json; with --save-model-type={SAVE_HF} it must be "
                          f"the original HF model directory (the output goes to its {MG2HG}/)")
    return loader, "hf"


@main_guard
def main(argv):
    if len(argv) > 1:
        raise ConfigError(f"unexpected arguments {argv[1:]}; every option is a --flag")
    loader, saver = formats()
    if _DTYPE.value is not None and _DTYPE.value not in DTYPES:
        raise ConfigError(f"--params-dtype={_DTYPE.value!r}: expected one of {', '.join(DTYPES)}")
    if _TOKENIZER.value is not None and not Path(_TOKENIZER.value).exists():
        raise ConfigError(f"--tokenizer-model={_TOKENIZER.value}: no such file or directory")
    bars = []

    def progress(total: int):
        bars.append(tqdm(total=total, unit="layer", file=sys.stderr, desc="converting", dynamic_ncols=True))
        return lambda: bars[-1].update(1)

    try:
        summary = convert(
            loader, saver, _LOAD_DIR.value, _SAVE_DIR.value, tp=_TP.value, pp=_PP.value,
            dtype=DTYPES[_DTYPE.value] if _DTYPE.value else None, make_vocab_size_divisible_by=_DIVISIBLE.value,
            hf_config=_HF_CONFIG.value, rotary_base=_ROTARY_BASE.value,
            tokenizer=_TOKENIZER.value if saver == "hf" else None, lora_dir=_LORA_DIR.value, overwrite=_OVERWRITE.value,
            progress=progress)
    finally:
        for bar in bars:
            bar.close()
    print(summary)


if __name__ == "__main__":
    cli.run(main)
