"""mistral_fn.optim against torch.optim.AdamW / SGD and clip_grad_norm_, schedules by hand, purity."""

import math

import pytest
import torch
from torch.utils import _pytree as pytree

from mistral_fn import optim
from mistral_fn.errors import ConfigError
from mistral_fn.params import leaves_with_paths

STEPS = 6


def small_tree(seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return {"embed": r(8, 4), "layers": [{"attn_norm": r(4) + 1, "w": r(6, 4)} for _ in range(2)],
            "norm": r(4) + 1, "output": r(8, 4)}


def grad_trees(n, seed=1):
    return [pytree.tree_map(lambda x: x * (k + 1), small_tree(seed + k)) for k in range(n)]


def run_ours(opt, params, grads):
    state = opt.init(params)
    for g in grads:
        updates, state = opt.update(g, state, params)
        params = optim.apply_updates(params, updates)
    return params


def run_torch(params, grads, groups, make_opt, lr_at=None, clip=None):
    """`groups`: list of (path predicate, extra group options)."""
    named = {p: leaf.clone().requires_grad_() for p, leaf in leaves_with_paths(params)}
    param_groups = [{"params": [t for p, t in named.items() if pred(p)], **extra} for pred, extra in groups]
    opt = make_opt(param_groups)
    for step, g in enumerate(grads):
        for p, leaf in leaves_with_paths(g):
            named[p].grad = leaf.clone()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(list(named.values()), clip)
        if lr_at is not None:
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
        opt.step()
    return {p: t.detach() for p, t in named.items()}


def max_rel_diff(ours, ref):
    return max(((a - ref[p]).abs().max() / ref[p].abs().max()).item() for p, a in leaves_with_paths(ours))


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adamw_matches_torch(weight_decay):
    params, grads = small_tree(), grad_trees(STEPS)
    ours = run_ours(optim.adamw(1e-2, b1=0.9, b2=0.95, eps=1e-8, weight_decay=weight_decay), params, grads)
    ref = run_torch(params, grads, [(lambda p: True, {})],
                    lambda g: torch.optim.AdamW(g, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=weight_decay))
    assert max_rel_diff(ours, ref) < 1e-6


def test_adamw_mask_equals_two_param_groups_with_schedule_and_clipping():
    params, grads = small_tree(), grad_trees(STEPS)
    sched = optim.warmup_cosine(1e-2, decay_steps=STEPS, warmup_steps=2, min_lr=1e-3)
    opt = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(sched, b2=0.95, weight_decay=0.1,
                                                                   mask=optim.decay_mask))
    ours = run_ours(opt, params, grads)
    no_decay = lambda p: p.endswith("norm")  # noqa: E731
    ref = run_torch(params, grads, [(lambda p: not no_decay(p), {}), (no_decay, {"weight_decay": 0.0})],
                    lambda g: torch.optim.AdamW(g, lr=0.0, betas=(0.9, 0.95), weight_decay=0.1),
                    lr_at=lambda s: float(sched(torch.tensor(s))), clip=1.0)
    assert max_rel_diff(ours, ref) < 1e-6
    # The mask matters: decaying everything moves the norms away from the reference.
    everything = run_ours(optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(sched, b2=0.95, weight_decay=0.1)),
                          params, grads)
    assert (everything["norm"] - ref["norm"]).abs().max() > 1e-5


def run_in_place(opt, params, grads):
    params = pytree.tree_map(torch.clone, params)
    state = opt.init(params)
    for g in grads:
        state = opt.update_in_place(g, state, params)
    return params, state


