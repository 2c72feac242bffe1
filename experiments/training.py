"""The training run behind `experiments.pretrain`: a frozen `TrainConfig` and `train(config, mesh)`.

    config = TrainConfig(model="tiny", train_iters=20, save="workdir/tiny")
    summary = train(config, sharding.Mesh({"dp": 1, "tp": 1}))

One process per mesh rank (`torchrun`); the mesh is `{dp: world / tp, tp: tensor_model_parallel_size}`. The
model comes from `load` (HF, Megatron or native; architecture flags are checked against it) or from a
preset; data from an indexed dataset or, without `data_path`, uniform random tokens from a seeded generator
(its state is saved in checkpoints). A native `load` resumes everything unless `finetune`
(parameters only, step 0) or `no_load_optim` / `no_load_rng`; a Megatron `load` resumes its iteration unless
`finetune`, as Megatron does. Metrics go to `metrics_file` (default `<save>/metrics.jsonl`) as JSON lines;
the summary record ends the run with its speed and its peak memory (RSS, the largest over ranks).

LoRA (`lora.target_modules`, ModelLink's `--lora-*`): `load` is only the frozen base, held as this rank's
shards in the compute dtype and closed over by the loss; the train state holds the adapters (float32)
and their optimizer moments alone (`lora_setup`). Checkpoints hold the adapters, their settings in the
metadata; `lora.load` resumes them as a native `load` resumes a full run (`finetune`: adapters only).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import resource
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils import _pytree as pytree

import checkpoints
import mistral_fn as mf
import sharding
from checkpoints import native
from checkpoints.lazy import materialize
from checkpoints.megatron import read_megatron, save_megatron
from checkpoints.native_params import LORA_KEY
from sharding.train_state import StateLayout, as_tree, gather_state, nest, scatter_state
from experiments.architecture import Architecture
from experiments.lora_args import LoraArgs
from mistral_fn import optim, train as mf_train
from mistral_fn.data import GPTDataset, InstructionDataset, iterate_batches
from mistral_fn.errors import ConfigError, DivergenceError
from mistral_fn.params import INIT_STD, cast, leaves_with_paths, map_with_path
from mistral_fn.tokenizer import load_tokenizer

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a training run reads, in Megatron's terms (the flags of `experiments.pretrain`)."""

    # model: a preset and architecture flags when nothing is loaded; else checked against `load`
    model: str = "tiny"
    arch: Architecture = Architecture()
    make_vocab_size_divisible_by: int = 1
    init_method_std: float = INIT_STD
    # parallelism
    tensor_model_parallel_size: int = 1
    sequence_parallel: bool = False
    distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False
    # batches
    micro_batch_size: int = 1
    global_batch_size: int = 8
    seq_length: int = 128
    train_iters: int = 20
    # optimizer and schedule
    lr: float = 1e-3
    min_lr: float = 0.0
    lr_decay_style: str = "cosine"
    lr_warmup_fraction: float = 0.0
    lr_decay_iters: int | None = None
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0  # 0: no clipping
    # numerics
    precision: str = "fp32"  # fp32 | bf16 | fp16 (float32 master weights under both)
    initial_loss_scale: float = 2.0**16
    recompute: bool = False
    loss_chunk_size: int | None = 4096
    compile: bool = False  # torch.compile the loss: forward and backward as compiled graphs
    max_skipped_steps: int = 10
    # data
    data_path: str | None = None
    split: str = "969,30,1"
    is_instruction_dataset: bool = False
    tokenizer: str | None = None  # tokenizer.model or an HF directory: pad id, vocab check
    # checkpoints
    load: str | None = None
    finetune: bool = False
    no_load_optim: bool = False
    no_load_rng: bool = False
    save: str | None = None
    save_interval: int | None = None
    save_format: str = "native"  # native | megatron (also a ModelLink model checkpoint under <save>/megatron)
    keep_last: int | None = None
    exit_interval: int | None = None
    # evaluation and logging
    eval_interval: int | None = None
    eval_iters: int = 2
    seed: int = 1234
    log_interval: int = 1
    metrics_file: str | None = None
    peak_tflops: float | None = None
    # LoRA: train adapters only (on when lora.target_modules names modules)
    lora: LoraArgs = LoraArgs()

    def __post_init__(self):
        positive = ("tensor_model_parallel_size", "micro_batch_size", "global_batch_size", "seq_length", "log_interval",
                    "max_skipped_steps", "make_vocab_size_divisible_by")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name}={getattr(self, name)} must be >= 1")
        for name in ("train_iters", "eval_iters"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name}={getattr(self, name)} must be >= 0")
        for name in ("save_interval", "exit_interval", "eval_interval", "keep_last", "lr_decay_iters",
                     "loss_chunk_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"--{name}={value} must be >= 1 (or unset)")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision {self.precision!r}: expected one of {', '.join(PRECISIONS)}")
        if self.save_format not in ("native", "megatron"):
            raise ConfigError(f"--save_format={self.save_format!r}: expected native or megatron")
        if self.finetune and not self.load:
            raise ConfigError("--finetune needs --load")
        if self.is_instruction_dataset and not self.data_path:
            raise ConfigError("--is_instruction_dataset needs --data_path")
        if self.sequence_parallel and self.seq_length % self.tensor_model_parallel_size:
            raise ConfigError(f"--sequence_parallel: --seq_length={self.seq_length} is not divisible by "
                              f"--tensor_model_parallel_size={self.tensor_model_parallel_size}")
        if (self.save_interval or self.exit_interval or self.keep_last) and not self.save:
            raise ConfigError("--save_interval/--exit_interval/--keep_last need --save")
        if not self.lora.enabled and (self.lora.r or self.lora.alpha or self.lora.load):
            raise ConfigError("--lora_r/--lora_alpha/--lora_load need --lora_target_modules (LoRA is on only with "
                              "target modules, as in ModelLink)")

    @property
    def compute_dtype(self) -> torch.dtype | None:
        return PRECISIONS[self.precision]

    def mesh_shape(self, world_size: int) -> dict[str, int]:
        """`{"dp": world / tp, "tp": tp}`, or `ConfigError` when the batch does not split over it."""
        tp = self.tensor_model_parallel_size
        if world_size % tp:
            raise ConfigError(f"--tensor_model_parallel_size={tp} does not divide WORLD_SIZE={world_size}")
        dp = world_size // tp
        if self.global_batch_size % (self.micro_batch_size * dp):
            raise ConfigError(f"--global_batch_size={self.global_batch_size} is not divisible by micro_batch_size x dp "
                              f"= {self.micro_batch_size} x {dp}")
        return {"dp": dp, "tp": tp}


