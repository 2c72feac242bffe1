"""Pretraining and instruction fine-tuning (ModelLink's `pretrain_gpt.py` for Mistral), one pure step at a time.

    python -m experiments.pretrain --model=tiny --train_iters=20 --save=workdir/tiny        # synthetic data
    torchrun --nproc_per_node=8 -m experiments.pretrain --flagfile=experiments/recipes/pretrain_tp8.flags
    ... --load=<ckpt> --finetune --is_instruction_dataset --data_path=<prefix>               # fine-tuning

Processes form a mesh `{dp: world / tp, tp: --tensor_model_parallel_size}`. Without `--data_path` the
data is synthetic (uniform random tokens from a seeded generator, saved in checkpoints). `--load` takes
our native checkpoints (resumes everything unless `--finetune`), HF model directories and Megatron
checkpoints (parameters only, from step 0). Metrics go to `--metrics_file` as JSON lines.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import os
import re
import time
from pathlib import Path

import torch
import torch.distributed as dist
from absl import flags
from torch.utils import _pytree as pytree

import checkpoints
import mistral_fn as mf
import sharding
from checkpoints import native
from experiments import cli
from experiments.cli import main_guard
from mistral_fn import optim, train
from mistral_fn.data import GPTDataset, InstructionDataset, iterate_batches
from mistral_fn.errors import CheckpointError, ConfigError
from mistral_fn.params import INIT_STD, cast, leaves_with_paths, map_with_path
from mistral_fn.tokenizer import load_tokenizer

# ---- flags (absl spellings of the seed's Megatron arguments) -----------------------------------------
F = flags.FLAGS
flags.DEFINE_string("model", "tiny", "preset: " + ", ".join(sorted(mf.PRESETS)) + " (also as mistral_7b_instruct_v0_2)")
flags.DEFINE_integer("num_layers", None, "override the preset's layer count")
flags.DEFINE_integer("hidden_size", None, "override dim")
flags.DEFINE_integer("ffn_hidden_size", None, "override the ffn width")
flags.DEFINE_integer("num_attention_heads", None, "override query heads")
flags.DEFINE_integer("num_query_groups", None, "override kv heads")
flags.DEFINE_integer("vocab_size", None, "override the vocabulary (synthetic data)")
flags.DEFINE_float("rotary_base", None, "override rope theta")
flags.DEFINE_integer("sliding_window", None, "override the attention window (0: full causal)")
flags.DEFINE_integer("make_vocab_size_divisible_by", 1, "vocab padding under TP (Megatron)")
flags.DEFINE_float("init_method_std", 0.02, "std of the random init of matrices")
flags.DEFINE_integer("tensor_model_parallel_size", 1, "TP ranks; dp = WORLD_SIZE / tp")
flags.DEFINE_integer("micro_batch_size", 1, "sequences per forward/backward")
flags.DEFINE_integer("global_batch_size", 8, "sequences per optimizer step over all dp ranks")
flags.DEFINE_integer("seq_length", 128, "tokens per sequence")
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
flags.DEFINE_bool("bf16", False, "bf16 compute with float32 master weights")
flags.DEFINE_bool("fp16", False, "fp16 compute with float32 master weights and dynamic loss scaling")
flags.DEFINE_float("initial_loss_scale", 2.0**16, "fp16 initial loss scale")
flags.DEFINE_integer("max_skipped_steps", 10, "stop after this many non-finite steps in a row")
flags.DEFINE_string("data_path", None, "indexed dataset prefix (default: synthetic data)")
flags.DEFINE_string("split", "969,30,1", "train,valid,test document weights")
flags.DEFINE_string("tokenizer_model", None, "tokenizer.model or HF dir (checked against the vocab; pad id)")
flags.DEFINE_bool("is_instruction_dataset", False, "data_path is a ModelLink instruction (packed) dataset")
flags.DEFINE_string("save", None, "checkpoint directory")
flags.DEFINE_integer("save_interval", None, "checkpoint every N steps (and always at the end)")
flags.DEFINE_enum("save_format", "native", ["native", "megatron"], "megatron: also a ModelLink model checkpoint")
flags.DEFINE_integer("keep_last", None, "keep only the newest N native checkpoints")
flags.DEFINE_string("load", None, "native, HF or Megatron checkpoint to start from")
flags.DEFINE_bool("finetune", False, "with --load: parameters only, step 0, fresh optimizer")
flags.DEFINE_integer("exit_interval", None, "stop cleanly (with a checkpoint) after a step divisible by N")
flags.DEFINE_integer("eval_interval", None, "validation loss every N steps")
flags.DEFINE_integer("eval_iters", 2, "validation global batches")
flags.DEFINE_integer("seed", 1234, "init, data order and synthetic data seed")
flags.DEFINE_integer("log_interval", 1, "metrics every N steps")
flags.DEFINE_string("metrics_file", None, "JSON lines (default <save>/metrics.jsonl)")
flags.DEFINE_float("peak_tflops", None, "per-device peak TFLOP/s, for MFU")
flags.DEFINE_string("device", None, "cpu, cuda or npu (default: best available)")


def model_config() -> mf.MistralConfig:
    key = lambda name: re.sub(r"[-_.]", "", name.lower())  # noqa: E731
    names = {key(n): n for n in mf.PRESETS}
    if key(F.model) not in names:
        raise ConfigError(f"--model={F.model!r}: expected one of {', '.join(sorted(mf.PRESETS))}")
    overrides = {"n_layers": F.num_layers, "dim": F.hidden_size, "ffn_dim": F.ffn_hidden_size,
                 "n_heads": F.num_attention_heads, "n_kv_heads": F.num_query_groups, "vocab_size": F.vocab_size,
                 "rope_theta": F.rotary_base}
    cfg = mf.MistralConfig.preset(names[key(F.model)])
    changes = {k: v for k, v in overrides.items() if v is not None}
    if F.hidden_size or F.num_attention_heads:
        changes["head_dim"] = None
    if F.sliding_window is not None:
        changes["sliding_window"] = F.sliding_window or None
    cfg = cfg.replace(**changes, max_seq_len=max(cfg.max_seq_len, F.seq_length))
    return cfg


def schedule_and_optimizer():
    decay_iters = F.lr_decay_iters or F.train_iters
    sched = optim.warmup_decay(F.lr, decay_iters, F.lr_warmup_fraction * decay_iters, F.min_lr, F.lr_decay_style)
    return sched, optim.adamw(sched, F.adam_beta1, F.adam_beta2, F.adam_eps, F.weight_decay, mask=optim.decay_mask)


def initial_params(cfg, specs, tp_rank, tp_size):
    """Full params (random, or `--load` HF/Megatron) sharded for this tp rank, float32."""
    if F.load and not native.is_native(F.load):
        if (Path(F.load) / "config.json").is_file():
            loaded_cfg, params = checkpoints.load_hf(F.load, dtype=torch.float32)
        else:
            from checkpoints.lazy import materialize
            from checkpoints.megatron import read_megatron
            loaded_cfg, _, lazy = read_megatron(F.load, hf=cfg)
            params = cast(materialize(lazy), torch.float32)
        differ = [f.name for f in dataclasses.fields(cfg) if f.name != "max_seq_len"
                  and getattr(cfg, f.name) != getattr(loaded_cfg, f.name)]
        if differ:
            raise CheckpointError(f"{F.load}: {differ[0]}={getattr(loaded_cfg, differ[0])} but the flags give "
                                  f"{getattr(cfg, differ[0])}")
    else:
        params = mf.init_params(cfg, seed=F.seed)
        if F.init_method_std != INIT_STD:
            params = map_with_path(lambda p, x: x * (F.init_method_std / INIT_STD) if x.dim() > 1 else x, params)
    return sharding.shard(params, specs, {"tp": tp_size}, {"tp": tp_rank})


class Data:
    """Global batches for this dp rank: `[n_micro * micro_batch_size, T]` per key, resumable."""

    def __init__(self, cfg, split_name, num_samples, dp_rank, dp_size):
        self.cfg, self.dp_rank, self.dp_size = cfg, dp_rank, dp_size
        self.dataset = None
        if F.data_path:
            if F.is_instruction_dataset:
                pad = load_tokenizer(F.tokenizer_model).pad_id if F.tokenizer_model else cfg.eos_id
                self.dataset = InstructionDataset(F.data_path, F.seq_length, pad, num_samples=num_samples,
                                                  seed=F.seed, split=F.split, split_name=split_name)
            else:
                self.dataset = GPTDataset(F.data_path, F.seq_length, num_samples=num_samples, seed=F.seed,
                                          split=F.split, split_name=split_name)

    def batches(self, consumed_samples: int, generator: torch.Generator):
        n_micro = F.global_batch_size // (F.micro_batch_size * self.dp_size)
        if self.dataset is None:
            while True:
                x = torch.randint(0, self.cfg.vocab_size, (F.global_batch_size, F.seq_length + 1), generator=generator)
                mine = x.view(n_micro, self.dp_size, F.micro_batch_size, -1)[:, self.dp_rank].flatten(0, 1)
                yield {"tokens": mine[:, :-1], "labels": mine[:, 1:], "loss_mask": torch.ones_like(mine[:, 1:])}
        micro = iterate_batches(self.dataset, F.micro_batch_size, dp_rank=self.dp_rank, dp_size=self.dp_size,
                                consumed_samples=consumed_samples)
        while True:
            group = [next(micro, None) for _ in range(n_micro)]
            if group[-1] is None:
                return
            yield {k: torch.cat([g[k] for g in group]) for k in group[0]}


def model_flops_per_token(cfg: mf.MistralConfig, seq: int) -> float:
    """6 x matmul params (embedding lookup excluded) + causal attention 6 L T D (PaLM appendix B, halved)."""
    n = mf.count_params(mf.init_params(cfg, device="meta")) - cfg.vocab_size * cfg.dim
    return 6.0 * n + 6.0 * cfg.n_layers * seq * cfg.n_heads * cfg.head_dim


def check_flags(world: int):
    tp = F.tensor_model_parallel_size
    if tp < 1 or world % tp:
        raise ConfigError(f"--tensor_model_parallel_size={tp} does not divide WORLD_SIZE={world}")
    dp = world // tp
    if F.global_batch_size % (F.micro_batch_size * dp):
        raise ConfigError(f"--global_batch_size={F.global_batch_size} is not divisible by micro_batch_size x dp = "
                          f"{F.micro_batch_size} x {dp}")
    if F.bf16 and F.fp16:
        raise ConfigError("--bf16 and --fp16 are exclusive")
    if F.finetune and not F.load:
        raise ConfigError("--finetune needs --load")
    if F.is_instruction_dataset and not F.data_path:
        raise ConfigError("--is_instruction_dataset needs --data_path")
    if (F.save_interval or F.exit_interval) and not F.save:
        raise ConfigError("--save_interval/--exit_interval need --save")
    return tp, dp


@main_guard
def main(argv):
    del argv
    tp_size, dp_size = check_flags(int(os.environ.get("WORLD_SIZE", "1")))
    cfg = model_config()
    padded = sharding.validate_tp(cfg, tp_size, F.make_vocab_size_divisible_by)
    mesh = sharding.Mesh({"dp": dp_size, "tp": tp_size}, F.device)
    rank, tp_rank, dp_rank = mesh.rank, mesh.coords["tp"], mesh.coords["dp"]
    dp = sharding.GroupTP(mesh.group("dp")) if dp_size > 1 else mf.SINGLE_DEVICE
    barrier = dist.barrier if mesh.size > 1 else None
    if F.tokenizer_model:
        vocab = load_tokenizer(F.tokenizer_model).vocab_size
        if vocab > cfg.vocab_size:
            raise ConfigError(f"--tokenizer_model has {vocab} pieces but the model's vocab_size is {cfg.vocab_size}")

    rules = sharding.mistral_rules(cfg, F.make_vocab_size_divisible_by)
    specs = sharding.match(mf.init_params(cfg, device="meta"), rules)
    sharded_paths = {p for p, s in leaves_with_paths(specs, is_leaf=lambda x: isinstance(x, sharding.PartitionSpec))
                     if any(a is not None for a in s.axes)}
    sched, opt = schedule_and_optimizer()
    compute = torch.bfloat16 if F.bf16 else torch.float16 if F.fp16 else None
    loss_scale = optim.dynamic_loss_scale(F.initial_loss_scale) if F.fp16 else None
    loss = functools.partial(mf.loss_fn, config=cfg, tp=mesh.tp, recompute=F.recompute_granularity == "full",
                             chunk_size=F.loss_chunk_size or None)
    step_fn = train.make_train_step(loss, opt, micro_batch_size=F.micro_batch_size, dp=dp, tp=mesh.tp,
                                    sharded_paths=sharded_paths, max_grad_norm=F.clip_grad or None,
                                    compute_dtype=compute, loss_scale=loss_scale, schedule=sched,
                                    max_skipped=F.max_skipped_steps, donate=True)

    params = pytree.tree_map(lambda x: x.to(mesh.device), initial_params(cfg, specs, tp_rank, tp_size))
    ckpt = {"train": train.init_train_state(params, opt, loss_scale=loss_scale),
            "rng": torch.Generator().manual_seed(F.seed).get_state()}
    if F.load and native.is_native(F.load):
        meta = native.read_metadata(F.load, rank=rank)
        if (meta["extra"].get("tp"), meta["extra"].get("dp")) != (tp_size, dp_size):
            raise CheckpointError(f"{F.load}: saved with tp={meta['extra'].get('tp')}, dp={meta['extra'].get('dp')}; "
                                  f"this run has tp={tp_size}, dp={dp_size}")
        loaded, _ = native.load_native(F.load, ckpt, rank=rank)
        ckpt = {**ckpt, "train": ckpt["train"]._replace(params=loaded["train"].params)} if F.finetune else loaded
    state = ckpt["train"]
    start = int(state.step)
    generator = torch.Generator()
    generator.set_state(ckpt["rng"])

    metrics_path = Path(F.metrics_file) if F.metrics_file else Path(F.save) / "metrics.jsonl" if F.save else None
    log = Logger(rank == 0, metrics_path)
    log.text(f"model {F.model}: {mf.count_params(mf.init_params(cfg, device='meta')):,} params (vocab padded to "
             f"{padded}); mesh {mesh.shape} on {mesh.device}; steps {start}..{F.train_iters}")

    def save(step):
        tree = {"train": state, "rng": generator.get_state()}
        extra = {"tp": tp_size, "dp": dp_size, "config": cfg.to_hf()}
        path = native.save_native(F.save, step, tree, extra=extra, rank=rank, world_size=mesh.size,
                                  keep=F.keep_last, barrier=barrier)
        if F.save_format == "megatron":
            save_megatron_copy(cfg, state.params, specs, tp_size, rank, mesh)
        log.text(f"saved {path}")

    data = Data(cfg, "train", F.train_iters * F.global_batch_size, dp_rank, dp_size)
    valid = Data(cfg, "valid", F.eval_iters * F.global_batch_size, dp_rank, dp_size) if F.eval_interval else None
    flops_token = model_flops_per_token(cfg, F.seq_length)
    tokens_step = F.global_batch_size * F.seq_length
    batches = data.batches(int(state.consumed_samples), generator)
    tick, step, m, speeds = time.perf_counter(), start, {}, []
    while step < F.train_iters:
        batch = next(batches, None)
        if batch is None:
            log.text(f"data exhausted after {step} steps")
            break
        state, m = step_fn(state, {k: v.to(mesh.device) for k, v in batch.items()})
        step += 1
        if step % F.log_interval == 0 or step == F.train_iters:
            now = time.perf_counter()
            tps = tokens_step * F.log_interval / (now - tick) if step % F.log_interval == 0 else float("nan")
            tick = now
            speeds.append(tps)
            record = {"step": step, **m, "tokens_per_sec": tps,
                      "tflops_per_device": tps * flops_token / mesh.size / 1e12}
            if F.peak_tflops:
                record["mfu"] = record["tflops_per_device"] / F.peak_tflops
            log.metrics(record)
        if valid and step % F.eval_interval == 0:
            log.metrics({"step": step, "val_loss": evaluate(loss, state.params, compute, valid, dp, mesh.device)})
        stop = bool(F.exit_interval) and step % F.exit_interval == 0
        if F.save and ((F.save_interval and step % F.save_interval == 0) or stop or step == F.train_iters):
            save(step)
        if stop:
            log.text(f"exit_interval: stopping after step {step}")
            break
    summary = {"summary": True, "steps": step, "start_step": start, "final_loss": m.get("loss"),
               "skipped_total": int(state.skipped_total), "consumed_samples": int(state.consumed_samples),
               "mean_tokens_per_sec": sum(speeds) / max(len(speeds), 1)}
    log.metrics(summary)
    mesh.close()


def evaluate(loss, params, compute, data: Data, dp, device) -> float:
    """Mean validation loss over the split's first `--eval_iters` global batches (the same every time)."""
    params = cast(params, compute) if compute is not None else params
    losses = []
    with torch.no_grad():
        for batch in itertools.islice(data.batches(0, torch.Generator().manual_seed(F.seed + 1)), F.eval_iters):
            batch = {k: v.to(device) for k, v in batch.items()}
            losses += [loss(params, mb) for mb in train.split_micro_batches(batch, F.micro_batch_size)]
    return float(dp.all_reduce(torch.stack(losses).mean(), "sum") / dp.size)


