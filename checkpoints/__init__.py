"""Checkpoint formats: HF safetensors, Megatron/ModelLink legacy (TP x PP), native training checkpoints,
and conversion between them."""

from mistral_fn.atomic import atomic_dir, atomic_file
from checkpoints.hf import copy_tokenizer_files, hf_names, lazy_hf, load_hf, save_hf
from checkpoints.lazy import LazyTensor, materialize
from checkpoints.megatron import read_megatron, save_megatron
from checkpoints.native import is_native, latest_step, list_steps, load_native, read_metadata, save_native

__all__ = ["load_hf", "save_hf", "hf_names", "copy_tokenizer_files", "atomic_dir", "atomic_file",
           "LazyTensor", "lazy_hf", "materialize", "read_megatron", "save_megatron",
           "save_native", "load_native", "read_metadata", "latest_step", "list_steps", "is_native"]
