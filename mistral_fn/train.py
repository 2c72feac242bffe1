"""The training step as a pure function: `step(state, batch) -> (new_state, metrics)`.

    step = make_train_step(partial(mf.loss_fn, config=cfg, recompute=True, chunk_size=4096),
                           optim.adamw(schedule, b2=0.95, weight_decay=0.1, mask=optim.decay_mask),
                           micro_batch_size=1, max_grad_norm=1.0, compute_dtype=torch.bfloat16)
    state = init_train_state(params, optimizer, master_dtype=torch.float32)
    state, metrics = step(state, batch)        # batch: this dp rank's [n_micro * micro_batch_size, T]

One step = gradient accumulation over micro-batches (float32), data-parallel all-reduce, the global
gradient norm (TP-aware), a non-finite check (skip, count, stop after `max_skipped` in a row),
clipping, the optimizer update, and a second check that refuses (skips, counts) an update that would
make any parameter non-finite. The loss follows Megatron: each micro-batch's masked mean, averaged
over micro-batches and dp ranks.

Gradients come from `value_and_grad`, built on `torch.autograd.grad` over detached leaves: measured
against `torch.func.grad_and_value` (`benchmarks/bench_grad_mechanisms.py`) it takes the same time and
about half the peak memory, and only under it does per-layer recomputation (`loss_fn(recompute=True)`,
`remat.checkpoint`, which also runs under torch.func) lower the peak further.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Collection, NamedTuple, Protocol

import torch
from torch.utils import _pytree as pytree

from mistral_fn import optim
from mistral_fn.errors import DivergenceError, InputError
from mistral_fn.params import cast, leaves_with_paths
from mistral_fn.parallel import SINGLE_DEVICE, TensorParallel


class DataParallel(Protocol):
    """What the step needs from the dp group (`parallel.SINGLE_DEVICE` is the size-1 one)."""

    size: int

    def all_reduce(self, x: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """The reduced tensor (a new one or `x` itself); `x` is never one of the caller's inputs."""


class TrainState(NamedTuple):
    """Everything a step reads and returns. `params` are float32 master weights in mixed precision."""

    params: Any
    opt_state: Any
    step: torch.Tensor  # int64: iterations run, skipped ones included
    consumed_samples: torch.Tensor  # int64: samples consumed over all dp ranks
    skipped_in_row: torch.Tensor  # int64: consecutive non-finite steps
    skipped_total: torch.Tensor  # int64
    loss_scale: Any  # optim.LossScaleState, or () without loss scaling


def init_train_state(params, optimizer: optim.GradientTransformation, *, master_dtype: torch.dtype | None = None,
                     loss_scale: optim.LossScale | None = None) -> TrainState:
    """A fresh state. `master_dtype=torch.float32` keeps float32 master copies of bf16/fp16 params."""
    if master_dtype is not None:
        params = cast(params, master_dtype)
    counters = [torch.zeros((), dtype=torch.int64) for _ in range(4)]
    return TrainState(params, optimizer.init(params), *counters, loss_scale.init() if loss_scale else ())


def value_and_grad(fn: Callable[..., torch.Tensor]) -> Callable[..., tuple[torch.Tensor, Any]]:
    """`fn(params, *args, **kwargs) -> scalar` to `(value, grads)` with grads shaped like `params`.

    Differentiates every floating-point leaf of `params` with `torch.autograd.grad` on detached aliases
    (the inputs are neither modified nor given `.grad`); other leaves get None. The value is detached.
    """

    @functools.wraps(fn)
    def wrapped(params, *args, **kwargs):
        leaves, treedef = pytree.tree_flatten(params)
        tracked = [x.detach().requires_grad_() if x.is_floating_point() else x for x in leaves]
        wanted = [x for x in tracked if isinstance(x, torch.Tensor) and x.requires_grad]
        with torch.enable_grad():
            value = fn(pytree.tree_unflatten(tracked, treedef), *args, **kwargs)
        found = iter(torch.autograd.grad(value, wanted, materialize_grads=True))
        grads = [next(found) if isinstance(x, torch.Tensor) and x.requires_grad else None for x in tracked]
        return value.detach(), pytree.tree_unflatten(grads, treedef)

    return wrapped


