"""The Megatron/ModelLink flags that pretrain, generate and evaluate share, read once into frozen dataclasses.

A ModelLink script's argument list runs unchanged (`cli.run` reads `--foo-bar value` as `--foo_bar=value`).
Each flag is one of:
  honoured   it does what Megatron does;
  checked    architecture: it must agree with the loaded checkpoint's config, or it defines the model when
             nothing is loaded (pretrain only); a disagreement is one error naming both values;
  kernel     a fused-kernel or communication choice: the kernels here are picked per device, and
             `kernel_report` says once, in the log, what this run uses for each flag given.
The README's ModelLink section lists every flag of the seed's scripts and what it does here.
"""

from __future__ import annotations

import dataclasses
import datetime

import torch
from absl import flags

from experiments.architecture import Architecture
from experiments.lora_args import DEFAULT_ALPHA, DEFAULT_R, LoraArgs
from mistral_fn.errors import ConfigError

# ---- architecture (checked) --------------------------------------------------------------------------
flags.DEFINE_integer("num_layers", None, "layers (checked against a loaded checkpoint)")
flags.DEFINE_integer("hidden_size", None, "model width (checked)")
flags.DEFINE_integer("ffn_hidden_size", None, "MLP width (checked)")
flags.DEFINE_integer("num_attention_heads", None, "query heads (checked)")
flags.DEFINE_bool("group_query_attention", None, "grouped-query attention: kv heads = --num_query_groups")
flags.DEFINE_integer("num_query_groups", None, "kv heads (checked)")
flags.DEFINE_integer("max_position_embeddings", None, "longest supported sequence (checked)")
flags.DEFINE_float("rotary_base", None, "rope theta (checked; supplies it for ModelLink checkpoints, which store none)")
flags.DEFINE_float("norm_epsilon", None, "RMSNorm epsilon (checked)")
flags.DEFINE_integer("sliding_window", None, "attention window in keys, the query included (0: full causal); "
                     "overrides the checkpoint's, as ModelLink's flash attention does")
flags.DEFINE_integer("make_vocab_size_divisible_by", 1, "vocab padding under TP: a multiple of this x tp (Megatron)")
flags.DEFINE_enum("position_embedding_type", "rope", ["rope"], "Mistral uses rotary embeddings only")
flags.DEFINE_enum("normalization", "RMSNorm", ["RMSNorm"], "Mistral uses RMSNorm only")
flags.DEFINE_bool("use_rotary_position_embeddings", True, "always on (Mistral)")
flags.DEFINE_bool("swiglu", True, "always on (Mistral's MLP)")
flags.DEFINE_bool("untie_embeddings_and_output_weights", True, "always on (Mistral's head is untied)")
flags.DEFINE_bool("disable_bias_linear", True, "always on (Mistral has no biases)")
flags.DEFINE_float("attention_dropout", 0.0, "must be 0 (no dropout here)")
flags.DEFINE_float("hidden_dropout", 0.0, "must be 0 (no dropout here)")

# ---- kernels and communication (reported) --------------------------------------------------------
KERNEL_FLAGS = ("use_flash_attn", "use_fused_rmsnorm", "use_fused_swiglu", "use_fused_rotary_pos_emb", "use_mc2",
                "no_gradient_accumulation_fusion", "no_masked_softmax_fusion", "attention_softmax_in_fp32")
for _name in KERNEL_FLAGS:
    flags.DEFINE_bool(_name, False, "kernel choice; the kernels are picked per device (see the log)")
flags.DEFINE_enum("distributed_backend", None, ["nccl", "hccl", "gloo"],
                  "collective backend; the device's own is used (hccl on NPU, nccl on CUDA, gloo on CPU)")
flags.DEFINE_float("distributed_timeout_minutes", 10, "how long a rendezvous or collective waits for a peer before "
                   "the run stops with an error (Megatron's default: 10)")
flags.DEFINE_integer("pipeline_model_parallel_size", 1, "must be 1 (no pipeline parallelism here)")
flags.DEFINE_integer("tensor_model_parallel_size", None, "TP ranks (pretrain: default 1, dp = WORLD_SIZE / tp; "
                     "generate/evaluate: all WORLD_SIZE processes)")
