"""The faster paths of `kernels` (`fused.py`): oneDNN matmuls, RMSNorm and SwiGLU->down storing less, the
compiled one-row product. Each is checked against float64 plain torch (values and gradients), under the
transforms that reach it, and for what it stores; and that it really is the path taken."""

import functools

import pytest
import torch
import torch.nn.functional as F
from torch.utils import _pytree as pytree

import mistral_fn as mf
from mistral_fn import fused, kernels

CFG = mf.MistralConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=32)


def _randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _grads(fn, *inputs):
    inputs = [x.detach().requires_grad_() for x in inputs]
    out = fn(*inputs)
    probe = _randn(*out.shape, seed=9).to(out.dtype)
    return out.detach(), torch.autograd.grad((out * probe).sum(), inputs)


def _close_to_float64(fn, reference, inputs, rtol):
    out, grads = _grads(fn, *inputs)
    ref_out, ref_grads = _grads(reference, *(x.double() for x in inputs))
    torch.testing.assert_close(out.double(), ref_out, rtol=rtol, atol=rtol)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g.double(), r, rtol=rtol, atol=rtol)


@pytest.fixture
def onednn_calls(monkeypatch):
    """Counts the oneDNN matmuls (`fused.matmul_t` on float32 CPU tensors)."""
    calls = []
    original = fused.matmul_t

    def counting(x, w):
        calls.append(fused.uses_onednn(x, w))
        return original(x, w)

    monkeypatch.setattr(fused, "matmul_t", counting)
    return calls


@pytest.mark.skipif(not fused.ONEDNN, reason="no oneDNN in this torch build")
def test_linear_runs_onednn_forward_and_backward_and_equals_float64(onednn_calls):
    x, w = _randn(2, 5, 16), _randn(24, 16, seed=1)
    _close_to_float64(kernels.linear, F.linear, [x, w], rtol=1e-5)
    assert onednn_calls == [True, True, True]  # forward, grad_x = g @ w, grad_w = gᵀ @ x (transposed views)
    onednn_calls.clear()
    with torch.no_grad():
        kernels.linear(x, w)
    assert onednn_calls == [True]
    onednn_calls.clear()
    kernels.linear(x.double(), w.double())
    assert onednn_calls == []  # float64 and other dtypes: F.linear


def test_linear_skips_the_gradient_nobody_needs(onednn_calls):
    x, w = _randn(3, 16), _randn(8, 16, seed=1).requires_grad_()
    grad = torch.autograd.grad(kernels.linear(x, w).sum(), w)[0]
    torch.testing.assert_close(grad, torch.ones(3, 8).T @ x)
    assert len(onednn_calls) == 2  # forward and grad_w only: no grad_x for an input without one


def test_model_gradients_through_fused_paths_equal_float64_under_grad_and_value_and_grad(onednn_calls):
    """The whole loss (chunked head included) in float32 through oneDNN, RMSNorm and SwiGLULinear, against
    the float64 model, which takes the plain ops."""
    params = mf.init_params(CFG, seed=0)
    x = torch.randint(0, CFG.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    batch = {"tokens": x[:, :-1], "labels": x[:, 1:], "loss_mask": torch.ones_like(x[:, 1:])}
    reference = torch.func.grad(mf.loss_fn)(pytree.tree_map(torch.Tensor.double, params), batch, CFG)
    onednn_calls.clear()
    for grads in (torch.func.grad(mf.loss_fn)(params, batch, CFG),
                  mf.value_and_grad(functools.partial(mf.loss_fn, chunk_size=3))(params, batch, CFG)[1]):
        for g, r in zip(pytree.tree_leaves(grads), pytree.tree_leaves(reference), strict=True):
            torch.testing.assert_close(g.double(), r, rtol=1e-5, atol=1e-7)
    assert onednn_calls and all(onednn_calls)


@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-5), (torch.float64, 1e-12), (torch.bfloat16, 2e-2)])
def test_rms_norm_function_equals_plain_ops_and_stores_less(dtype, rtol):
    x, weight = _randn(2, 7, 16, dtype=dtype), 1 + 0.1 * _randn(16, seed=1, dtype=dtype)

    def plain(x, weight):
        h = x.to(torch.promote_types(x.dtype, torch.float32))
        return weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)).to(x.dtype)

    def function(x, weight):
        return fused.RMSNorm.apply(x, weight, 1e-5)[0]

    torch.testing.assert_close(function(x, weight), plain(x, weight), rtol=0, atol=0)  # the same forward ops
    out, grads = _grads(function, x, weight)
    ref_out, ref_grads = _grads(plain, x, weight)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=rtol, atol=rtol)
    assert _saved_floats(function, x, weight) < _saved_floats(plain, x, weight) - x.numel() // 2


