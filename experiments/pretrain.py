"""Pretraining and instruction fine-tuning (ModelLink's `pretrain_gpt.py` for Mistral): the flags, read once
into a `TrainConfig`, then `experiments.training.train`.

    python -m experiments.pretrain --model=tiny --train_iters=20 --save=workdir/tiny        # synthetic data
    torchrun --nproc_per_node=8 -m experiments.pretrain --flagfile=experiments/recipes/pretrain_tp8.flags
    ... --load=<ckpt> --finetune --is_instruction_dataset --data_path=<prefix>               # fine-tuning
    ... --lora-target-modules query_key_value dense dense_h_to_4h dense_4h_to_h --lora-r 16 --lora-alpha 32  # LoRA

The seed's `pretrain_mistral_7b_ptd.sh` argument list runs unchanged (ModelLink spellings, Megatron meanings;
the architecture, kernel and tokenizer flags are shared with generate/evaluate in `experiments.megatron_flags`).
"""

from __future__ import annotations

import os

from absl import flags

import mistral_fn as mf
import sharding
from experiments import cli, megatron_flags
from experiments.cli import main_guard
from experiments.training import TrainConfig, train
from mistral_fn.errors import ConfigError

# ---- flags: Megatron's names (ModelLink spellings work too: see experiments.cli) ------------------------
F = flags.FLAGS
flags.DEFINE_string("model", "tiny", "preset of a new model: " + ", ".join(sorted(mf.PRESETS)) +
                    " (any spelling); with --load the checkpoint defines the model")
flags.DEFINE_integer("vocab_size", None, "vocabulary of a new model (synthetic data)")
flags.DEFINE_float("init_method_std", 0.02, "std of the random init of matrices")
flags.DEFINE_bool("sequence_parallel", False, "Megatron sequence parallelism on the tp axis")
flags.DEFINE_bool("use_distributed_optimizer", False, "ZeRO-1: optimizer state and master weights split over dp")
flags.DEFINE_bool("overlap_grad_reduce", False, "overlap the dp gradient reduction with backward")
flags.DEFINE_integer("global_batch_size", 8, "sequences per optimizer step over all dp ranks")
flags.DEFINE_integer("train_iters", 20, "optimizer steps of the whole run")
flags.DEFINE_float("lr", 1e-3, "peak learning rate")
flags.DEFINE_float("min_lr", 0.0, "learning rate at the end of the decay")
flags.DEFINE_enum("lr_decay_style", "cosine", ["cosine", "linear", "constant"], "decay after warmup")
flags.DEFINE_float("lr_warmup_fraction", 0.0, "warmup steps as a fraction of --lr_decay_iters")
flags.DEFINE_integer("lr_decay_iters", None, "decay length (default --train_iters)")
flags.DEFINE_float("weight_decay", 0.01, "AdamW decoupled weight decay (norms are exempt)")
flags.DEFINE_float("adam_beta1", 0.9, "AdamW beta1")
flags.DEFINE_float("adam_beta2", 0.999, "AdamW beta2")
flags.DEFINE_float("adam_eps", 1e-8, "AdamW epsilon")
flags.DEFINE_float("clip_grad", 1.0, "max global gradient norm (0: no clipping)")
flags.DEFINE_enum("recompute_granularity", None, ["full"], "recompute every layer in backward")
flags.DEFINE_integer("loss_chunk_size", 4096, "positions per chunk of the head + loss (0: all at once)")
flags.DEFINE_bool("compile", False, "torch.compile forward and backward (compiles on the first step)")
flags.DEFINE_float("initial_loss_scale", 2.0**16, "fp16 initial loss scale")
flags.DEFINE_integer("max_skipped_steps", 10, "stop after this many non-finite steps in a row")
flags.DEFINE_string("data_path", None, "indexed dataset prefix (default: synthetic data)")
flags.DEFINE_string("split", "969,30,1", "train,valid,test document weights")
flags.DEFINE_bool("is_instruction_dataset", False, "data_path is a ModelLink instruction (packed) dataset")
flags.DEFINE_string("save", None, "checkpoint directory")
flags.DEFINE_integer("save_interval", None, "checkpoint every N steps (and always at the end)")
flags.DEFINE_enum("save_format", "native", ["native", "megatron"], "megatron: also a ModelLink model checkpoint")
flags.DEFINE_integer("keep_last", None, "keep only the newest N native checkpoints")
flags.DEFINE_bool("finetune", False, "with --load: parameters only, step 0, fresh optimizer")
flags.DEFINE_integer("exit_interval", None, "stop cleanly (with a checkpoint) after a step divisible by N")
flags.DEFINE_integer("eval_interval", None, "validation loss every N steps")
flags.DEFINE_integer("eval_iters", 2, "validation global batches (0: no validation)")
flags.DEFINE_integer("log_interval", 1, "metrics every N steps")
flags.DEFINE_string("metrics_file", None, "JSON lines (default <save>/metrics.jsonl)")
flags.DEFINE_float("peak_tflops", None, "per-device peak TFLOP/s, for MFU")