# ---- the model and where the run starts ---------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Start:
    """Where a run starts: the model config, full float32 params (None: a native resume fills them), and the
    step / consumed samples to resume from."""

    model: mf.MistralConfig
    params: dict | None
    step: int = 0
    consumed_samples: int = 0


def starting_point(config: TrainConfig) -> Start:
    """Resolve `config.load` (or the preset) into the model config and initial parameters.

    HF and Megatron checkpoints give float32 params (a Megatron one also its iteration and consumed
    samples, unless `finetune`); a native one gives only the config here (`train` restores its whole state).
    Under LoRA any checkpoint gives its params alone, in the compute dtype, and the run starts at step 0.
    """
    if not config.load:
        model = config.arch.define(mf.MistralConfig.preset(preset_name(config.model)))
        model = model.replace(max_seq_len=max(model.max_seq_len, config.seq_length))
        params = mf.init_params(model, seed=config.seed)
        if config.init_method_std != INIT_STD:
            scale = config.init_method_std / INIT_STD
            params = map_with_path(lambda p, x: x * scale if x.dim() > 1 else x, params)
        return Start(model, params)
    if config.lora.enabled:
        stored, params = checkpoints.load(config.load, config.compute_dtype or torch.float32, hf_dir=_hf_dir(config),
                                          rotary_base=config.arch.rotary_base)
        return Start(config.arch.check(stored, config.load), params)
    fmt = checkpoints.detect_format(config.load)
    if fmt == "native":
        stored, _, _ = checkpoints.read_native_params(config.load, verify=False)
        return Start(config.arch.check(stored, config.load), None)
    if fmt == "megatron":
        stored, source, lazy = read_megatron(config.load, _hf_dir(config), rotary_base=config.arch.rotary_base)
        model, params = config.arch.check(stored, config.load), materialize(lazy, torch.float32)
        if config.finetune:
            return Start(model, params)
        return Start(model, params, source.step, source.consumed_train_samples)
    stored, params = checkpoints.load_hf(config.load, dtype=torch.float32)
    return Start(config.arch.check(stored, config.load), params)