def test_norm_linear_function_equals_plain_ops_and_rebuilds_the_normalised_input():
    h, weight = _randn(2, 7, 16), 1 + 0.1 * _randn(16, seed=1)
    ws = [_randn(12, 16, seed=2), _randn(4, 16, seed=3)]

    def plain(h, weight, *ws):
        x = weight * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)
        return torch.cat([F.linear(x, w) for w in ws], dim=-1)

    def function(h, weight, *ws):
        return torch.cat(fused.NormLinear.apply(h, weight, 1e-5, mf.SINGLE_DEVICE, *ws)[:-1], dim=-1)

    _close_to_float64(function, plain, [h, weight, *ws], rtol=1e-5)
    weights = weight.numel() + sum(w.numel() for w in ws)
    assert _saved_floats(function, h, weight, *ws) == h.numel() + h.numel() // 16 + weights  # h, 1/rms
    assert _saved_floats(plain, h, weight, *ws) > 2 * h.numel() + weights


def test_swiglu_linear_function_equals_plain_ops_and_stores_less():
    gate, up, w = _randn(2, 5, 24), _randn(2, 5, 24, seed=1), _randn(16, 24, seed=2)
    plain = lambda g, u, w: F.linear(F.silu(g) * u, w)  # noqa: E731
    assert torch.equal(fused.SwiGLULinear.apply(gate, up, w), fused.matmul_t(F.silu(gate) * up, w))
    _close_to_float64(fused.SwiGLULinear.apply, plain, [gate, up, w], rtol=1e-5)
    # gate and up only; plain autograd also keeps silu(gate) and the product
    assert _saved_floats(fused.SwiGLULinear.apply, gate, up, w) == 2 * gate.numel() + w.numel()
    assert _saved_floats(plain, gate, up, w) == 4 * gate.numel() + w.numel()


def _saved_floats(fn, *inputs) -> int:
    """Elements of the distinct storages autograd saves for `fn(*inputs)`."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes() // t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*(x.detach().requires_grad_() for x in inputs))
    return sum(seen.values())


def test_fused_functions_under_jacrev_take_the_batched_cotangent():
    """jacrev vmaps the backward: the oneDNN calls and in-place products give way to plain ops."""
    gate, up, w = _randn(3, 8), _randn(3, 8, seed=1), _randn(4, 8, seed=2)
    x, weight = _randn(3, 8, seed=3), 1 + 0.1 * _randn(8, seed=4)
    for fn, plain, inputs in (
            (fused.SwiGLULinear.apply, lambda g, u, w: F.linear(F.silu(g) * u, w), (gate, up, w)),
            (fused.Linear.apply, F.linear, (x, w)),
            (lambda x, wt: fused.RMSNorm.apply(x, wt, 1e-5)[0],
             lambda x, wt: wt * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5), (x, weight))):
        for argnum in range(len(inputs)):
            jac = torch.func.jacrev(fn, argnums=argnum)(*inputs)
            ref = torch.func.jacrev(plain, argnums=argnum)(*(t.double() for t in inputs))
            torch.testing.assert_close(jac.double(), ref, rtol=1e-5, atol=1e-6)


def test_compiled_linear_equals_eager_one_row_and_several():
    """Under torch.compile: a one-row product without autograd is a multiply-reduce (inductor fuses it into
    one pass over the weight); several rows, and backward, call oneDNN through a custom op."""
    torch._dynamo.reset()
    w = _randn(40, 24, seed=1)
    compiled = torch.compile(kernels.linear, fullgraph=True)
    for rows in ((1, 1, 24), (3, 24)):
        x = _randn(*rows)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x, w), F.linear(x.double(), w.double()).float(), rtol=1e-5, atol=1e-5)
    _close_to_float64(compiled, F.linear, [_randn(3, 24), w], rtol=1e-5)