def test_fused_adamw_in_place_matches_torch_with_mask_and_schedule():
    """`adamw(fused=True).update_in_place` (torch._fused_adamw_) against torch.optim.AdamW's default
    implementation, two param groups (norms not decayed) and a per-step learning rate."""
    params, grads = small_tree(), grad_trees(STEPS)
    sched = optim.warmup_cosine(1e-2, decay_steps=STEPS, warmup_steps=2, min_lr=1e-3)
    fused = optim.adamw(sched, b2=0.95, weight_decay=0.1, mask=optim.decay_mask, fused=True)
    ours, state = run_in_place(fused, params, grads)
    no_decay = lambda p: p.endswith("norm")  # noqa: E731
    ref = run_torch(params, grads, [(lambda p: not no_decay(p), {}), (no_decay, {"weight_decay": 0.0})],
                    lambda g: torch.optim.AdamW(g, lr=0.0, betas=(0.9, 0.95), weight_decay=0.1),
                    lr_at=lambda s: float(sched(torch.tensor(s))))
    assert max_rel_diff(ours, ref) < 1e-6 and int(state.count) == STEPS
    pure = run_ours(fused, params, grads)  # `update` of the fused transformation is the foreach reference
    assert max_rel_diff(pure, ref) < 1e-6
    everything, _ = run_in_place(optim.adamw(sched, b2=0.95, weight_decay=0.1, fused=True), params, grads)
    assert (everything["norm"] - ref["norm"]).abs().max() > 1e-5  # the mask reaches the fused kernel
    assert optim.adamw(1e-3).update_in_place is None


def test_fused_adamw_in_place_on_bf16_params_takes_the_reference_math():
    params = pytree.tree_map(lambda x: x.bfloat16(), small_tree())
    grads = [pytree.tree_map(lambda x: x.bfloat16(), g) for g in grad_trees(3)]
    opt = optim.adamw(1e-2, weight_decay=0.1, fused=True)
    in_place, _ = run_in_place(opt, params, grads)
    assert all(torch.equal(a, b) for a, b in zip(pytree.tree_leaves(in_place),
                                                  pytree.tree_leaves(run_ours(opt, params, grads)), strict=True))


def test_adamw_bf16_params_keep_float32_moments():
    params = pytree.tree_map(lambda x: x.bfloat16(), small_tree())
    state = optim.adamw(1e-3).init(params)
    assert all(m.dtype == torch.float32 for m in pytree.tree_leaves(state.mu))
    updates, _ = optim.adamw(1e-3).update(pytree.tree_map(torch.ones_like, params), state, params)
    assert all(u.dtype == torch.bfloat16 for u in pytree.tree_leaves(updates))


def test_sgd_momentum_matches_torch():
    params, grads = small_tree(), grad_trees(STEPS)
    for nesterov in (False, True):
        ours = run_ours(optim.sgd(0.05, momentum=0.9, nesterov=nesterov), params, grads)
        ref = run_torch(params, grads, [(lambda p: True, {})],
                        lambda g: torch.optim.SGD(g, lr=0.05, momentum=0.9, nesterov=nesterov))
        assert max_rel_diff(ours, ref) < 1e-6


def test_clip_by_global_norm():
    grads = {"a": torch.tensor([3.0, 0.0]), "b": [torch.tensor([[4.0]])]}  # norm 5
    clipped, _ = optim.clip_by_global_norm(1.0).update(grads, (), None)
    assert torch.allclose(clipped["a"], torch.tensor([3.0, 0.0]) / (5 + 1e-6))
    assert torch.allclose(optim.global_norm(clipped), torch.tensor(1.0), atol=1e-6)
    same, _ = optim.clip_by_global_norm(10.0).update(grads, (), None)
    assert torch.equal(same["a"], grads["a"]) and torch.equal(same["b"][0], grads["b"][0])
    with pytest.raises(ConfigError):
        optim.clip_by_global_norm(0.0)


def test_chain_applies_in_order_and_keeps_states():
    grads = {"a": torch.tensor([30.0, 40.0])}
    opt = optim.chain(optim.clip_by_global_norm(5.0), optim.sgd(1.0))
    state = opt.init(grads)
    assert isinstance(state, tuple) and len(state) == 2 and int(state[1].count) == 0
    updates, state = opt.update(grads, state, grads)
    assert torch.allclose(updates["a"], -torch.tensor([3.0, 4.0]), atol=1e-5)
    assert int(state[1].count) == 1
    reversed_opt = optim.chain(optim.sgd(1.0), optim.clip_by_global_norm(5.0))
    updates2, _ = reversed_opt.update(grads, reversed_opt.init(grads), grads)
    assert torch.allclose(updates2["a"], -torch.tensor([3.0, 4.0]), atol=1e-5)