def _hf_dir(config: TrainConfig) -> str | None:
    """The HF directory that supplies what ModelLink's Megatron args lack (the rope base, after
    `--rotary_base`): the tokenizer's directory when it holds a config.json (the seed passes the HF model
    directory as `--tokenizer-name-or-path`)."""
    if config.tokenizer and (Path(config.tokenizer) / "config.json").is_file():
        return config.tokenizer
    return None


def preset_name(name: str) -> str:
    """The preset called `name`, in any spelling (`mistral_7b_instruct_v0_2` is `mistral-7b-instruct-v0.2`)."""
    key = lambda s: s.lower().replace("-", "").replace("_", "").replace(".", "")  # noqa: E731
    names = {key(n): n for n in mf.PRESETS}
    if key(name) not in names:
        raise ConfigError(f"--model={name!r}: expected one of {', '.join(sorted(mf.PRESETS))}")
    return names[key(name)]


# ---- data --------------------------------------------------------------------------------------------

class Data:
    """Global batches for this dp rank: `[n_micro * micro_batch_size, T]` per key, resumable."""

    def __init__(self, config: TrainConfig, model: mf.MistralConfig, split_name: str, num_samples: int,
                 dp_rank: int, dp_size: int):
        self.config, self.model, self.dp_rank, self.dp_size = config, model, dp_rank, dp_size
        self.dataset = None
        if config.data_path:
            if config.is_instruction_dataset:
                pad = load_tokenizer(config.tokenizer).pad_id if config.tokenizer else model.eos_id
                self.dataset = InstructionDataset(config.data_path, config.seq_length, pad, num_samples=num_samples,
                                                  seed=config.seed, split=config.split, split_name=split_name)
            else:
                self.dataset = GPTDataset(config.data_path, config.seq_length, num_samples=num_samples,
                                          seed=config.seed, split=config.split, split_name=split_name)

    def batches(self, consumed_samples: int, generator: torch.Generator):
        c = self.config
        n_micro = c.global_batch_size // (c.micro_batch_size * self.dp_size)
        if self.dataset is None:
            while True:
                x = torch.randint(0, self.model.vocab_size, (c.global_batch_size, c.seq_length + 1),
                                  generator=generator)
                mine = x.view(n_micro, self.dp_size, c.micro_batch_size, -1)[:, self.dp_rank].flatten(0, 1)
                yield {"tokens": mine[:, :-1], "labels": mine[:, 1:], "loss_mask": torch.ones_like(mine[:, 1:])}
        micro = iterate_batches(self.dataset, c.micro_batch_size, dp_rank=self.dp_rank, dp_size=self.dp_size,
                                consumed_samples=consumed_samples)
        while True:
            group = [next(micro, None) for _ in range(n_micro)]
            if group[-1] is None:
                return
            yield {k: torch.cat([g[k] for g in group]) for k in group[0]}


# ---- the run -----------------------------------------------------------------------------------------