flags.DEFINE_integer("seq_length", None, "pretrain: tokens per sequence (default 128); generate/evaluate: the "
                     "longest prompt + answer (default: the model's max_position_embeddings)")
flags.DEFINE_integer("micro_batch_size", None, "pretrain: sequences per forward/backward (default 1); "
                     "generate/evaluate: accepted (one conversation / --batch_size prompts per forward)")

# ---- tokenizer, loading, precision (honoured) -------------------------------------------------------
flags.DEFINE_enum("tokenizer_type", None, ["PretrainedFromHF", "Llama2Tokenizer", "SentencePieceTokenizer"],
                  "all read the SentencePiece tokenizer.model (of --tokenizer_name_or_path, or --tokenizer_model)")
flags.DEFINE_string("tokenizer_name_or_path", None, "HF model directory holding tokenizer.model (and config.json)")
flags.DEFINE_string("tokenizer_model", None, "a tokenizer.model file (or a directory holding one)")
flags.DEFINE_bool("tokenizer_not_use_fast", False, "accepted: SentencePiece is the slow tokenizer")
flags.DEFINE_string("load", None, "checkpoint to start from: HF, Megatron (ModelLink) or native")
flags.DEFINE_bool("no_load_optim", False, "with a native --load: fresh optimizer state (Megatron's meaning)")
flags.DEFINE_bool("no_load_rng", False, "with a native --load: fresh data/sampling RNG state (Megatron's meaning)")
flags.DEFINE_bool("bf16", False, "bfloat16 compute")
flags.DEFINE_bool("fp16", False, "float16 compute")
flags.DEFINE_integer("seed", 1234, "random seed")
flags.DEFINE_string("device", None, "cpu, cuda or npu (default: the best available)")

# ---- LoRA (honoured; see experiments.lora_args) -------------------------------------------------------
flags.DEFINE_list("lora_target_modules", [], "LoRA on these modules (ModelLink's query_key_value, dense, "
                  "dense_h_to_4h, dense_4h_to_h or PEFT's q_proj, ..., down_proj); empty: no LoRA")
flags.DEFINE_integer("lora_r", None, f"LoRA rank (default {DEFAULT_R}; inference: checked against --lora_load)")
flags.DEFINE_float("lora_alpha", None, f"LoRA scaling numerator, scale = alpha / r (default {DEFAULT_ALPHA}; "
                   "inference: checked)")
flags.DEFINE_string("lora_load", None, "LoRA adapters: pretrain resumes them (a LoRA run's native checkpoint); "
                    "generate/evaluate merge them (native or a PEFT directory) into the --load model")

F = flags.FLAGS


def lora_args() -> LoraArgs:
    """The `--lora_*` flags, read once."""
    return LoraArgs(tuple(F.lora_target_modules), F.lora_r, F.lora_alpha, F.lora_load)


def architecture() -> Architecture:
    """The architecture flags, after refusing the ones that would ask for another architecture."""
    for name in ("swiglu", "untie_embeddings_and_output_weights", "disable_bias_linear",
                 "use_rotary_position_embeddings"):
        if not F[name].value:
            raise ConfigError(f"--no{name}: Mistral always has {name.replace('_', ' ')}; this project builds no other "
                              "architecture")
    for name in ("attention_dropout", "hidden_dropout"):
        if F[name].value:
            raise ConfigError(f"--{name}={F[name].value}: dropout is not implemented (the seed trains with 0.0)")
    if F.pipeline_model_parallel_size != 1:
        raise ConfigError(f"--pipeline_model_parallel_size={F.pipeline_model_parallel_size}: pipeline parallelism is "
                          "not implemented here; use tensor (and data) parallelism")
    if F.sliding_window is not None and F.sliding_window < 0:
        raise ConfigError(f"--sliding_window={F.sliding_window} must be >= 0 (0: full causal attention)")
    names = [f.name for f in dataclasses.fields(Architecture) if f.name in F]
    return Architecture(**{name: F[name].value for name in names})


def tokenizer_source() -> str | None:
    """The tokenizer to load: `--tokenizer_model`, else `--tokenizer_name_or_path` (a directory), else None."""
    if F.tokenizer_model and F.tokenizer_name_or_path:
        raise ConfigError("pass either --tokenizer_model or --tokenizer_name_or_path, not both")
    return F.tokenizer_model or F.tokenizer_name_or_path


