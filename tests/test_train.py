"""The composed train step: accumulation, recomputation, non-finite handling, TP norm, parity with HF."""

import functools
import math
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.utils import _pytree as pytree

import mistral_fn as mf
from mistral_fn import optim, train
from mistral_fn.params import leaves_with_paths
from checkpoints.hf import hf_names
from tests.hf_reference import hf_model

CFG = mf.MistralConfig(vocab_size=256, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64)


def make_batch(n, seq=16, seed=0, ragged_mask=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, CFG.vocab_size, (n, seq + 1), generator=g)
    mask = (torch.rand(n, seq, generator=g) > 0.3).long() if ragged_mask else torch.ones(n, seq, dtype=torch.long)
    return {"tokens": x[:, :-1], "labels": x[:, 1:], "loss_mask": mask}


def loss(**kw):
    return functools.partial(mf.loss_fn, config=CFG, **kw)


def max_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(pytree.tree_leaves(a), pytree.tree_leaves(b)))


def test_grad_accumulation_equals_one_big_batch():
    params, batch = mf.init_params(CFG, seed=0), make_batch(4)
    opt = optim.sgd(0.5)
    results = {}
    for mbs in (1, 2, 4):
        step = train.make_train_step(loss(), opt, micro_batch_size=mbs)
        state, metrics = step(train.init_train_state(params, opt), batch)
        results[mbs] = (state, metrics)
    for mbs in (1, 2):
        assert max_diff(results[mbs][0].params, results[4][0].params) < 1e-6
        assert results[mbs][1]["loss"] == pytest.approx(results[4][1]["loss"], rel=1e-6)
        assert int(results[mbs][0].consumed_samples) == 4
    assert max_diff(results[1][0].params, params) > 1e-3  # the step did move the weights


def test_accumulation_averages_micro_batch_means_as_megatron():
    params, batch = mf.init_params(CFG, seed=0), make_batch(2, ragged_mask=True)
    step = train.make_train_step(loss(), optim.sgd(0.0), micro_batch_size=1)
    _, metrics = step(train.init_train_state(params, optim.sgd(0.0)), batch)
    halves = [float(mf.loss_fn(params, {k: v[i:i + 1] for k, v in batch.items()}, CFG)) for i in range(2)]
    assert metrics["loss"] == pytest.approx(sum(halves) / 2, rel=1e-6)


@pytest.mark.parametrize("kw", [dict(recompute=True), dict(chunk_size=5), dict(recompute=True, chunk_size=8)])
def test_recompute_and_chunked_loss_give_same_value_and_grads(kw):
    params, batch = mf.init_params(CFG, seed=0), make_batch(2, ragged_mask=True)
    ref_loss, ref_grads = train.value_and_grad(loss())(params, batch)
    got_loss, got_grads = train.value_and_grad(loss(**kw))(params, batch)
    assert torch.equal(got_loss, ref_loss) or abs(float(got_loss - ref_loss)) < 1e-6
    assert max_diff(got_grads, ref_grads) < 1e-6
    # and under torch.func too (remat.checkpoint composes with both)
    func_grads = torch.func.grad(loss(**kw))(params, batch)
    assert max_diff(func_grads, ref_grads) < 1e-6


def test_head_runs_only_at_positions_whose_loss_mask_is_set(monkeypatch):
    """Prompt positions of instruction data (mask 0) get no logits: the head sees the masked-in rows only,
    with the same loss and gradients as the full head (test above); all-ones masks and vmap keep every row."""
    from mistral_fn import loss as loss_module
    rows = []
    original = loss_module._masked_loss_sum
    monkeypatch.setattr(loss_module, "_masked_loss_sum", lambda head, h, *a: rows.append(h.shape[:2]) or
                        original(head, h, *a))
    params, batch = mf.init_params(CFG, seed=0), make_batch(2, ragged_mask=True)
    train.value_and_grad(loss(chunk_size=5))(params, batch)
    train.value_and_grad(loss(chunk_size=5))(params, {**batch, "loss_mask": torch.ones_like(batch["loss_mask"])})
    torch.func.vmap(loss(chunk_size=5), in_dims=(None, 0))(params, {k: v[:, None] for k, v in batch.items()})
    assert rows == [(1, int(batch["loss_mask"].sum())), (2, 16), (1, 16)]