def model_flops_per_token(model: mf.MistralConfig, seq: int) -> float:
    """6 x matmul params (embedding lookup excluded) + causal attention 6 L T D (PaLM appendix B, halved)."""
    n = mf.count_params(mf.init_params(model, device="meta")) - model.vocab_size * model.dim
    return 6.0 * n + 6.0 * model.n_layers * seq * model.n_heads * model.head_dim


def schedule_and_optimizer(config: TrainConfig):
    decay_iters = config.lr_decay_iters or config.train_iters
    sched = optim.warmup_decay(config.lr, decay_iters, config.lr_warmup_fraction * decay_iters, config.min_lr,
                               config.lr_decay_style)
    return sched, optim.adamw(sched, config.adam_beta1, config.adam_beta2, config.adam_eps, config.weight_decay,
                              mask=optim.decay_mask, fused=True)


def train(config: TrainConfig, mesh: sharding.Mesh, log: "Logger | None" = None) -> dict:
    """Run `config` on this rank of `mesh`; returns the summary record (also logged).

    Raises `DivergenceError` (after saving nothing more) when the run ends on non-finite steps: the newest
    checkpoint is then the last finite one.
    """
    shape = config.mesh_shape(mesh.size)
    if {axis: mesh.shape.get(axis, 1) for axis in shape} != shape:
        raise ConfigError(f"the mesh {mesh.shape} does not match the run's {shape}")
    tp_size, dp_size = shape["tp"], shape["dp"]
    rank, tp_rank, dp_rank = mesh.rank, mesh.coords.get("tp", 0), mesh.coords.get("dp", 0)
    dp = mesh.dp
    barrier = dist.barrier if mesh.size > 1 else None
    resumes = config.lora.load if config.lora.enabled else config.load
    claim = checkpoints.claim_save_dir(config.save, resumes, finetune=config.finetune, rank=rank,
                                       barrier=barrier) if config.save else None

    start = starting_point(config)
    model = start.model
    padded = sharding.validate_tp(model, tp_size, config.make_vocab_size_divisible_by)
    if config.tokenizer:
        vocab = load_tokenizer(config.tokenizer).vocab_size
        if vocab > model.vocab_size:
            raise ConfigError(f"the tokenizer {config.tokenizer} has {vocab} pieces but the model's vocab_size is "
                              f"{model.vocab_size}")
    rules = sharding.mistral_rules(model, config.make_vocab_size_divisible_by)
    specs = sharding.match(mf.init_params(model, device="meta"), rules)
    loss = functools.partial(mf.loss_fn, config=model, tp=mesh.tp, recompute=config.recompute,
                             chunk_size=config.loss_chunk_size)
    full = start.params if start.params is not None else mf.init_params(model, device="meta")
    base = None
    if config.lora.enabled:  # the state trains adapters; the base is closed over by the loss
        base, full, rules, loss = lora_setup(config, model, full, specs, rules, loss, mesh)
    trained_specs = specs if base is None else sharding.match(full, rules)
    trainable = mf.count_params(full)
    sharded_paths = {p for p, s in leaves_with_paths(trained_specs, is_leaf=lambda x: isinstance(x, sharding.P))
                     if any(a is not None for a in s.axes)}
    sched, opt = schedule_and_optimizer(config)
    loss_scale = optim.dynamic_loss_scale(config.initial_loss_scale) if config.precision == "fp16" else None
    step_fn = mf_train.make_train_step(loss, opt, micro_batch_size=config.micro_batch_size, dp=dp, tp=mesh.tp,
                                       sharded_paths=sharded_paths, max_grad_norm=config.clip_grad or None,
                                       compute_dtype=config.compute_dtype, loss_scale=loss_scale, schedule=sched,
                                       max_skipped=config.max_skipped_steps, donate=True,
                                       distributed_optimizer=config.distributed_optimizer,
                                       overlap_grad_reduce=config.overlap_grad_reduce, compile=config.compile)

    local = sharding.shard(full, trained_specs, {"tp": tp_size}, {"tp": tp_rank})
    params = pytree.tree_map(lambda x: x.to(mesh.device), local) if start.params is not None else \
        pytree.tree_map(lambda x: torch.zeros(x.shape, dtype=torch.float32, device=mesh.device), local)
    del full, local
    layout = state_layout(config, shape)
    state = mf_train.init_train_state(params, opt, loss_scale=loss_scale, dp=dp,
                                      distributed_optimizer=layout.distributed_optimizer,
                                      compute_dtype=layout.compute_dtype)
    state = state._replace(step=torch.tensor(start.step), consumed_samples=torch.tensor(start.consumed_samples))
    ckpt = {"train": state, "rng": torch.Generator().manual_seed(config.seed).get_state()}
    if start.params is None:
        ckpt = _resume_native(config, ckpt, mesh, layout, rules)
    elif config.lora.load:
        saved = native.read_metadata(config.lora.load, rank=0)["extra"].get(LORA_KEY) \
            if native.is_native(config.lora.load) else None
        config.lora.check_resume(saved, config.lora.load)
        ckpt = _resume_native(dataclasses.replace(config, load=config.lora.load), ckpt, mesh, layout, rules)
    state = ckpt["train"]
    first_step = int(state.step)
    generator = torch.Generator()
    generator.set_state(ckpt["rng"])

    log = log or Logger(rank == 0, _metrics_path(config))
    log.text(f"model {config.model if not config.load else config.load}: "
             f"{mf.count_params(mf.init_params(model, device='meta')):,} params (vocab padded to {padded}); "
             f"mesh {mesh.shape} on {mesh.device}; steps {first_step}..{config.train_iters}")
    if base is not None:
        log.text(f"LoRA r={config.lora.rank} alpha={config.lora.scale_alpha:g} on "
                 f"{' '.join(config.lora.target_modules)}: {trainable:,} trainable params; the base is frozen")

    def save(step: int) -> None:
        tree = {"train": state, "rng": generator.get_state()}
        extra = {"tp": tp_size, "dp": dp_size, "config": model.to_hf(), **layout_extra(layout)}
        if base is not None:
            extra[LORA_KEY] = {**config.lora.settings(), "base": config.load}
        path = native.save_native(config.save, step, tree, extra=extra, run_id=claim.run_id, rank=rank,
                                  world_size=mesh.size, keep=config.keep_last, barrier=barrier)
        if config.save_format == "megatron":  # under LoRA: the merged model
            merged = state if base is None else state._replace(params=mf.lora.merge(base, state.params))
            save_megatron_copy(config, model, merged, specs, rank, mesh)
        log.text(f"saved {path}")

    data = Data(config, model, "train", config.train_iters * config.global_batch_size, dp_rank, dp_size)
    valid = Data(config, model, "valid", config.eval_iters * config.global_batch_size, dp_rank, dp_size) \
        if config.eval_interval and config.eval_iters else None
    flops_token = model_flops_per_token(model, config.seq_length)
    tokens_step = config.global_batch_size * config.seq_length
    batches = data.batches(int(state.consumed_samples), generator)
    tick, step, m, speeds, logged = time.perf_counter(), first_step, {}, [], first_step
    while step < config.train_iters:
        batch = next(batches, None)
        if batch is None:
            log.text(f"data exhausted after {step} steps")
            break
        state, m = step_fn(state, {k: v.to(mesh.device) for k, v in batch.items()})
        step += 1
        if step % config.log_interval == 0 or step == config.train_iters:
            now = time.perf_counter()
            tps = tokens_step * (step - logged) / (now - tick)  # the steps since the last record
            tick, logged = now, step
            speeds.append(tps)
            record = {"step": step, **m, "tokens_per_sec": tps,
                      "tflops_per_device": tps * flops_token / mesh.size / 1e12}
            if config.peak_tflops:
                record["mfu"] = record["tflops_per_device"] / config.peak_tflops
            log.metrics(record)
        if valid and step % config.eval_interval == 0:
            log.metrics({"step": step, "val_loss": evaluate(config, loss, state.params, valid, dp, mesh.device)})
        stop = bool(config.exit_interval) and step % config.exit_interval == 0
        wants_save = (config.save_interval and step % config.save_interval == 0) or stop or step == config.train_iters
        if config.save and wants_save and not m.get("skipped"):
            save(step)
        if stop:
            log.text(f"exit_interval: stopping after step {step}")
            break
    summary = {"summary": True, "steps": step, "start_step": first_step, "final_loss": m.get("loss"),
               "skipped_total": int(state.skipped_total), "consumed_samples": int(state.consumed_samples),
               "mean_tokens_per_sec": sum(speeds) / max(len(speeds), 1), "trainable_params": trainable,
               "peak_rss_mib": peak_rss_mib(mesh)}
    log.metrics(summary)
    if m.get("skipped"):
        kept = native.latest_step(config.save) if config.save else None
        raise DivergenceError(f"training ended on {int(state.skipped_in_row)} non-finite step(s) in a row (loss "
                              f"{m['loss']}); nothing was saved for them"
                              + (f"; {config.save}/latest is the last finite checkpoint, step {kept}" if kept else ""))
    return summary


