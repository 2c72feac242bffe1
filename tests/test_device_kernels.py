"""Device/backend selection and the NPU kernel path, checked on CPU against a stand-in torch_npu
that implements the documented semantics of npu_rms_norm / npu_rotary_mul / npu_swiglu /
npu_fusion_attention (band: query i sees keys i - pre_tockens .. i + next_tockens)."""

import math
import types

import pytest
import torch
import torch.nn.functional as F

import mistral_fn as mf
from mistral_fn import attention, device


def test_cpu_selection_and_backends():
    assert device.device_type() in ("cpu", "cuda", "npu")
    assert device.device_type("cpu") == "cpu"
    assert [device.dist_backend(k) for k in ("npu", "cuda", "cpu")] == ["hccl", "nccl", "gloo"]
    with pytest.raises(ValueError, match="no distributed backend"):
        device.dist_backend("tpu")


def test_npu_requested_without_torch_npu_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(device, "torch_npu", lambda: None)
    assert not device.npu_available()
    with pytest.raises(RuntimeError, match="torch_npu or an Ascend device is not available"):
        device.device_type("npu")


def test_broken_torch_npu_import_means_no_npu(monkeypatch):
    device.torch_npu.cache_clear()
    monkeypatch.setattr(device.importlib.util, "find_spec", lambda name: object())
    def failing_import(name):
        raise RuntimeError("Failed to load the backend extension: torch_npu")
    monkeypatch.setattr(device.importlib, "import_module", failing_import)
    try:
        assert device.torch_npu() is None
    finally:
        device.torch_npu.cache_clear()


def test_npu_attention_arguments():
    assert attention.npu_attention_args(16, None) == {"sparse_mode": 2}
    assert attention.npu_attention_args(16, 32) == {"sparse_mode": 2}
    assert attention.npu_attention_args(16, 4) == {"sparse_mode": 4, "pre_tockens": 3, "next_tockens": 0}


def _fake_torch_npu(calls):
    def npu_fusion_attention(q, k, v, head_num, layout, *, atten_mask, scale, sparse_mode,
                             pre_tockens=2**31 - 1, next_tockens=2**31 - 1):
        calls.append((layout, head_num, sparse_mode, pre_tockens, next_tockens, tuple(atten_mask.shape)))
        assert layout == "BSND" and head_num == q.shape[2] and atten_mask.dtype == torch.bool
        T = q.shape[1]
        i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
        if sparse_mode == 2:
            visible = j <= i
        else:
            assert sparse_mode == 4
            visible = (j >= i - pre_tockens) & (j <= i + next_tockens)
        rep = q.shape[2] // k.shape[2]
        qh, kh, vh = (t.transpose(1, 2) for t in (q, k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)))
        scores = (qh @ kh.transpose(-1, -2) * scale).masked_fill(~visible, float("-inf"))
        return (torch.softmax(scores, -1) @ vh).transpose(1, 2), None, None, None, 0, 0, 0

    def npu_rms_norm(x, gamma, epsilon):
        return gamma * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + epsilon)), None

    def npu_rotary_mul(x, r1, r2):
        half = x.shape[-1] // 2
        return x * r1 + torch.cat((-x[..., half:], x[..., :half]), -1) * r2

    def npu_swiglu(x, dim):
        a, b = x.chunk(2, dim)
        return F.silu(a) * b

    return types.SimpleNamespace(npu_fusion_attention=npu_fusion_attention, npu_rms_norm=npu_rms_norm,
                                 npu_rotary_mul=npu_rotary_mul, npu_swiglu=npu_swiglu)


@pytest.mark.parametrize("window", [None, 3])
def test_npu_path_equals_reference_path(monkeypatch, window):
    cfg = mf.MistralConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=40, sliding_window=window)
    params = mf.init_params(cfg, seed=1)
    tokens = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(0))
    reference = mf.forward(params, tokens, cfg)
    calls = []
    monkeypatch.setattr(device, "torch_npu", lambda: _fake_torch_npu(calls))
    monkeypatch.setattr(device, "is_npu", lambda x: True)
    fused = mf.forward(params, tokens, cfg)
    assert len(calls) == cfg.n_layers
    assert calls[0] == ("BSND", 4, 2 if window is None else 4, 2**31 - 1 if window is None else window - 1,
                        2**31 - 1 if window is None else 0, (attention.NPU_MASK_SIZE,) * 2)
    assert (fused - reference).abs().max().item() < 1e-5


def test_band_mask_counts_the_query_itself():
    mask = attention.band_mask(torch.arange(6), 3)
    assert mask.sum(-1).tolist() == [1, 2, 3, 3, 3, 3]
    assert mask[5].tolist() == [False, False, False, True, True, True]
    assert math.isclose(float(attention.band_mask(torch.arange(4), None).sum()), 10)


def _recording(fake, names):
    """`fake` with every kernel also appending its name to `names`."""
    def record(name, kernel):
        return lambda *args, **kwargs: names.append(name) or kernel(*args, **kwargs)
    return types.SimpleNamespace(**{name: record(name, kernel) for name, kernel in vars(fake).items()})


@pytest.mark.parametrize("transform", ["grad", "jvp", "vmap", "grad_of_grad"])
def test_npu_kernels_give_way_to_the_torch_path_under_transforms(monkeypatch, transform):
    """Under one reverse pass the fused kernels run; under forward mode, vmap and nested gradients
    (which they cannot follow) the torch path runs. Either way the numbers equal the CPU reference."""
    cfg = mf.MistralConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=40, sliding_window=3)
    params = mf.init_params(cfg, seed=1)
    tokens = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(0))

    def loss(norm):
        return mf.forward({**params, "norm": norm}, tokens, cfg).pow(2).mean()

    def run():
        norm = params["norm"]
        if transform == "grad":
            return torch.func.grad(loss)(norm)
        if transform == "jvp":
            return torch.func.jvp(loss, (norm,), (torch.ones_like(norm),))[1]
        if transform == "vmap":
            return torch.func.vmap(loss)(torch.stack([norm, 2 * norm]))
        return torch.func.grad(lambda n: torch.func.grad(loss)(n).sum())(norm)

    reference = run()
    names = []
    monkeypatch.setattr(device, "torch_npu", lambda: _recording(_fake_torch_npu([]), names))
    monkeypatch.setattr(device, "is_npu", lambda x: True)
    torch.testing.assert_close(run(), reference, rtol=1e-4, atol=1e-6)
    if transform == "grad":
        assert set(names) == {"npu_fusion_attention", "npu_rms_norm", "npu_rotary_mul", "npu_swiglu"}
    else:
        assert names == []
