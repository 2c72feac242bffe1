"""Every torch.func transform composes with every model function, unpatched and without flags.

The matrix: {grad, vmap(grad) per example, jvp, jacrev, jacfwd, Hessian-vector products (reverse over
reverse, forward over reverse), vmap over stacked params, torch.compile} x {forward, hidden_states,
loss_fn (plain, recompute, chunked head, both), forward at explicit (left-padded) positions,
forward_with_cache (prefill then a chunk, left-padded, through a ring)}. Each result is checked against a
reference computed another way: a float64 central finite difference, the other AD mode, a Python loop
over examples, each ensemble member alone, eager mode. The model runs in float64 here, so the
finite differences agree to ~1e-8.
"""

import functools
import math

import pytest
import torch
from torch.utils import _pytree as pytree

import mistral_fn as mf
import sharding as sh
from mistral_fn import model, tracing

CFG = mf.MistralConfig(vocab_size=11, dim=8, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=12, head_dim=4,
                       rope_theta=1e4, sliding_window=3, max_seq_len=16)
B, T = 2, 6
DTYPE = torch.float64


def _data(seed=0):
    """A loss batch, plus `padded_positions` (row 1 left-padded by two) for the position-mask paths."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, CFG.vocab_size, (B, T + 1), generator=g)
    return {"tokens": x[:, :-1], "labels": x[:, 1:], "loss_mask": (torch.rand(B, T, generator=g) > 0.2).long(),
            "padded_positions": torch.arange(T) - torch.tensor([0, 2])[:, None]}


BATCH = _data()
PARAMS = mf.init_params(CFG, seed=0, dtype=DTYPE)
# Fixed random weights that turn each model output into a scalar.
PROBE = {"forward": torch.randn(B, T, CFG.vocab_size, dtype=DTYPE, generator=torch.Generator().manual_seed(1)),
         "hidden_states": torch.randn(B, T, CFG.dim, dtype=DTYPE, generator=torch.Generator().manual_seed(2))}
PROBE["forward_with_cache"] = PROBE["forward_at_positions"] = PROBE["forward"]


def cached_logits(params, tokens, positions):
    """Logits of a 4-token prefill then a 2-token chunk through a ring cache (window 3 < 4: attend-first)."""
    cache = mf.init_cache(params, CFG, tokens.shape[0], tokens.shape[1])
    first, cache = mf.forward_with_cache(params, tokens[:, :4], CFG, cache, positions[:, :4])
    second, _ = mf.forward_with_cache(params, tokens[:, 4:], CFG, cache, positions[:, 4:])
    return torch.cat([first, second], dim=1)


LOSSES = {"loss_fn": {}, "loss_fn_recompute": {"recompute": True}, "loss_fn_chunked": {"chunk_size": 4},
          "loss_fn_recompute_chunked": {"recompute": True, "chunk_size": 4}}


def model_output(name, params, batch):
    """The model function `name` on `batch` (any batch size)."""
    if name in LOSSES:
        return mf.loss_fn(params, batch, CFG, **LOSSES[name])
    if name == "forward":
        return mf.forward(params, batch["tokens"], CFG)
    if name == "hidden_states":
        return mf.hidden_states(params, batch["tokens"], CFG)
    if name == "forward_at_positions":
        return mf.forward(params, batch["tokens"], CFG, positions=batch["padded_positions"])
    return cached_logits(params, batch["tokens"], batch["padded_positions"])


def scalar(name, params, batch):
    """A scalar of the model output (the loss itself, or a fixed projection of logits/hidden states)."""
    out = model_output(name, params, batch)
    return out if name in LOSSES else (out * PROBE[name]).sum()


FUNCTIONS = ["forward", "hidden_states", *LOSSES, "forward_at_positions", "forward_with_cache"]


def direction(seed):
    g = torch.Generator().manual_seed(seed)
    return pytree.tree_map(lambda x: 0.02 * torch.randn(x.shape, dtype=x.dtype, generator=g), PARAMS)


def axpy(a, x, y):
    return pytree.tree_map(lambda u, v: a * u + v, x, y)


def dot(x, y):
    return sum((u * v).sum() for u, v in zip(pytree.tree_leaves(x), pytree.tree_leaves(y), strict=True))


def finite_difference(fn, params, v, eps=1e-5):
    """Central difference of `fn` (a pytree of tensors) along `v` at `params`, in float64."""
    plus, minus = fn(axpy(eps, v, params)), fn(axpy(-eps, v, params))
    return pytree.tree_map(lambda p, m: (p - m) / (2 * eps), plus, minus)


def assert_trees_close(actual, expected, rtol=1e-6, atol=1e-9):
    for a, e in zip(pytree.tree_leaves(actual), pytree.tree_leaves(expected), strict=True):
        torch.testing.assert_close(a, e, rtol=rtol, atol=atol)


@pytest.mark.parametrize("name", FUNCTIONS)
def test_grad_equals_finite_difference(name):
    grads = torch.func.grad(functools.partial(scalar, name))(PARAMS, BATCH)
    v = direction(3)
    fd = finite_difference(lambda p: scalar(name, p, BATCH), PARAMS, v)
    torch.testing.assert_close(dot(grads, v), fd, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", FUNCTIONS)
def test_jvp_equals_reverse_mode_and_finite_difference(name):
    v = direction(4)
    out, tangent = torch.func.jvp(lambda p: model_output(name, p, BATCH), (PARAMS,), (v,))
    torch.testing.assert_close(out, model_output(name, PARAMS, BATCH), rtol=1e-12, atol=1e-12)
    assert_trees_close(tangent, finite_difference(lambda p: model_output(name, p, BATCH), PARAMS, v))
    grads = torch.func.grad(functools.partial(scalar, name))(PARAMS, BATCH)
    projected = tangent if name in LOSSES else (tangent * PROBE[name]).sum()
    torch.testing.assert_close(projected, dot(grads, v), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", FUNCTIONS)
def test_per_example_grads_equal_a_loop(name):
    def one(params, example, probe):
        out = model_output(name, params, {k: x[None] for k, x in example.items()})
        return out if name in LOSSES else (out[0] * probe).sum()

    probes = PROBE.get(name, torch.zeros(B))
    per_example = torch.func.vmap(torch.func.grad(one), in_dims=(None, 0, 0))(PARAMS, BATCH, probes)
    for b in range(B):
        alone = torch.func.grad(one)(PARAMS, {k: x[b] for k, x in BATCH.items()}, probes[b])
        assert_trees_close(pytree.tree_map(lambda g: g[b], per_example), alone, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", FUNCTIONS)
@pytest.mark.parametrize("mode", ["reverse_over_reverse", "forward_over_reverse"])
def test_hessian_vector_product_equals_finite_difference_of_grad(name, mode):
    grad_fn = torch.func.grad(lambda p: scalar(name, p, BATCH))
    v = direction(5)
    if mode == "reverse_over_reverse":
        hvp = torch.func.grad(lambda p: dot(grad_fn(p), v))(PARAMS)
    else:
        hvp = torch.func.jvp(grad_fn, (PARAMS,), (v,))[1]
    assert_trees_close(hvp, finite_difference(grad_fn, PARAMS, v, eps=1e-4), rtol=1e-5, atol=1e-7)


def _norm_weights(params):
    return {"attn_norm": params["layers"][1]["attn_norm"], "norm": params["norm"]}


def _with_norms(params, norms):
    layers = list(params["layers"])
    layers[1] = {**layers[1], "attn_norm": norms["attn_norm"]}
    return {**params, "layers": layers, "norm": norms["norm"]}


@pytest.mark.parametrize("name", FUNCTIONS)
def test_jacrev_equals_jacfwd(name):
    """Full Jacobians of the output (w.r.t. two norm weights, to keep them small) in both AD modes."""
    def f(norms):
        return model_output(name, _with_norms(PARAMS, norms), BATCH)

    rev = torch.func.jacrev(f)(_norm_weights(PARAMS))
    fwd = torch.func.jacfwd(f)(_norm_weights(PARAMS))
    assert_trees_close(rev, fwd, rtol=1e-10, atol=1e-12)
    e = {"attn_norm": torch.zeros(CFG.dim, dtype=DTYPE), "norm": torch.zeros(CFG.dim, dtype=DTYPE)}
    e["norm"][3] = 1.0
    fd = finite_difference(f, _norm_weights(PARAMS), e)
    torch.testing.assert_close(rev["norm"][..., 3], fd, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", FUNCTIONS)
def test_vmap_over_stacked_params_equals_each_member(name):
    members = [mf.init_params(CFG, seed=s, dtype=DTYPE) for s in range(3)]
    stacked = pytree.tree_map(lambda *xs: torch.stack(xs), *members)
    outs = torch.func.vmap(lambda p: model_output(name, p, BATCH))(stacked)
    for i, member in enumerate(members):
        torch.testing.assert_close(outs[i], model_output(name, member, BATCH), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", FUNCTIONS)
def test_compiled_value_and_grad_equal_eager(name):
    torch._dynamo.reset()
    fn = torch.func.grad_and_value(functools.partial(scalar, name))
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    assert_trees_close(compiled(PARAMS, BATCH), fn(PARAMS, BATCH), rtol=1e-10, atol=1e-12)


def test_rope_tables_are_float64_for_float64_params():
    """At position 31999 float32 phases are off by ~1e-3 rad; float64 tables match double-precision math."""
    positions = torch.tensor([[0, 7, 31999]])
    cos, sin = model.rope_tables(positions, 8, 1e6, torch.float64)
    for p, row_cos, row_sin in zip(positions[0].tolist(), cos[0, :, 0], sin[0, :, 0], strict=True):
        angles = [p / 1e6 ** (2 * (i % 4) / 8) for i in range(8)]
        for table, exact in ((row_cos, math.cos), (row_sin, math.sin)):
            torch.testing.assert_close(table, torch.tensor([exact(a) for a in angles], dtype=DTYPE), rtol=0, atol=1e-12)
    assert model.rope_tables(positions, 8, 1e6, torch.bfloat16)[0].dtype == torch.bfloat16


def test_gradcheck_float64_tiny_model():
    leaves, treedef = pytree.tree_flatten(PARAMS)

    def logits(*flat):
        return mf.forward(pytree.tree_unflatten(list(flat), treedef), BATCH["tokens"][:1, :4], CFG)

    inputs = tuple(x.detach().requires_grad_() for x in leaves)
    assert torch.autograd.gradcheck(logits, inputs, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


def test_value_checks_run_where_values_are_concrete_and_shape_checks_everywhere():
    bad = BATCH["tokens"].clone()
    bad[1, 2] = CFG.vocab_size
    with pytest.raises(mf.InputError, match=f"token id {CFG.vocab_size} is outside"):
        torch.func.grad(lambda p: mf.loss_fn(p, {**BATCH, "tokens": bad}, CFG))(PARAMS)  # tokens are not traced
    assert not tracing.values_readable(torch.zeros(1, device="meta"))
    with pytest.raises(mf.InputError, match="tokens must be an int64 tensor"):
        torch.func.vmap(lambda t: mf.forward(PARAMS, t, CFG))(BATCH["tokens"][:, None].float())


def test_tensor_parallel_refuses_transforms_its_collectives_cannot_follow():
    class TwoRanks:  # never reached: the refusal comes before any collective
        size, rank = 2, 0

    config = CFG.replace(n_kv_heads=2)
    full = mf.init_params(config, seed=0, dtype=DTYPE)
    local = sh.shard(full, sh.match(full, sh.mistral_rules(config)), {"tp": 2}, {"tp": 0})

    def logits(params):
        return mf.forward(params, BATCH["tokens"], config, tp=TwoRanks())

    stacked = pytree.tree_map(lambda x: torch.stack([x, x]), local)
    refusal = r"tensor parallelism \(tp=2\) supports one level of reverse-mode AD only"
    with pytest.raises(mf.InputError, match=refusal):
        torch.func.vmap(logits)(stacked)
    with pytest.raises(mf.InputError, match=refusal):
        torch.func.jvp(logits, (local,), (local,))
    with pytest.raises(mf.InputError, match=refusal):
        torch.func.grad(lambda p: torch.func.grad(lambda q: logits(q).sum())(p)["norm"].sum())(local)


def test_transform_detection():
    """`only_reverse_mode` under each transform, eagerly and as torch.compile traces it."""
    seen = []

    def probe(x):
        seen.append(tracing.only_reverse_mode())
        return x.sum()

    x = torch.ones(2)
    probe(x)
    torch.func.grad(probe)(x)
    torch.func.vmap(probe)(x[:, None])
    torch.func.jvp(probe, (x,), (x,))
    torch.func.grad(lambda y: torch.func.grad(probe)(y).sum())(x)
    with torch.autograd.forward_ad.dual_level():
        probe(torch.autograd.forward_ad.make_dual(x, x))
    assert seen == [True, True, False, False, False, False]
    seen.clear()
    torch._dynamo.reset()
    torch.compile(torch.func.grad(probe), backend="eager", fullgraph=True)(x)
    torch.compile(torch.func.vmap(probe), backend="eager", fullgraph=True)(x[:, None])
    assert seen == [True, False]