def lora_setup(config: TrainConfig, model: mf.MistralConfig, full, specs, rules, loss, mesh: sharding.Mesh):
    """LoRA: `(base, adapters, rules, loss)`: this rank's frozen shards of the base `full` in the compute
    dtype, on the mesh's device; fresh full adapters (float32, CPU, seeded by `config.seed`; B = 0, so
    step 0 is the base model); `rules` extended to adapters; and the loss of the adapters,
    `loss(lora.apply(base, adapters, tp), batch)`."""
    local = sharding.shard(full, specs, {"tp": mesh.shape.get("tp", 1)}, {"tp": mesh.coords.get("tp", 0)})
    base = pytree.tree_map(lambda x: x.to(mesh.device, config.compute_dtype or x.dtype), local)
    adapters = mf.lora.init(full, model, rank=config.lora.rank, alpha=config.lora.scale_alpha,
                            targets=config.lora.target_modules, seed=config.seed, dtype=torch.float32, device="cpu")

    def adapted(trained, batch):
        return loss(mf.lora.apply(base, trained, mesh.tp), batch)

    return base, adapters, sharding.with_lora_rules(rules), adapted


def peak_rss_mib(mesh: sharding.Mesh) -> float:
    """This process's peak resident memory so far in MiB (Linux `ru_maxrss`), the largest over the mesh's ranks."""
    peak = torch.tensor(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, device=mesh.device)
    if mesh.size > 1:
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    return float(peak)


