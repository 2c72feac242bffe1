"""Checkpoint formats: HF safetensors (here), Megatron/ModelLink and native training checkpoints."""

from checkpoints.atomic import atomic_dir, atomic_file
from checkpoints.hf import copy_tokenizer_files, hf_names, load_hf, save_hf

__all__ = ["load_hf", "save_hf", "hf_names", "copy_tokenizer_files", "atomic_dir", "atomic_file"]