def global_grad_norm(grads, tp: TensorParallel = SINGLE_DEVICE, sharded_paths: Collection[str] = ()) -> torch.Tensor:
    """L2 norm of the full (unsharded) gradient: leaves at `sharded_paths` are summed over the tp
    ranks, replicated leaves are counted once. float32 0-d, identical on every rank."""
    sharded, replicated = [], []
    for path, g in leaves_with_paths(grads):
        (sharded if path in sharded_paths else replicated).append(g)
    sq = optim.squared_norm(sharded)
    if tp.size > 1:
        sq = tp.all_reduce(sq, "sum")
    return (sq + optim.squared_norm(replicated)).sqrt()


def update_keeps_params_finite(params, updates, tp: TensorParallel = SINGLE_DEVICE) -> torch.Tensor:
    """Whether every element of `params + updates` (summed in each param's dtype, as
    `optim.apply_updates` does) is finite on every tp rank: a 0-d bool tensor, one host sync to read.

    Each leaf's sum is a temporary (one leaf-sized buffer at a time) reduced to its largest magnitude
    (NaN if it holds a NaN); `params` are not modified.
    """
    largest = [torch.linalg.vector_norm(p + u.to(p.dtype), float("inf")).float()
               for p, u in zip(pytree.tree_leaves(params), pytree.tree_leaves(updates), strict=True)]
    bad = (~torch.isfinite(torch.stack(largest)).all()).to(torch.float32)
    return (tp.all_reduce(bad, "max") if tp.size > 1 else bad) == 0


def split_micro_batches(batch: dict, micro_batch_size: int) -> list[dict]:
    """`[N, ...]` tensors to `N / micro_batch_size` dicts of `[micro_batch_size, ...]` views."""
    sizes = {k: v.shape[0] for k, v in batch.items()}
    n = next(iter(sizes.values()))
    if len(set(sizes.values())) != 1 or n % micro_batch_size:
        raise InputError(f"batch sizes {sizes} must be equal and divisible by micro_batch_size={micro_batch_size}")
    return [{k: v[i:i + micro_batch_size] for k, v in batch.items()} for i in range(0, n, micro_batch_size)]