def state_layout(config: TrainConfig, mesh_shape: dict[str, int]) -> StateLayout:
    """How this run's train state lies on its mesh (ZeRO-1 keeps the params in the compute dtype, except
    LoRA adapters, which are small and stay float32)."""
    zero = config.distributed_optimizer
    return StateLayout(mesh_shape, zero, config.compute_dtype if zero and not config.lora.enabled else None)


def layout_extra(layout: StateLayout) -> dict:
    """The layout as native checkpoint metadata (beside "tp" and "dp")."""
    dtype = layout.compute_dtype
    return {"distributed_optimizer": layout.distributed_optimizer,
            "compute_dtype": None if dtype is None else str(dtype).removeprefix("torch.")}


def saved_layout(extra: dict) -> StateLayout:
    """The `StateLayout` a native checkpoint was saved with (checkpoints from before ZeRO-1: plain tp x dp)."""
    dtype = extra.get("compute_dtype")
    return StateLayout({"dp": extra.get("dp", 1), "tp": extra.get("tp", 1)}, bool(extra.get("distributed_optimizer")),
                       getattr(torch, dtype) if dtype else None)


def _resume_native(config: TrainConfig, ckpt: dict, mesh: sharding.Mesh, layout: StateLayout, rules) -> dict:
    """`ckpt` restored from the native checkpoint `config.load` (its optimizer/RNG kept fresh where asked).

    A checkpoint saved on another mesh (tp x dp, with or without ZeRO-1) is resharded: every saved rank is
    read, the whole state gathered and this rank's part cut out (`sharding.train_state`); this holds the
    full state in each process, fine for small models (7B: reshard offline, a few paths at a time).
    """
    source = saved_layout(native.read_metadata(config.load, rank=0)["extra"])
    if source == layout:
        loaded, _ = native.load_native(config.load, ckpt, rank=mesh.rank)
    else:
        sizes = list(source.mesh_shape.values())
        pieces = [_rank_tensors(config.load, rank) for rank in range(math.prod(sizes))]
        full = gather_state(nest(pieces, sizes), source, rules)
        loaded = as_tree(scatter_state(full, layout, mesh.coords, rules), ckpt)
    fresh = ckpt["train"]
    if config.finetune:
        return {**ckpt, "train": fresh._replace(params=loaded["train"].params, master=loaded["train"].master)}
    state = loaded["train"]
    if config.no_load_optim:
        state = state._replace(opt_state=fresh.opt_state, loss_scale=fresh.loss_scale)
    return {"train": state, "rng": ckpt["rng"] if config.no_load_rng else loaded["rng"]}


