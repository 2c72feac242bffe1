"""The training step as a pure function: `step(state, batch) -> (new_state, metrics)`.

    step = make_train_step(partial(mf.loss_fn, config=cfg, recompute=True, chunk_size=4096),
                           optim.adamw(schedule, b2=0.95, weight_decay=0.1, mask=optim.decay_mask),
                           micro_batch_size=1, max_grad_norm=1.0, compute_dtype=torch.bfloat16)
    state = init_train_state(params, optimizer, master_dtype=torch.float32)
    state, metrics = step(state, batch)        # batch: this dp rank's [n_micro * micro_batch_size, T]

One step = gradient accumulation over micro-batches (float32), data-parallel reduction, the global
gradient norm (TP-aware), a non-finite check (skip, count, stop after `max_skipped` in a row),
clipping, the optimizer update, and a second check that refuses (skips, counts) an update that would
make any parameter non-finite. The loss follows Megatron: each micro-batch's masked mean, averaged
over micro-batches and dp ranks.

Over dp > 1, gradients are summed into flat float32 buckets (`zero.GradReducer`) and reduced one bucket
at a time; `overlap_grad_reduce` starts each bucket's collective from a gradient hook during the last
backward. `distributed_optimizer` (ZeRO-1, Megatron's `--use-distributed-optimizer`) reduce-scatters
the buckets instead: each dp rank keeps only its blocks of the float32 master weights and moments
(`zero.blocks`; the state's `master` and `opt_state` hold them), updates them, and all-gathers the
result into the full params, which it keeps in `compute_dtype`:

    state = init_train_state(params, opt, master_dtype=torch.float32, dp=mesh.dp, distributed_optimizer=True,
                             compute_dtype=torch.bfloat16)
    step = make_train_step(loss, opt, micro_batch_size=1, dp=mesh.dp, compute_dtype=torch.bfloat16,
                           distributed_optimizer=True, overlap_grad_reduce=True)

Gradients come from `value_and_grad`, built on `torch.autograd.grad` over detached leaves: measured
against `torch.func.grad_and_value` (`benchmarks/bench_grad_mechanisms.py`) it takes the same time and
about half the peak memory, and only under it does per-layer recomputation (`loss_fn(recompute=True)`,
`remat.checkpoint`, which also runs under torch.func) lower the peak further.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Collection, NamedTuple

import torch
from torch.utils import _pytree as pytree

from mistral_fn import optim, zero
from mistral_fn.errors import DivergenceError, InputError
from mistral_fn.params import cast, leaves_with_paths
from mistral_fn.parallel import SINGLE_DEVICE, DataParallel, TensorParallel


class TrainState(NamedTuple):
    """Everything a step reads and returns. `params` are float32 master weights in mixed precision, except
    with the distributed optimizer: then `params` are the full compute weights and `master` this dp rank's
    1-D blocks of the float32 master weights (`()` when `params` are float32 themselves); `opt_state`
    then holds blocks too."""

    params: Any
    opt_state: Any
    step: torch.Tensor  # int64: iterations run, skipped ones included
    consumed_samples: torch.Tensor  # int64: samples consumed over all dp ranks
    skipped_in_row: torch.Tensor  # int64: consecutive non-finite steps
    skipped_total: torch.Tensor  # int64
    loss_scale: Any  # optim.LossScaleState, or () without loss scaling
    master: Any = ()  # distributed optimizer: this rank's blocks of the master weights (same paths as params)


def init_train_state(params, optimizer: optim.GradientTransformation, *, master_dtype: torch.dtype | None = None,
                     loss_scale: optim.LossScale | None = None, dp: DataParallel = SINGLE_DEVICE,
                     distributed_optimizer: bool = False, compute_dtype: torch.dtype | None = None) -> TrainState:
    """A fresh state. `master_dtype=torch.float32` keeps float32 master copies of bf16/fp16 params.

    `distributed_optimizer`: the master weights and the optimizer state are this `dp` rank's blocks
    (`zero.blocks`); the full params are kept in `compute_dtype` (default: the master dtype).
    """
    if master_dtype is not None:
        params = cast(params, master_dtype)
    counters = [torch.zeros((), dtype=torch.int64) for _ in range(4)]
    scale_state = loss_scale.init() if loss_scale else ()
    if not distributed_optimizer:
        if compute_dtype is not None:
            raise InputError("init_train_state: compute_dtype only applies with distributed_optimizer=True")
        return TrainState(params, optimizer.init(params), *counters, scale_state)
    leaves, treedef = pytree.tree_flatten(params)
    master = pytree.tree_unflatten([x.clone() for x in zero.blocks(leaves, dp.rank, dp.size)], treedef)
    compute = cast(params, compute_dtype) if compute_dtype is not None else params
    separate = any(a.dtype != b.dtype for a, b in zip(pytree.tree_leaves(compute), leaves, strict=True))
    return TrainState(compute, optimizer.init(master), *counters, scale_state, master if separate else ())


def value_and_grad(fn: Callable[..., torch.Tensor], *, on_grad: Callable[[int, torch.Tensor], None] | None = None
                   ) -> Callable[..., tuple[torch.Tensor, Any]]:
    """`fn(params, *args, **kwargs) -> scalar` to `(value, grads)` with grads shaped like `params`.

    Differentiates every floating-point leaf of `params` with `torch.autograd.grad` on detached aliases
    (the inputs are neither modified nor given `.grad`); other leaves get None. The value is detached.
    `on_grad(i, grad)` is called during backward as soon as the gradient of leaf `i` (its index in
    `tree_leaves(params)`) is complete, e.g. to start its reduction while backward goes on.
    """

    @functools.wraps(fn)
    def wrapped(params, *args, **kwargs):
        leaves, treedef = pytree.tree_flatten(params)
        tracked = [x.detach().requires_grad_() if x.is_floating_point() else x for x in leaves]
        wanted = [x for x in tracked if isinstance(x, torch.Tensor) and x.requires_grad]
        if on_grad is not None:
            for i, x in enumerate(tracked):
                if isinstance(x, torch.Tensor) and x.requires_grad:
                    x.register_hook(functools.partial(_call_hook, on_grad, i))
        with torch.enable_grad():
            value = fn(pytree.tree_unflatten(tracked, treedef), *args, **kwargs)
        found = iter(torch.autograd.grad(value, wanted, materialize_grads=True))
        grads = [next(found) if isinstance(x, torch.Tensor) and x.requires_grad else None for x in tracked]
        return value.detach(), pytree.tree_unflatten(grads, treedef)

    return wrapped


def _call_hook(on_grad, i, grad):
    on_grad(i, grad)


def global_grad_norm(grads, tp: TensorParallel = SINGLE_DEVICE, sharded_paths: Collection[str] = (),
                     dp: DataParallel = SINGLE_DEVICE) -> torch.Tensor:
    """L2 norm of the full (unsharded) gradient: leaves at `sharded_paths` are summed over the tp
    ranks, replicated leaves are counted once. `dp`: the group the gradient is partitioned over (ZeRO-1:
    `grads` are this rank's blocks), whose ranks' parts are summed. float32 0-d, identical on every rank."""
    sharded, replicated = [], []
    for path, g in leaves_with_paths(grads):
        (sharded if path in sharded_paths else replicated).append(g)
    sq = torch.stack([optim.squared_norm(sharded), optim.squared_norm(replicated)])
    if dp.size > 1:
        sq = dp.all_reduce(sq, "sum")
    if tp.size > 1:
        sq[0] = tp.all_reduce(sq[0], "sum")
    return sq.sum().sqrt()


def all_finite(leaves, tp: TensorParallel = SINGLE_DEVICE, dp: DataParallel = SINGLE_DEVICE) -> torch.Tensor:
    """Whether every element of `leaves` is finite on every tp rank, and every `dp` rank when they are
    partitioned over it (ZeRO-1 blocks): a 0-d bool tensor, one host sync to read. Each leaf costs one
    `aminmax` pass (NaN propagates into both, ±inf into one)."""
    ends = [torch.stack(torch.aminmax(x)).float() for x in leaves if x.numel()]
    bad = (~torch.isfinite(torch.cat(ends)).all() if ends else torch.tensor(False)).to(torch.float32)
    for group in (tp, dp):
        bad = group.all_reduce(bad, "max") if group.size > 1 else bad
    return bad == 0


def apply_if_finite(params, updates, *, donate: bool, tp: TensorParallel = SINGLE_DEVICE,
                    dp: DataParallel = SINGLE_DEVICE) -> tuple[list[torch.Tensor], torch.Tensor]:
    """`(params + updates, all_finite(...))` as leaf lists, summed in each param's dtype as
    `optim.apply_updates` does; `params` are not modified. With `donate` the sums are written into the
    update buffers (`u + p` is `p + u` bit for bit), so refusing a non-finite result costs no copy."""
    p = pytree.tree_leaves(params)
    u = [x.to(y.dtype) for x, y in zip(pytree.tree_leaves(updates), p, strict=True)]
    if donate:
        torch._foreach_add_(u, p)
        new = u
    else:
        new = torch._foreach_add(p, u)
    return new, all_finite(new, tp, dp)


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
                    schedule: optim.Schedule | None = None, max_skipped: int = 10, donate: bool = False,
                    distributed_optimizer: bool = False, overlap_grad_reduce: bool = False,
                    bucket_size: int = zero.BUCKET_SIZE, compile: bool = False):
    """A pure `step(state, batch) -> (state, metrics)`.

    loss_fn: `(params, micro_batch) -> scalar` (e.g. `partial(mf.loss_fn, config=cfg, tp=tp)`).
    batch: this dp rank's samples, `[k * micro_batch_size, T]` per key; k micro-batches accumulate.
    dp / tp: collectives (`parallel.DataParallel` / `TensorParallel`); gradients are summed over dp and averaged.
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
    distributed_optimizer: ZeRO-1 over dp (the state from `init_train_state(distributed_optimizer=True)`).
    overlap_grad_reduce: start each gradient bucket's reduction during the last backward (dp > 1).
    bucket_size: elements per gradient bucket (`zero.BUCKET_SIZE`).
    compile: run `loss_fn` through `torch.compile`, so forward and backward are each one compiled graph
    (AOTAutograd; inductor fuses the elementwise ops and picks what to store for backward). The update is
    already one kernel per leaf group with `optim.adamw(fused=True)`; the checks between them read host values.

    metrics: floats `loss`, `grad_norm` (before clipping), `lr` (with `schedule`), `loss_scale`, and
    `skipped` (0/1), `skipped_total`.
    """
    if micro_batch_size <= 0 or max_skipped <= 0:
        raise InputError(f"micro_batch_size={micro_batch_size} and max_skipped={max_skipped} must be positive")
    reduce_in_buckets = dp.size > 1 or distributed_optimizer
    if compile:
        loss_fn = torch.compile(loss_fn)

    def scaled_loss(params, micro_batch, scale):
        return loss_fn(params, micro_batch) * scale

    def gradients(params, micro: list[dict], scale: torch.Tensor, n: int):
        """`(leaves, loss)`: float32 gradients of `scale * loss_i / n` summed over the micro-batches and over
        dp (ZeRO-1: this rank's blocks), and the sum of the micro-batch losses on this rank."""
        reducer = zero.GradReducer(pytree.tree_leaves(params), dp, distributed_optimizer, bucket_size) \
            if reduce_in_buckets else None
        total_loss, acc = torch.zeros((), dtype=torch.float32), None
        for k, mb in enumerate(micro):
            overlap = reducer is not None and overlap_grad_reduce and k == len(micro) - 1
            value, grads = value_and_grad(scaled_loss, on_grad=reducer.hook if overlap else None)(params, mb, scale / n)
            leaves = pytree.tree_leaves(grads)
            total_loss = total_loss + value.float() / scale
            if overlap:
                acc = reducer.finish(leaves)
            elif reducer is not None:
                reducer.add(leaves)
            elif acc is None:
                acc = [g.float() for g in leaves] if compute_dtype is not None else leaves
            else:
                torch._foreach_add_(acc, leaves)
            del grads, leaves
        if reducer is not None and acc is None:
            acc = reducer.finish()
        return acc, total_loss

    def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        micro = split_micro_batches(batch, micro_batch_size)
        params = cast(state.params, compute_dtype) if compute_dtype is not None else state.params
        n = len(micro) * dp.size  # the loss is the mean of n micro-batch losses (Megatron)
        scale = state.loss_scale.scale if loss_scale else torch.ones(())
        acc, loss = gradients(params, micro, scale, n)
        del params
        if dp.size > 1:
            loss = dp.all_reduce(loss, "sum")
        if loss_scale:
            torch._foreach_div_(acc, scale)
        param_leaves, treedef = pytree.tree_flatten(state.params)
        grads = pytree.tree_unflatten(acc, treedef)
        del acc
        norm = global_grad_norm(grads, tp, sharded_paths, dp if distributed_optimizer else SINGLE_DEVICE)
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
        separate_master = bool(pytree.tree_leaves(state.master))
        if not distributed_optimizer:
            masters = state.params
        elif separate_master:
            masters = state.master
        else:  # float32 params: this rank's blocks are views of them
            masters = pytree.tree_unflatten(zero.blocks(param_leaves, dp.rank, dp.size), treedef)
        group = dp if distributed_optimizer else SINGLE_DEVICE
        if donate and optimizer.update_in_place is not None:
            opt_state = optimizer.update_in_place(grads, state.opt_state, masters)
            if not bool(all_finite(pytree.tree_leaves(masters), tp, group)):
                raise DivergenceError(f"step {int(state.step) + 1}: the fused optimizer made parameters non-finite in "
                                      "place (it cannot refuse the update as the unfused one does); lower the learning "
                                      "rate or resume from the last checkpoint")
        else:
            updates, opt_state = optimizer.update(grads, state.opt_state, masters, donate=donate)
            new_leaves, finite = apply_if_finite(masters, updates, donate=donate, tp=tp, dp=group)
            if not bool(finite):
                return _skipped(state, consumed, new_scale, metrics, max_skipped,
                                "updates that make parameters non-finite")
            masters = pytree.tree_unflatten(new_leaves, treedef)
        del grads
        params, master = masters, ()
        if distributed_optimizer:
            full = zero.gather_blocks(pytree.tree_leaves(masters), [x.shape for x in param_leaves], dp,
                                      [x.dtype for x in param_leaves], bucket_size)
            params, master = pytree.tree_unflatten(full, treedef), masters if separate_master else ()
        new = TrainState(params, opt_state, state.step + 1, consumed, torch.zeros_like(state.skipped_in_row),
                         state.skipped_total, new_scale, master)
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