def test_recomputed_inputs_are_freed_once_their_backward_is_done():
    """Chained recomputed calls: the second one's input is freed before the first one's backward runs."""
    f = mf.remat.checkpoint(lambda w, x: (x @ w).tanh())
    w = torch.randn(4, 4, requires_grad=True)
    x0 = torch.randn(3, 4, requires_grad=True)
    h1 = f(w, x0)
    out = f(w, h1).sum()
    h1_ref = weakref.ref(h1)
    del h1
    alive = []
    x0.register_hook(lambda g: alive.append(h1_ref() is not None))
    torch.autograd.grad(out, [w, x0])
    assert alive == [False]


def test_value_and_grad_is_pure_and_matches_torch_func():
    params, batch = mf.init_params(CFG, seed=0), make_batch(2)
    value, grads = train.value_and_grad(loss())(params, batch)
    ref_grads, ref_value = torch.func.grad_and_value(loss())(params, batch)
    assert float(value) == pytest.approx(float(ref_value), rel=1e-7) and max_diff(grads, ref_grads) < 1e-6
    assert all(not x.requires_grad and x.grad is None for x in pytree.tree_leaves(params))


def test_step_is_pure():
    params, batch = mf.init_params(CFG, seed=0), make_batch(2)
    opt = optim.adamw(1e-2, weight_decay=0.1)
    state = train.init_train_state(params, opt)
    snapshot = [x.clone() for x in pytree.tree_leaves(state)]
    step = train.make_train_step(loss(), opt, micro_batch_size=1, max_grad_norm=1.0)
    new, _ = step(state, batch)
    assert all(torch.equal(a, b) for a, b in zip(snapshot, pytree.tree_leaves(state)))
    again, _ = step(state, batch)
    assert all(torch.equal(a, b) for a, b in zip(pytree.tree_leaves(new), pytree.tree_leaves(again)))


def poisoned_loss(params, micro_batch):
    """The tiny model's loss times `micro_batch["factor"]` (NaN/inf there poisons the step)."""
    core = {k: micro_batch[k] for k in ("tokens", "labels", "loss_mask")}
    return mf.loss_fn(params, core, CFG) * micro_batch["factor"].mean()


def test_non_finite_steps_are_skipped_counted_and_stop_after_n():
    params = mf.init_params(CFG, seed=0)
    opt = optim.adamw(1e-2)
    step = train.make_train_step(poisoned_loss, opt, micro_batch_size=2, max_skipped=3)
    good, bad = make_batch(2), {**make_batch(2), "factor": torch.full((2,), float("nan"))}
    good["factor"] = torch.ones(2)
    state = train.init_train_state(params, opt)
    state, m = step(state, bad)
    assert m["skipped"] == 1 and int(state.skipped_in_row) == 1 and int(state.step) == 1
    assert max_diff(state.params, params) == 0 and int(state.opt_state.count) == 0
    state, m = step(state, {**bad, "factor": torch.full((2,), float("inf"))})
    assert m["skipped"] == 1 and int(state.skipped_in_row) == 2
    state, m = step(state, good)
    assert m["skipped"] == 0 and int(state.skipped_in_row) == 0 and int(state.skipped_total) == 2
    assert int(state.opt_state.count) == 1 and int(state.consumed_samples) == 6
    state, _ = step(state, bad)
    state, _ = step(state, bad)
    with pytest.raises(train.DivergenceError, match="3 consecutive steps"):
        step(state, bad)