def test_purity_inputs_unchanged():
    params, grads = small_tree(), grad_trees(1)[0]
    opt = optim.chain(optim.clip_by_global_norm(0.1), optim.adamw(1e-2, weight_decay=0.1, mask=optim.decay_mask))
    state = opt.init(params)
    snapshot = [x.clone() for x in pytree.tree_leaves((params, grads, state))]
    updates, new_state = opt.update(grads, state, params)
    new_params = optim.apply_updates(params, updates)
    for before, after in zip(snapshot, pytree.tree_leaves((params, grads, state))):
        assert torch.equal(before, after)
    assert not torch.equal(new_params["embed"], params["embed"])
    assert int(new_state[1].count) == 1 and int(state[1].count) == 0


def test_decay_mask_spares_norms_only():
    mask = dict(leaves_with_paths(optim.decay_mask(small_tree())))
    assert mask == {"embed": True, "layers/0/attn_norm": False, "layers/0/w": True, "layers/1/attn_norm": False,
                    "layers/1/w": True, "norm": False, "output": True}
    bad = {"embed": True}
    with pytest.raises(ConfigError, match="mask does not match"):
        optim.adamw(1e-3, weight_decay=0.1, mask=bad).update(small_tree(), optim.adamw(1e-3).init(small_tree()),
                                                             small_tree())


def test_schedules_hand_checked():
    lr = lambda s, f: float(f(torch.tensor(s)))  # noqa: E731
    cos = optim.warmup_cosine(1.0, decay_steps=110, warmup_steps=10, min_lr=0.1)
    assert lr(0, cos) == 0.0 and lr(5, cos) == 0.5 and lr(10, cos) == 1.0
    assert lr(60, cos) == pytest.approx(0.1 + 0.9 * 0.5)        # half way: cos(pi/2) = 0
    assert lr(35, cos) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lr(110, cos) == pytest.approx(0.1) and lr(500, cos) == 0.1
    lin = optim.warmup_linear(2.0, decay_steps=100, warmup_steps=0, min_lr=0.0)
    assert lr(0, lin) == 2.0 and lr(25, lin) == pytest.approx(1.5) and lr(100, lin) == 0.0
    # Megatron's --lr-warmup-fraction 0.01 of 1000 iterations: 10 warmup steps, fractional allowed.
    frac = optim.warmup_decay(1.0, 1000, warmup_steps=0.01 * 250, style="constant")
    assert lr(1, frac) == pytest.approx(0.4) and lr(3, frac) == 1.0 and lr(5000, frac) == 1.0
    with pytest.raises(ConfigError):
        optim.warmup_decay(1.0, 10, warmup_steps=10)
    with pytest.raises(ConfigError):
        optim.warmup_decay(1.0, 10, style="exponential")


def test_dynamic_loss_scale():
    ls = optim.dynamic_loss_scale(initial=8.0, growth_interval=2, min_scale=2.0)
    s = ls.init()
    s = ls.adjust(s, torch.tensor(False))
    assert float(s.scale) == 4.0
    s = ls.adjust(ls.adjust(s, torch.tensor(False)), torch.tensor(False))
    assert float(s.scale) == 2.0  # floored at min_scale
    s = ls.adjust(ls.adjust(s, torch.tensor(True)), torch.tensor(True))
    assert float(s.scale) == 4.0 and int(s.good_steps) == 0


def test_donation_gives_identical_results_and_reuses_buffers():
    params, grads = small_tree(), grad_trees(3)
    for opt in (optim.chain(optim.clip_by_global_norm(0.5), optim.adamw(1e-2, weight_decay=0.1)),
                optim.sgd(0.1, momentum=0.9)):
        pure = run_ours(opt, params, grads)
        p, state = pytree.tree_map(torch.clone, params), opt.init(params)
        for g in grads:
            before = p["embed"]
            updates, state = opt.update(pytree.tree_map(torch.clone, g), state, p, donate=True)
            p = optim.apply_updates(p, updates, donate=True)
            assert p["embed"] is before  # updated in place
        assert all(torch.equal(a, b) for a, b in zip(pytree.tree_leaves(p), pytree.tree_leaves(pure)))