def save_megatron_copy(cfg, params, specs, tp_size, rank, mesh):
    """Gather the full params (over tp) and let rank 0 write a ModelLink checkpoint to `<save>/megatron`."""
    from checkpoints.megatron import save_megatron
    full = params
    if tp_size > 1:
        leaves, treedef = pytree.tree_flatten(params)
        gathered = []
        for x in leaves:
            parts = [torch.empty_like(x) for _ in range(tp_size)]
            dist.all_gather(parts, x.contiguous(), group=mesh.group("tp"))
            gathered.append(parts)
        pieces = [pytree.tree_unflatten([g[t] for g in gathered], treedef) for t in range(tp_size)]
        full = sharding.unshard(pieces, specs, {"tp": tp_size})
    if rank == 0:
        dtype = torch.bfloat16 if F.bf16 else torch.float16 if F.fp16 else torch.float32
        save_megatron(Path(F.save) / "megatron", cfg, full, tp=tp_size, pp=1, dtype=dtype,
                      make_vocab_size_divisible_by=F.make_vocab_size_divisible_by, overwrite=True)
    if mesh.size > 1:
        dist.barrier()


class Logger:
    """Rank 0 prints one line per record and appends it to `path` (if any) as JSON."""

    def __init__(self, enabled: bool, path: Path | None):
        self.enabled, self.path = enabled, path
        if enabled and path:
            path.parent.mkdir(parents=True, exist_ok=True)

    def text(self, line: str):
        if self.enabled:
            print(line, flush=True)

    def metrics(self, record: dict):
        if not self.enabled:
            return
        print(" | ".join(f"{k} {_fmt(v)}" for k, v in record.items()), flush=True)
        if self.path:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


def _fmt(v):
    return f"{v:.6g}" if isinstance(v, float) and math.isfinite(v) else str(v)


if __name__ == "__main__":
    cli.run(main)