@pytest.mark.parametrize("donate", [False, True])
def test_updates_that_make_params_non_finite_are_refused_counted_and_stop_after_n(donate):
    params, batch = mf.init_params(CFG, seed=0), make_batch(2)
    kept = pytree.tree_map(torch.clone, params)
    huge = optim.adamw(1e39)  # finite gradients, but every update is ~1e39: inf in float32
    step = train.make_train_step(loss(), huge, micro_batch_size=2, max_skipped=2, donate=donate)
    state = train.init_train_state(params, huge)
    state, m = step(state, batch)
    assert m["skipped"] == 1 and math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])
    assert int(state.skipped_in_row) == 1 and int(state.step) == 1 and int(state.opt_state.count) == 0
    assert all(torch.equal(a, b) for a, b in zip(pytree.tree_leaves(state.params), pytree.tree_leaves(kept),
                                                 strict=True))  # not one parameter changed, donated or not
    assert donate or max_diff(state.opt_state.mu, pytree.tree_map(torch.zeros_like, params)) == 0
    good = train.make_train_step(loss(), optim.adamw(1e-3), micro_batch_size=2, max_skipped=2, donate=donate)
    state, m = good(state, batch)
    assert m["skipped"] == 0 and int(state.skipped_in_row) == 0 and int(state.skipped_total) == 1
    state, _ = step(state, batch)
    with pytest.raises(train.DivergenceError, match="2 consecutive steps refused, the last for updates that make "
                                                    "parameters non-finite") as caught:
        step(state, batch)
    assert "\n" not in str(caught.value)


class PeerSaysBad:
    """A stand-in tp group of 2 whose other rank reports a non-finite update (`all_reduce` "max")."""

    size, rank = 2, 0

    def all_reduce(self, x, op="sum"):
        assert op == "max" and x.shape == ()
        return torch.maximum(x, torch.ones_like(x))


@pytest.mark.parametrize("donate", [False, True])
def test_update_check_is_exact_and_agrees_across_tp_ranks(donate):
    p = {"a": torch.tensor([3e38, 1.0]), "b": torch.tensor([100.0], dtype=torch.float16)}

    def ok(u, tp=mf.SINGLE_DEVICE):
        new, finite = train.apply_if_finite(p, u, donate=donate, tp=tp)
        assert [x.dtype for x in new] == [torch.float32, torch.float16]
        return bool(finite)

    assert ok({"a": torch.tensor([3e37, 1e38]), "b": torch.tensor([6e4])})  # 60100 < 65504, the fp16 max
    assert not ok({"a": torch.tensor([5e37, 0.0]), "b": torch.tensor([0.0])})  # 3.5e38 is past float32's max
    assert not ok({"a": torch.zeros(2), "b": torch.tensor([65504.0])})  # finite in float32, inf in the fp16 param
    assert not ok({"a": torch.tensor([0.0, float("nan")]), "b": torch.tensor([0.0])})
    assert not ok({"a": torch.tensor([0.0, float("-inf")]), "b": torch.tensor([0.0])})
    assert not ok({"a": torch.zeros(2), "b": torch.zeros(1)}, PeerSaysBad())
    assert torch.equal(p["a"], torch.tensor([3e38, 1.0]))  # params untouched
    new, _ = train.apply_if_finite(p, {"a": torch.tensor([1e38, 2.0]), "b": torch.tensor([1.0])}, donate=donate)
    assert torch.equal(new[0], torch.tensor([3e38 + 1e38, 3.0])) and new[1].item() == 101.0


def test_loss_decreases_on_tiny_model():
    params, batch = mf.init_params(CFG, seed=0), make_batch(4)
    sched = optim.warmup_cosine(1e-2, decay_steps=8, warmup_steps=1)
    opt = optim.adamw(sched, b2=0.95, weight_decay=0.1, mask=optim.decay_mask)
    step = train.make_train_step(loss(recompute=True), opt, micro_batch_size=2, max_grad_norm=1.0, schedule=sched)
    state, losses, lrs = train.init_train_state(params, opt), [], []
    for _ in range(8):
        state, m = step(state, batch)
        losses.append(m["loss"])
        lrs.append(m["lr"])
    assert losses[-1] < losses[0] - 0.5, losses
    assert lrs[0] == 0.0 and lrs[1] == pytest.approx(1e-2)


