"""Functional optimizers in optax's shape: a transformation is an `(init, update)` pair of pure functions.

    opt = chain(clip_by_global_norm(1.0), adamw(warmup_cosine(3e-4, 1000, 10), weight_decay=0.1,
                                                mask=decay_mask))
    state = opt.init(params)
    updates, state = opt.update(grads, state, params)    # new tensors; nothing is modified in place
    params = apply_updates(params, updates)

Trees are the parameter pytree (nested dicts/lists, `torch.utils._pytree`). Per-step math runs on whole
leaf lists with `torch._foreach_*` ops; only freshly allocated results are updated in place. The step
count is an int64 0-d CPU tensor; schedules are tensor functions of it, and the resulting scalars enter
the foreach ops as Python floats (no device synchronisation, as `torch.optim.AdamW`'s default).

Donation (as `jax.jit(donate_argnums=...)`): `update(..., donate=True)` and
`apply_updates(..., donate=True)` may overwrite the incoming updates, state and params instead of
allocating new ones; the results are bit-identical, but the caller must not use the donated values again.
Pure by default; donation saves four parameter-sized float32 buffers per step (new moments, update, params).
`adamw(fused=True)` adds `update_in_place`, one pass of `torch._fused_adamw_` over params, gradients and
moments instead of ~10 foreach passes (measured 10x faster on a 125M model); it updates params and moments
in place, so it is the donating path only (`update` stays pure).

Moments are kept in float32 whatever the parameter dtype. Mixed precision (bf16/fp16 compute weights,
float32 master weights) is the train step's job (`train.make_train_step(compute_dtype=...)`): the
optimizer then sees float32 master params and float32 gradients. `dynamic_loss_scale` is the fp16 helper.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, NamedTuple, Sequence

import torch
from torch.utils import _pytree as pytree

from mistral_fn.errors import ConfigError
from mistral_fn.params import leaves_with_paths, map_with_path

Schedule = Callable[[torch.Tensor], torch.Tensor]


class GradientTransformation(NamedTuple):
    """`init(params) -> state`; `update(updates, state, params=None, *, donate=False) -> (updates, state)`;
    optionally `update_in_place(grads, state, params) -> state`: the same step applied to `params` and the
    state's buffers in place (grads are read only), for a fused kernel."""

    init: Callable[[Any], Any]
    update: Callable[..., tuple[Any, Any]]
    update_in_place: Callable[..., Any] | None = None


class AdamWState(NamedTuple):
    count: torch.Tensor  # int64 0-d: updates applied so far
    mu: Any  # float32 first moments, same tree as params
    nu: Any  # float32 second moments


class SgdState(NamedTuple):
    count: torch.Tensor
    trace: Any  # momentum buffers (float32), or () without momentum


# ---- tree helpers ---------------------------------------------------------------------------------

def _flat(tree) -> tuple[list[torch.Tensor], Any]:
    return pytree.tree_flatten(tree)


def _zeros_f32(tree):
    return pytree.tree_map(lambda p: torch.zeros_like(p, dtype=torch.float32), tree)


def _as_f32(xs: list[torch.Tensor]) -> list[torch.Tensor]:
    return xs if all(x.dtype == torch.float32 for x in xs) else [x.float() for x in xs]


def _like(xs: list[torch.Tensor], refs: list[torch.Tensor]) -> list[torch.Tensor]:
    """`xs` cast to the dtypes of `refs` (no copy where they already agree)."""
    return [x if x.dtype == r.dtype else x.to(r.dtype) for x, r in zip(xs, refs)]


def apply_updates(params, updates, *, donate: bool = False):
    """`params + updates` leaf by leaf, kept in each param's dtype (a new tree; with `donate`, `params`
    updated in place and returned)."""
    p, treedef = _flat(params)
    u, _ = _flat(updates)
    if len(p) != len(u):
        raise ConfigError(f"apply_updates: params have {len(p)} leaves but updates have {len(u)}")
    if donate:
        torch._foreach_add_(p, _like(u, p))
        return params
    return pytree.tree_unflatten(torch._foreach_add(p, _like(u, p)), treedef)