def make_train_step(loss_fn: Callable[[Any, dict], torch.Tensor], optimizer: optim.GradientTransformation, *,
                    micro_batch_size: int, dp: DataParallel = SINGLE_DEVICE, tp: TensorParallel = SINGLE_DEVICE,
                    sharded_paths: Collection[str] = (), max_grad_norm: float | None = None,
                    compute_dtype: torch.dtype | None = None, loss_scale: optim.LossScale | None = None,
                    schedule: optim.Schedule | None = None, max_skipped: int = 10, donate: bool = False):
    """A pure `step(state, batch) -> (state, metrics)`.

    loss_fn: `(params, micro_batch) -> scalar` (e.g. `partial(mf.loss_fn, config=cfg, tp=tp)`).
    batch: this dp rank's samples, `[k * micro_batch_size, T]` per key; k micro-batches accumulate.
    dp / tp: collectives (`all_reduce`); gradients are summed over dp and averaged.
    sharded_paths: paths of TP-sharded leaves, for the global norm (`sharding.match` tells which).
    max_grad_norm: clip as `torch.nn.utils.clip_grad_norm_` (None: no clipping).
    compute_dtype: forward/backward dtype for float32 master `state.params` (None: use them as is).
    loss_scale: fp16 dynamic loss scaling (`optim.dynamic_loss_scale()`); its state lives in `state`.
    schedule: only to report `lr` in the metrics (evaluated at the count of applied updates).
    max_skipped: raise `DivergenceError` after this many refused steps in a row (non-finite loss or
    gradients, or an update that would make a parameter non-finite).
    donate: the step may overwrite the incoming `state`'s params and optimizer moments (JAX's buffer
    donation): same results, ~3 fewer parameter-sized buffers, but the old state must not be reused.
    A refused update keeps the params either way; with `donate` its moments were already advanced.

    metrics: floats `loss`, `grad_norm` (before clipping), `lr` (with `schedule`), `loss_scale`, and
    `skipped` (0/1), `skipped_total`.
    """
    if micro_batch_size <= 0 or max_skipped <= 0:
        raise InputError(f"micro_batch_size={micro_batch_size} and max_skipped={max_skipped} must be positive")
    grad_fn = value_and_grad(lambda params, micro_batch, scale: loss_fn(params, micro_batch) * scale)

    def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        micro = split_micro_batches(batch, micro_batch_size)
        params = cast(state.params, compute_dtype) if compute_dtype is not None else state.params
        n = len(micro) * dp.size  # the loss is the mean of n micro-batch losses (Megatron)
        scale = state.loss_scale.scale if loss_scale else torch.ones(())
        total_loss, acc, treedef = torch.zeros((), dtype=torch.float32), None, None
        for mb in micro:  # gradients of scale * loss_i / n, summed in place (float32)
            value, grads = grad_fn(params, mb, scale / n)
            leaves, treedef = pytree.tree_flatten(grads)
            leaves = [g.float() for g in leaves] if compute_dtype is not None else leaves
            if acc is None:
                acc = leaves
            else:
                torch._foreach_add_(acc, leaves)
            total_loss = total_loss + value.float() / scale
        del grads, leaves
        if dp.size > 1:
            acc = [dp.all_reduce(g, "sum") for g in acc]
            total_loss = dp.all_reduce(total_loss, "sum")
        if loss_scale:
            torch._foreach_div_(acc, scale)
        grads, loss = pytree.tree_unflatten(acc, treedef), total_loss
        del acc
        norm = global_grad_norm(grads, tp, sharded_paths)
        finite = torch.isfinite(norm) & torch.isfinite(loss)
        new_scale = loss_scale.adjust(state.loss_scale, finite) if loss_scale else ()
        metrics = {"loss": float(loss), "grad_norm": float(norm)}
        if schedule is not None:
            metrics["lr"] = float(schedule(state.step - state.skipped_total))
        if loss_scale:
            metrics["loss_scale"] = float(state.loss_scale.scale)
        consumed = state.consumed_samples + len(micro) * micro_batch_size * dp.size
        if not bool(finite):
            return _skipped(state, consumed, new_scale, metrics, max_skipped, "non-finite loss or gradients")
        if max_grad_norm is not None:
            torch._foreach_mul_(pytree.tree_leaves(grads), optim.clip_coefficient(norm, max_grad_norm))
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params, donate=donate)
        del grads
        if not bool(update_keeps_params_finite(state.params, updates, tp)):
            return _skipped(state, consumed, new_scale, metrics, max_skipped, "updates that make parameters non-finite")
        new = TrainState(optim.apply_updates(state.params, updates, donate=donate), opt_state, state.step + 1, consumed,
                         torch.zeros_like(state.skipped_in_row), state.skipped_total, new_scale)
        return new, {**metrics, "skipped": 0, "skipped_total": int(new.skipped_total)}

    return step


def _skipped(state: TrainState, consumed, loss_scale, metrics: dict, max_skipped: int, reason: str):
    """The state and metrics of a refused step (params and optimizer state kept), or `DivergenceError`
    once `max_skipped` steps in a row are refused."""
    in_row = state.skipped_in_row + 1
    if int(in_row) >= max_skipped:
        raise DivergenceError(f"{int(in_row)} consecutive steps refused, the last for {reason} (step "
                              f"{int(state.step) + 1}: loss {metrics['loss']}, grad norm {metrics['grad_norm']})")
    new = state._replace(step=state.step + 1, consumed_samples=consumed, skipped_in_row=in_row,
                         skipped_total=state.skipped_total + 1, loss_scale=loss_scale)
    return new, {**metrics, "skipped": 1, "skipped_total": int(new.skipped_total)}