def test_bf16_compute_keeps_float32_master_and_moments():
    params, batch = mf.init_params(CFG, seed=0), make_batch(2)
    opt = optim.adamw(1e-3)
    state = train.init_train_state(params, opt, master_dtype=torch.float32)
    ref_state, ref_m = train.make_train_step(loss(), opt, micro_batch_size=2)(state, batch)
    step = train.make_train_step(loss(), opt, micro_batch_size=1, compute_dtype=torch.bfloat16)
    new, m = step(state, batch)
    assert {x.dtype for x in pytree.tree_leaves((new.params, new.opt_state.mu, new.opt_state.nu))} == {torch.float32}
    assert m["loss"] == pytest.approx(ref_m["loss"], abs=0.05)
    assert max_diff(new.params, ref_state.params) < 5e-3  # Adam's first step moves each weight by ~lr


def test_fp16_dynamic_loss_scale_backs_off_then_trains():
    params, batch = mf.init_params(CFG, seed=0), make_batch(2)
    opt = optim.sgd(0.1)
    ls = optim.dynamic_loss_scale(initial=2.0**20)
    step = train.make_train_step(loss(), opt, micro_batch_size=2, compute_dtype=torch.float16, loss_scale=ls,
                                 max_skipped=50)
    state = train.init_train_state(params, opt, master_dtype=torch.float32, loss_scale=ls)
    for _ in range(40):
        state, m = step(state, batch)
        if not m["skipped"]:
            break
    assert int(state.skipped_total) > 0 and m["skipped"] == 0
    assert float(state.loss_scale.scale) < 2.0**20 and int(state.opt_state.count) == 1
    assert math.isfinite(m["loss"]) and m["loss"] == pytest.approx(math.log(CFG.vocab_size), abs=0.2)


class FakeTP:
    """A tp group of 2 seen from rank 0 whose other rank holds the same local values: sum = 2x."""

    size, rank = 2, 0

    def all_reduce(self, x, op="sum"):
        return x * 2


def test_global_grad_norm_counts_sharded_leaves_across_ranks_and_replicated_once():
    shard = torch.arange(4.0).view(2, 2)
    local = {"w": shard, "norm": torch.tensor([3.0, 4.0])}
    full = {"w": torch.cat([shard, shard]), "norm": local["norm"]}
    assert torch.allclose(train.global_grad_norm(local, FakeTP(), sharded_paths={"w"}), optim.global_norm(full))
    for wrong in ((), {"w", "norm"}):  # shard not reduced / replicated leaf counted twice
        assert not torch.allclose(train.global_grad_norm(local, FakeTP(), sharded_paths=wrong), optim.global_norm(full))


class FakeDP:
    """A dp group of 2 whose other rank holds identical gradients: sum = 2x."""

    size, rank = 2, 0

    def all_reduce(self, x, op="sum"):
        return x * 2

    def all_reduce_(self, x, async_op=False):
        x.mul_(2)


def test_dp_all_reduce_averages_over_ranks():
    params, batch = mf.init_params(CFG, seed=0), make_batch(2)
    opt = optim.sgd(0.5)
    single, m1 = train.make_train_step(loss(), opt, micro_batch_size=2)(train.init_train_state(params, opt), batch)
    dp, m2 = train.make_train_step(loss(), opt, micro_batch_size=2, dp=FakeDP())(train.init_train_state(params, opt),
                                                                                  batch)
    assert max_diff(single.params, dp.params) < 1e-7 and m1["loss"] == pytest.approx(m2["loss"])
    assert int(dp.consumed_samples) == 4


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused_donated"])
def test_five_steps_match_transformers_with_torch_adamw(fused):
    params = mf.init_params(CFG, seed=3)
    model = hf_model(CFG, params).train()
    torch_opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    opt = optim.adamw(3e-3, b2=0.95, weight_decay=0.1, fused=fused)
    step = train.make_train_step(loss(), opt, micro_batch_size=2, max_grad_norm=1.0, donate=fused)
    state = train.init_train_state(params, opt)
    for k in range(5):
        batch = make_batch(2, seed=10 + k, ragged_mask=True)
        state, m = step(state, batch)
        logits = model(batch["tokens"]).logits.float()
        ce = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="none").view(2, -1)
        mask = batch["loss_mask"].float()
        ref_loss = (ce * mask).sum() / mask.sum()
        torch_opt.zero_grad()
        ref_loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        torch_opt.step()
        assert m["loss"] == pytest.approx(ref_loss.item(), rel=1e-5)
    ref = dict(model.named_parameters())
    names = hf_names(CFG)
    worst = max((p - ref[names[path]].detach()).abs().max().item() for path, p in leaves_with_paths(state.params))
    assert worst < 1e-5