def config_from_flags() -> TrainConfig:
    """The run's `TrainConfig`, read from the flags once."""
    return TrainConfig(
        model=F.model, arch=megatron_flags.architecture(), make_vocab_size_divisible_by=F.make_vocab_size_divisible_by,
        init_method_std=F.init_method_std, sequence_parallel=F.sequence_parallel,
        distributed_optimizer=F.use_distributed_optimizer, overlap_grad_reduce=F.overlap_grad_reduce, tensor_model_parallel_size=_given(F.tensor_model_parallel_size, 1),
        micro_batch_size=_given(F.micro_batch_size, 1), global_batch_size=F.global_batch_size, seq_length=_given(F.seq_length, 128),
        train_iters=F.train_iters, lr=F.lr, min_lr=F.min_lr, lr_decay_style=F.lr_decay_style,
        lr_warmup_fraction=F.lr_warmup_fraction, lr_decay_iters=F.lr_decay_iters, weight_decay=F.weight_decay,
        adam_beta1=F.adam_beta1, adam_beta2=F.adam_beta2, adam_eps=F.adam_eps, clip_grad=F.clip_grad,
        precision=megatron_flags.precision(), initial_loss_scale=F.initial_loss_scale,
        recompute=F.recompute_granularity == "full", loss_chunk_size=F.loss_chunk_size or None, compile=F.compile,
        max_skipped_steps=F.max_skipped_steps, data_path=F.data_path, split=F.split,
        is_instruction_dataset=F.is_instruction_dataset, tokenizer=megatron_flags.tokenizer_source(), load=F.load,
        finetune=F.finetune, no_load_optim=F.no_load_optim, no_load_rng=F.no_load_rng, save=F.save,
        save_interval=F.save_interval, save_format=F.save_format, keep_last=F.keep_last,
        exit_interval=F.exit_interval, eval_interval=F.eval_interval, eval_iters=F.eval_iters, seed=F.seed,
        log_interval=F.log_interval, metrics_file=F.metrics_file, peak_tflops=F.peak_tflops,
        lora=megatron_flags.lora_args())


def _given(value, default):
    return default if value is None else value


@main_guard
def main(argv):
    if len(argv) > 1:
        raise ConfigError(f"unexpected arguments {argv[1:]}; every option is a --flag")
    config = config_from_flags()
    mesh = sharding.Mesh(config.mesh_shape(int(os.environ.get("WORLD_SIZE", "1"))), F.device,
                         sequence_parallel=config.sequence_parallel, timeout=megatron_flags.distributed_timeout())
    with mesh:
        megatron_flags.report_kernels(mesh)
        train(config, mesh)


if __name__ == "__main__":
    cli.run(main)
