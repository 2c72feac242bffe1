"""Checkpoint formats: HF safetensors, Megatron/ModelLink legacy (TP x PP), conversion between them."""

from checkpoints.atomic import atomic_dir, atomic_file
from checkpoints.hf import copy_tokenizer_files, hf_names, load_hf, save_hf
from checkpoints.lazy import LazyTensor, lazy_hf, materialize
from checkpoints.megatron import read_megatron, save_megatron

__all__ = ["load_hf", "save_hf", "hf_names", "copy_tokenizer_files", "atomic_dir", "atomic_file",
           "LazyTensor", "lazy_hf", "materialize", "read_megatron", "save_megatron"]