def test_donating_step_matches_pure_step():
    params, batch = mf.init_params(CFG, seed=0), make_batch(2)
    opt = optim.adamw(1e-2, weight_decay=0.1)
    kw = dict(micro_batch_size=1, max_grad_norm=0.5)
    pure, _ = train.make_train_step(loss(), opt, **kw)(train.init_train_state(params, opt), batch)
    donated = train.init_train_state(pytree.tree_map(torch.clone, params), opt)
    donated, _ = train.make_train_step(loss(), opt, donate=True, **kw)(donated, batch)
    assert all(torch.equal(a, b) for a, b in zip(pytree.tree_leaves(pure), pytree.tree_leaves(donated)))


def test_fused_step_refuses_nothing_in_place_and_raises_on_non_finite_params():
    """The fused update is applied in place, so an update that makes a parameter non-finite cannot be refused
    as the unfused one is: the step raises at once. Non-finite gradients are still skipped before it."""
    params, batch = mf.init_params(CFG, seed=0), make_batch(2)
    huge = optim.adamw(1e39, fused=True)
    step = train.make_train_step(loss(), huge, micro_batch_size=2, donate=True)
    with pytest.raises(train.DivergenceError, match="step 1: the fused optimizer made parameters non-finite"):
        step(train.init_train_state(params, huge), batch)
    nan = train.make_train_step(poisoned_loss, huge, micro_batch_size=2, donate=True)
    state, m = nan(train.init_train_state(params, huge), {**batch, "factor": torch.full((2,), float("nan"))})
    assert m["skipped"] == 1 and int(state.opt_state.count) == 0


def test_compiled_step_equals_eager_step():
    """`make_train_step(compile=True)`: forward and backward as inductor graphs (the chunked head recomputed,
    oneDNN matmuls as a custom op), three steps within 1e-5 of eager. (SGD: AdamW's normalisation would turn
    float noise in gradients that are ~0 into whole-size steps.)"""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    params = mf.init_params(CFG, seed=0)
    opt = optim.sgd(0.5, momentum=0.9)
    states, losses = {}, {}
    for compiled in (False, True):
        step = train.make_train_step(loss(chunk_size=8), opt, micro_batch_size=2, max_grad_norm=1.0, donate=True,
                                     compile=compiled)
        state = train.init_train_state(pytree.tree_map(torch.clone, params), opt)
        for k in range(3):
            state, m = step(state, make_batch(2, seed=k, ragged_mask=True))
            losses.setdefault(compiled, []).append(m["loss"])
        states[compiled] = state
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
    assert max_diff(states[True].params, states[False].params) < 1e-5
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # one graph, not recompiled per step


def test_chunked_loss_in_bf16_matches_unchunked():
    params, batch = mf.params.cast(mf.init_params(CFG, seed=0), torch.bfloat16), make_batch(2, ragged_mask=True)
    ref_loss, ref_grads = train.value_and_grad(loss())(params, batch)
    got_loss, got_grads = train.value_and_grad(loss(chunk_size=5))(params, batch)
    assert abs(float(got_loss - ref_loss)) < 1e-3
    assert {g.dtype for g in pytree.tree_leaves(got_grads)} == {torch.bfloat16}
    for (path, a), (_, b) in zip(leaves_with_paths(got_grads), leaves_with_paths(ref_grads)):
        assert (a.float() - b.float()).abs().max() <= 2e-2 * b.float().abs().max() + 1e-6, path
