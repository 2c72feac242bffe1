"""Checkpoint formats: HF safetensors, Megatron/ModelLink legacy (TP x PP), native training checkpoints,
one loader for all of them, conversion between them, and the ownership of training save directories."""

from mistral_fn.atomic import atomic_dir, atomic_file
from checkpoints.auto import Checkpoint, detect_format, load, load_lora, open_checkpoint
from checkpoints.hf import companion_files, copy_tokenizer_files, hf_names, lazy_hf, load_hf, save_hf
from checkpoints.lazy import LazyTensor, materialize
from checkpoints.megatron import lazy_megatron, load_megatron, read_megatron, save_megatron
from checkpoints.native import (is_native, latest_step, list_steps, load_native, read_metadata, save_native,
                                verify_ranks)
from checkpoints.native_params import read_native_lora, read_native_params
from checkpoints.owner import SaveClaim, claim_save_dir
from checkpoints.peft import load_peft, save_peft

__all__ = ["load", "open_checkpoint", "detect_format", "Checkpoint",
           "load_hf", "save_hf", "lazy_hf", "hf_names", "copy_tokenizer_files", "companion_files",
           "lazy_megatron", "load_megatron", "read_megatron", "save_megatron",
           "save_native", "load_native", "read_metadata", "latest_step", "list_steps", "is_native", "verify_ranks",
           "read_native_params", "claim_save_dir", "SaveClaim",
           "atomic_dir", "atomic_file", "LazyTensor", "materialize",
           "save_peft", "load_peft", "load_lora", "read_native_lora"]