def distributed_timeout() -> datetime.timedelta:
    """`--distributed_timeout_minutes`, checked to be > 0."""
    if not F.distributed_timeout_minutes > 0:
        raise ConfigError(f"--distributed_timeout_minutes={F.distributed_timeout_minutes} must be > 0")
    return datetime.timedelta(minutes=F.distributed_timeout_minutes)


def precision() -> str:
    """"bf16", "fp16" or "fp32" from `--bf16`/`--fp16`."""
    if F.bf16 and F.fp16:
        raise ConfigError("--bf16 and --fp16 are exclusive")
    return "bf16" if F.bf16 else "fp16" if F.fp16 else "fp32"


@dataclasses.dataclass(frozen=True)
class InferenceArgs:
    """What generate and evaluate load: the checkpoint, its tokenizer, dtype, device, TP size, the
    architecture flags to check it against, the LoRA adapters to merge into it and the collectives' timeout."""

    load: str
    tokenizer: str | None
    dtype: torch.dtype | None
    device: str | None
    tensor_model_parallel_size: int | None
    seq_length: int | None
    arch: Architecture
    lora: LoraArgs = LoraArgs()
    timeout: datetime.timedelta | None = None


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def inference_args(dtype_name: str) -> InferenceArgs:
    """The shared inference flags, read once; `dtype_name` is the app's `--dtype` (it wins over --bf16/--fp16)."""
    if not F.load:
        raise ConfigError("--load is required (a checkpoint directory)")
    if dtype_name and dtype_name not in _DTYPES:
        raise ConfigError(f"--dtype={dtype_name!r}: expected one of {', '.join(_DTYPES)}")
    dtype = _DTYPES[dtype_name] if dtype_name else {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision())
    for name in ("tensor_model_parallel_size", "seq_length"):
        if F[name].value is not None and F[name].value < 1:
            raise ConfigError(f"--{name}={F[name].value} must be >= 1")
    lora = lora_args()
    if lora.enabled and not lora.load:
        raise ConfigError("--lora_target_modules without --lora_load: there are no adapters to apply")
    return InferenceArgs(F.load, tokenizer_source(), dtype, F.device, F.tensor_model_parallel_size, F.seq_length,
                         architecture(), lora, distributed_timeout())


_KERNELS = {  # flag -> {device type: what this run uses}
    "use_flash_attn": {"npu": "npu_fusion_attention", "cuda": "SDPA flash / memory-efficient attention",
                       "cpu": "SDPA attention"},
    "use_fused_rmsnorm": {"npu": "npu_rms_norm", "*": "RMSNorm in torch ops"},
    "use_fused_swiglu": {"npu": "npu_swiglu", "*": "SwiGLU in torch ops"},
    "use_fused_rotary_pos_emb": {"npu": "npu_rotary_mul", "*": "rotary embedding in torch ops"},
    "use_mc2": {"*": "no MC2: TP collectives are separate all-reduce / gather calls"},
    "no_gradient_accumulation_fusion": {"*": "gradients accumulate in float32 buffers after each backward"},
    "no_masked_softmax_fusion": {"*": "masking happens inside the attention kernel"},
    "attention_softmax_in_fp32": {"*": "attention softmax accumulates in float32"},
}
_BACKENDS = {"npu": "hccl", "cuda": "nccl", "cpu": "gloo"}


def kernel_report(device_type: str) -> str | None:
    """One log line: for each kernel/communication flag given, what this run on `device_type` uses."""
    parts = []
    for name in KERNEL_FLAGS:
        if F[name].value:
            table = _KERNELS[name]
            parts.append(f"--{name.replace('_', '-')}: {table.get(device_type, table.get('*'))}")
    if F.distributed_backend:
        backend = _BACKENDS.get(device_type, "gloo")
        same = "" if backend == F.distributed_backend else f" (the {device_type} backend; {F.distributed_backend} "\
                                                               "is not available here)"
        parts.append(f"--distributed-backend {F.distributed_backend}: {backend}{same}")
    return f"kernels on {device_type}: " + "; ".join(parts) if parts else None


def report_kernels(mesh) -> None:
    """Print `kernel_report` once, on rank 0 of `mesh`."""
    line = kernel_report(mesh.device_type)
    if line and mesh.rank == 0:
        print(line, flush=True)
