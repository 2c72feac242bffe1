"""Convert checkpoints between HF safetensors and Megatron/ModelLink legacy (any TP x PP), streaming.

The seed recipe's commands in absl spelling:

    # HF -> Megatron tp8-pp1, for training
    python -m experiments.convert_ckpt --loader=hf --saver=megatron \\
        --load_dir=model_from_hf/Mistral-7B-Instruct-v0.2 --save_dir=model_weights/Mistral-7B-Instruct-v0.2-tp8-pp1 \\
        --tokenizer_model=model_from_hf/Mistral-7B-Instruct-v0.2/tokenizer.model \\
        --target_tensor_parallel_size=8 --target_pipeline_parallel_size=1
    # Megatron -> HF, written to <original HF dir>/mg2hg/
    python -m experiments.convert_ckpt --loader=megatron --saver=hf \\
        --load_dir=model_weights/Mistral-7B-Instruct-v0.2-tp8-pp1 --save_dir=model_from_hf/Mistral-7B-Instruct-v0.2
"""

from __future__ import annotations

import sys
from pathlib import Path

from absl import flags
from tqdm import tqdm

from checkpoints.convert import DTYPES, FORMATS, convert
from experiments import cli
from experiments.cli import main_guard
from mistral_fn.errors import ConfigError

_LOADER = flags.DEFINE_enum("loader", None, FORMATS, "format of --load_dir")
_SAVER = flags.DEFINE_enum("saver", None, FORMATS, "format to write to --save_dir")
_LOAD_DIR = flags.DEFINE_string("load_dir", None, "checkpoint to read: an HF model directory or a Megatron save dir")
_SAVE_DIR = flags.DEFINE_string(
    "save_dir", None, "where to write; for --loader=megatron --saver=hf, an existing HF model directory gets the "
    "output in its mg2hg/ subfolder and supplies config.json and tokenizer files")
_TP = flags.DEFINE_integer("target_tensor_parallel_size", 1, "tensor-parallel size of Megatron output")
_PP = flags.DEFINE_integer("target_pipeline_parallel_size", 1, "pipeline-parallel size of Megatron output")
_TOKENIZER = flags.DEFINE_string(
    "tokenizer_model", None, "tokenizer.model (or a directory with tokenizer files): copied into HF output, "
    "checked to exist for Megatron output")
_DIVISIBLE = flags.DEFINE_integer(
    "make_vocab_size_divisible_by", 1, "Megatron pads the vocab to a multiple of this x tp (ModelLink's converter: 1)")
_DTYPE = flags.DEFINE_enum(
    "params_dtype", None, list(DTYPES), "dtype of the written tensors; default: keep the input's dtype. ModelLink's "
    "converter defaults to fp16; bf16 keeps Mistral's own dtype")
_HF_CONFIG = flags.DEFINE_string(
    "hf_config", None, "HF config.json or model directory for a Megatron input: supplies rope_theta (ModelLink stores "
    "no rotary_base) and is checked against the checkpoint's args")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "replace an existing output directory")
for _name in ("loader", "saver", "load_dir", "save_dir"):
    flags.mark_flag_as_required(_name)


@main_guard
def main(argv):
    if len(argv) > 1:
        raise ConfigError(f"unexpected arguments {argv[1:]}; every option is a --flag")
    if _TOKENIZER.value is not None and not Path(_TOKENIZER.value).exists():
        raise ConfigError(f"--tokenizer_model={_TOKENIZER.value}: no such file or directory")
    bars = []

    def progress(total: int):
        bars.append(tqdm(total=total, unit="layer", file=sys.stderr, desc="converting", dynamic_ncols=True))
        return lambda: bars[-1].update(1)

    try:
        summary = convert(
        _LOADER.value, _SAVER.value, _LOAD_DIR.value, _SAVE_DIR.value,
            tp=_TP.value, pp=_PP.value, dtype=DTYPES[_DTYPE.value] if _DTYPE.value else None,
            make_vocab_size_divisible_by=_DIVISIBLE.value, hf_config=_HF_CONFIG.value,
            tokenizer=_TOKENIZER.value if _SAVER.value == "hf" else None, overwrite=_OVERWRITE.value,
            progress=progress)
    finally:
        for bar in bars:
            bar.close()
    print(summary)


if __name__ == "__main__":
    cli.run(main)