def squared_norm(leaves: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum of squares of all `leaves`, in float32 (0-d)."""
    if not leaves:
        return torch.zeros((), dtype=torch.float32)
    norms = torch._foreach_norm(list(leaves), 2, dtype=torch.float32)
    return torch.stack(norms).pow(2).sum()


def global_norm(tree) -> torch.Tensor:
    """The L2 norm of all leaves together (float32 0-d). Not TP-aware: see `train.global_grad_norm`."""
    return squared_norm(pytree.tree_leaves(tree)).sqrt()


def clip_coefficient(norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """`min(max_norm / (norm + 1e-6), 1)`: the factor of `torch.nn.utils.clip_grad_norm_` and Megatron."""
    return torch.clamp(max_norm / (norm + 1e-6), max=1.0)


def _lr_fn(learning_rate) -> Callable[[torch.Tensor], float]:
    if callable(learning_rate):
        return lambda count: float(learning_rate(count))
    value = float(learning_rate)
    return lambda count: value


def _counter() -> torch.Tensor:
    return torch.zeros((), dtype=torch.int64)


# ---- transformations ------------------------------------------------------------------------------

def adamw(learning_rate, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0,
          mask=None, fused: bool = False) -> GradientTransformation:
    """AdamW as `torch.optim.AdamW`: bias-corrected moments and decoupled decay `p -= lr * wd * p`.

    `learning_rate`: a float or a schedule `count -> lr` evaluated at the number of updates already
    applied (0 for the first). `mask`: None decays every leaf (as torch does); else a tree of bools
    matching params, or a function `params -> tree of bools` (e.g. `decay_mask`). Returns updates in
    each param's dtype; `params` is required when `weight_decay != 0`.

    `fused`: also provide `update_in_place`, `torch._fused_adamw_` (torch.optim.AdamW's `fused=True`
    kernel) when every leaf is float32 on a CPU or CUDA device; otherwise `update` and an in-place add.
    """
    for name, value, lo, hi in (("b1", b1, 0.0, 1.0), ("b2", b2, 0.0, 1.0)):
        if not lo <= value < hi:
            raise ConfigError(f"adamw: {name}={value} must be in [{lo}, {hi})")
    if eps <= 0 or weight_decay < 0:
        raise ConfigError(f"adamw: eps={eps} must be > 0 and weight_decay={weight_decay} >= 0")
    lr_fn = _lr_fn(learning_rate)

    def init(params):
        return AdamWState(_counter(), _zeros_f32(params), _zeros_f32(params))

    def update(grads, state, params=None, *, donate: bool = False):
        g, treedef = _flat(grads)
        g = _as_f32(g)
        lr = lr_fn(state.count)
        count = state.count + 1
        t = int(count)
        mu, nu = _flat(state.mu)[0], _flat(state.nu)[0]
        if donate:
            torch._foreach_lerp_(mu, g, 1.0 - b1)
            torch._foreach_mul_(nu, b2)
        else:
            mu, nu = torch._foreach_lerp(mu, g, 1.0 - b1), torch._foreach_mul(nu, b2)
        torch._foreach_addcmul_(nu, g, g, 1.0 - b2)
        # u = -lr / bc1 * mu / (sqrt(nu) / sqrt(bc2) + eps), built in place (in the donated grads' buffers)
        if donate:  # (`_foreach_sqrt.out` would allocate every result first)
            u = g
            torch._foreach_copy_(u, nu)
            torch._foreach_sqrt_(u)
        else:
            u = torch._foreach_sqrt(nu)
        torch._foreach_div_(u, math.sqrt(1.0 - b2**t))
        torch._foreach_add_(u, eps)
        torch._foreach_reciprocal_(u)
        torch._foreach_mul_(u, mu)
        torch._foreach_mul_(u, -lr / (1.0 - b1**t))
        if weight_decay and params is None:
            raise ConfigError("adamw: weight_decay needs params; call update(grads, state, params)")
        if params is not None:
            p, _ = _flat(params)
            idx = _mask_indices(mask, params, len(p)) if weight_decay else []
            if idx:
                torch._foreach_add_([u[i] for i in idx], _as_f32([p[i] for i in idx]), alpha=-lr * weight_decay)
            u = _like(u, p)
        return (pytree.tree_unflatten(u, treedef),
                AdamWState(count, pytree.tree_unflatten(mu, treedef), pytree.tree_unflatten(nu, treedef)))

    def update_in_place(grads, state, params):
        g, treedef = _flat(grads)
        p, mu, nu = _flat(params)[0], _flat(state.mu)[0], _flat(state.nu)[0]
        if not all(x.dtype == y.dtype == torch.float32 and x.device.type in ("cpu", "cuda")
                   for x, y in zip(p, g, strict=True)):  # the reference math, applied in place
            updates, new_state = update(grads, state, params, donate=True)
            torch._foreach_add_(p, _flat(updates)[0])
            return new_state
        lr, count = lr_fn(state.count), state.count + 1
        steps = {x.device: count.to(x.device, torch.float32) for x in p}
        decayed = set(_mask_indices(mask, params, len(p))) if weight_decay else set()
        for decay, idx in ((weight_decay, sorted(decayed)), (0.0, [i for i in range(len(p)) if i not in decayed])):
            if idx:
                torch._fused_adamw_([p[i] for i in idx], [g[i] for i in idx], [mu[i] for i in idx],
                                    [nu[i] for i in idx], [], [steps[p[i].device] for i in idx], lr=lr, beta1=b1,
                                    beta2=b2, weight_decay=decay, eps=eps, amsgrad=False, maximize=False)
        return AdamWState(count, state.mu, state.nu)

    return GradientTransformation(init, update, update_in_place if fused else None)


def sgd(learning_rate, momentum: float = 0.0, nesterov: bool = False) -> GradientTransformation:
    """SGD as `torch.optim.SGD` (dampening 0): `buf = momentum * buf + g`; step `-lr * buf`
    (`-lr * (g + momentum * buf)` with `nesterov`)."""
    if momentum < 0 or (nesterov and momentum == 0):
        raise ConfigError(f"sgd: momentum={momentum} must be >= 0, and > 0 with nesterov")
    lr_fn = _lr_fn(learning_rate)

    def init(params):
        return SgdState(_counter(), _zeros_f32(params) if momentum else ())

    def update(grads, state, params=None, *, donate: bool = False):
        g, treedef = _flat(grads)
        g = _as_f32(g)
        trace = ()
        if momentum:
            buf = _flat(state.trace)[0]
            if donate:
                torch._foreach_mul_(buf, momentum)
            else:
                buf = torch._foreach_mul(buf, momentum)
            torch._foreach_add_(buf, g)
            trace = pytree.tree_unflatten(buf, treedef)
            g = torch._foreach_add(g, buf, alpha=momentum) if nesterov else buf
        u = torch._foreach_mul(g, -lr_fn(state.count))
        if params is not None:
            u = _like(u, _flat(params)[0])
        return pytree.tree_unflatten(u, treedef), SgdState(state.count + 1, trace)

    return GradientTransformation(init, update)


def clip_by_global_norm(max_norm: float,
                        norm_fn: Callable[[Any], torch.Tensor] = global_norm) -> GradientTransformation:
    """Scale updates by `clip_coefficient(norm_fn(updates), max_norm)`. Stateless (state `()`).

    `norm_fn` defaults to the single-process `global_norm`; under TP pass a reducing one."""
    if max_norm <= 0:
        raise ConfigError(f"clip_by_global_norm: max_norm={max_norm} must be > 0")

    def update(updates, state, params=None, *, donate: bool = False):
        leaves, treedef = _flat(updates)
        coef = clip_coefficient(norm_fn(updates), max_norm)
        if donate:
            torch._foreach_mul_(leaves, coef)
            return updates, state
        return pytree.tree_unflatten(torch._foreach_mul(leaves, coef), treedef), state

    return GradientTransformation(lambda params: (), update)


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Apply `transforms` in order; the state is the tuple of their states."""

    def init(params):
        return tuple(t.init(params) for t in transforms)

    def update(updates, state, params=None, *, donate: bool = False):
        new_state = []
        for t, s in zip(transforms, state):
            updates, s = t.update(updates, s, params, donate=donate)
            new_state.append(s)
        return updates, tuple(new_state)

    return GradientTransformation(init, update)


# ---- weight-decay masks ---------------------------------------------------------------------------

# Megatron/ModelLink exempt 1-D parameters and biases from decay; in our tree that is the RMSNorm
# weights. The embedding and the output head are 2-D and ARE decayed, as in the recipe.
NO_DECAY = (r"(^|/)(\w+_)?norm$",)


def decay_mask(params, no_decay: Sequence[str] = NO_DECAY):
    """Tree of bools: True where a leaf's path matches none of the `no_decay` regexes (`re.search`).

    Add `r"^embed$"` to also spare the embedding table."""
    patterns = [re.compile(p) for p in no_decay]
    return map_with_path(lambda path, _: not any(p.search(path) for p in patterns), params)


def _mask_indices(mask, params, n: int) -> list[int]:
    if mask is None:
        return list(range(n))
    tree = mask(params) if callable(mask) else mask
    flags = leaves_with_paths(tree)
    paths = [p for p, _ in leaves_with_paths(params)]
    if [p for p, _ in flags] != paths:
        missing = sorted(set(paths) ^ {p for p, _ in flags})
        raise ConfigError(f"weight-decay mask does not match params (first differing path: "
                          f"{missing[0] if missing else 'order'})")
    return [i for i, (_, on) in enumerate(flags) if on]


# ---- schedules (Megatron's OptimizerParamScheduler, counted in iterations) ------------------------

def warmup_decay(peak_lr: float, decay_steps: int, warmup_steps: float = 0.0, min_lr: float = 0.0,
                 style: str = "cosine") -> Schedule:
    """Linear warmup from 0 to `peak_lr` over `warmup_steps`, then `style` decay to `min_lr` at
    `decay_steps`, `min_lr` after. At step s (updates already applied):

        s <= warmup:  peak * s / warmup                   (s = 0 gives 0, as Megatron)
        s > decay:    min_lr                              ("constant" stays at peak)
        else r = (s - warmup) / (decay - warmup):
            cosine   min + (peak - min) * (1 + cos(pi r)) / 2
            linear   min + (peak - min) * (1 - r)
            constant peak

    Megatron's `--lr-warmup-fraction f` is `warmup_steps = f * lr_decay_iters`.
    """
    if style not in ("cosine", "linear", "constant"):
        raise ConfigError(f"lr decay style {style!r} is not supported; use cosine, linear or constant")
    if not 0 <= min_lr <= peak_lr:
        raise ConfigError(f"min_lr={min_lr} must be in [0, lr={peak_lr}]")
    if warmup_steps < 0 or (style != "constant" and decay_steps <= warmup_steps):
        raise ConfigError(f"lr decay steps ({decay_steps}) must exceed warmup steps ({warmup_steps})")

    def schedule(count: torch.Tensor) -> torch.Tensor:
        s = count.double()
        if style == "constant":
            decayed = torch.full_like(s, peak_lr)
        else:
            r = ((s - warmup_steps) / (decay_steps - warmup_steps)).clamp(0.0, 1.0)
            coeff = 0.5 * (torch.cos(math.pi * r) + 1.0) if style == "cosine" else 1.0 - r
            decayed = torch.where(s > decay_steps, torch.full_like(s, min_lr), min_lr + coeff * (peak_lr - min_lr))
        if warmup_steps > 0:
            decayed = torch.where(s <= warmup_steps, peak_lr * s / warmup_steps, decayed)
        return decayed

    return schedule


def warmup_cosine(peak_lr: float, decay_steps: int, warmup_steps: float = 0.0, min_lr: float = 0.0) -> Schedule:
    return warmup_decay(peak_lr, decay_steps, warmup_steps, min_lr, "cosine")


def warmup_linear(peak_lr: float, decay_steps: int, warmup_steps: float = 0.0, min_lr: float = 0.0) -> Schedule:
    return warmup_decay(peak_lr, decay_steps, warmup_steps, min_lr, "linear")


# ---- fp16 dynamic loss scaling (Megatron's DynamicGradScaler without hysteresis) ---------------------

class LossScaleState(NamedTuple):
    scale: torch.Tensor  # float32 0-d
    good_steps: torch.Tensor  # int64 0-d: consecutive finite steps since the last change


class LossScale(NamedTuple):
    init: Callable[[], LossScaleState]
    adjust: Callable[[LossScaleState, torch.Tensor], LossScaleState]


def dynamic_loss_scale(initial: float = 2.0**16, growth_interval: int = 1000, factor: float = 2.0,
                       min_scale: float = 1.0) -> LossScale:
    """`adjust(state, finite)`: divide by `factor` (not below `min_scale`) on a non-finite step;
    multiply by `factor` after `growth_interval` finite steps in a row."""

    def init():
        return LossScaleState(torch.tensor(float(initial)), torch.zeros((), dtype=torch.int64))

    def adjust(state: LossScaleState, finite: torch.Tensor) -> LossScaleState:
        good = torch.where(finite, state.good_steps + 1, torch.zeros_like(state.good_steps))
        grow = good >= growth_interval
        scale = torch.where(finite, torch.where(grow, state.scale * factor, state.scale),
                            (state.scale / factor).clamp_min(min_scale))
        return LossScaleState(scale, torch.where(grow, torch.zeros_like(good), good))

    return LossScale(init, adjust)