def _rank_tensors(root: str, rank: int) -> dict[str, torch.Tensor]:
    """Every tensor a rank saved, `{path: tensor}`, checked as `native.load_native` checks them."""
    stored = native.read_metadata(root, rank=rank)["tensors"]
    template = {name: torch.empty(shape, dtype=getattr(torch, kind)) for name, (kind, shape) in stored.items()}
    return native.load_native(root, template, rank=rank)[0]


def evaluate(config: TrainConfig, loss, params, data: Data, dp, device) -> float:
    """Mean validation loss over the split's first `eval_iters` global batches (the same every time)."""
    params = cast(params, config.compute_dtype) if config.compute_dtype is not None else params
    losses = []
    with torch.no_grad():
        for batch in itertools.islice(data.batches(0, torch.Generator().manual_seed(config.seed + 1)),
                                      config.eval_iters):
            batch = {k: v.to(device) for k, v in batch.items()}
            losses += [loss(params, mb) for mb in mf_train.split_micro_batches(batch, config.micro_batch_size)]
    return float(dp.all_reduce(torch.stack(losses).mean(), "sum") / dp.size)


def save_megatron_copy(config: TrainConfig, model: mf.MistralConfig, state, specs, rank: int, mesh) -> None:
    """Gather the full params (over tp) and let rank 0 write them as a ModelLink checkpoint to `<save>/megatron`
    at the run's iteration and consumed samples (what Megatron resumes)."""
    tp_size = mesh.shape.get("tp", 1)
    full = state.params
    if tp_size > 1:
        leaves, treedef = pytree.tree_flatten(state.params)
        gathered = []
        for x in leaves:
            parts = [torch.empty_like(x) for _ in range(tp_size)]
            dist.all_gather(parts, x.contiguous(), group=mesh.group("tp"))
            gathered.append(parts)
        pieces = [pytree.tree_unflatten([g[t] for g in gathered], treedef) for t in range(tp_size)]
        full = sharding.unshard(pieces, specs, {"tp": tp_size})
    if rank == 0:
        save_megatron(Path(config.save) / "megatron", model, full, tp=tp_size, pp=1,
                      dtype=config.compute_dtype or torch.float32,
                      make_vocab_size_divisible_by=config.make_vocab_size_divisible_by, iteration=int(state.step),
                      consumed_train_samples=int(state.consumed_samples), overwrite=True)
    if mesh.size > 1:
        dist.barrier()


def _metrics_path(config: TrainConfig) -> Path | None:
    if config.metrics_file:
        return Path(config.metrics_file)
    return Path(config.save) / "metrics.jsonl" if config.save else None


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
