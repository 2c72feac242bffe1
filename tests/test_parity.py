"""forward / loss / grads equal transformers' MistralForCausalLM on the same random weights."""

import pytest
import torch
import torch.nn.functional as F

import mistral_fn as mf
from mistral_fn.params import leaves_with_paths
from tests.hf_reference import hf_grads, hf_model

CONFIGS = {
    "gqa": mf.MistralConfig(vocab_size=300, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, rope_theta=1e6),
    "window": mf.MistralConfig(vocab_size=257, dim=48, n_layers=3, n_heads=4, n_kv_heads=1, ffn_dim=80,
                               head_dim=16, rope_theta=1e4, sliding_window=5),
    "mha_window_long": mf.MistralConfig(vocab_size=128, dim=32, n_layers=1, n_heads=2, n_kv_heads=2, ffn_dim=64,
                                        rope_theta=500.0, sliding_window=32),
}


def _inputs(config, batch=3, seq=17, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, config.vocab_size, (batch, seq + 1), generator=g)
    mask = (torch.rand(batch, seq, generator=g) > 0.3).long()
    return {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": mask}


def _hf_loss(model, batch):
    logits = model(batch["tokens"]).logits.float()
    ce = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="none").view(batch["labels"].shape)
    mask = batch["loss_mask"].float()
    return (ce * mask).sum() / mask.sum()


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_transformers(name):
    config = CONFIGS[name]
    params = mf.init_params(config, seed=1)
    batch = _inputs(config)
    with torch.no_grad():
        ref = hf_model(config, params)(batch["tokens"]).logits
    ours = mf.forward(params, batch["tokens"], config)
    assert ours.dtype == torch.float32 and ours.shape == ref.shape
    assert (ours - ref).abs().max().item() < 1e-4


@pytest.mark.parametrize("name", ["gqa", "window"])
def test_grads_match_transformers(name):
    config = CONFIGS[name]
    params = mf.init_params(config, seed=2)
    batch = _inputs(config, seed=3)
    model = hf_model(config, params)
    ref_loss = _hf_loss(model, batch)
    ref_loss.backward()
    ref = hf_grads(model, config)
    grads, loss = torch.func.grad_and_value(mf.loss_fn)(params, batch, config)
    assert abs(loss.item() - ref_loss.item()) < 1e-5
    for path, g in leaves_with_paths(grads):
        rel = ((g - ref[path]).norm() / ref[path].norm()).item()
        assert rel < 1e-4, f"{path}: relative error {rel:.2e}"


def test_explicit_positions_equal_default():
    config = CONFIGS["window"]
    params = mf.init_params(config, seed=4)
    tokens = _inputs(config)["tokens"]
    default = mf.forward(params, tokens, config)
    explicit = mf.forward(params, tokens, config, positions=torch.arange(tokens.shape[1]).expand(3, -1))
    torch.testing.assert_close(explicit, default, rtol=0, atol=1e-5)


@pytest.mark.parametrize("break_it", ["theta", "window", "kv_heads"])
def test_parity_detects_wrong_model(break_it):
    """The reference comparison is sensitive to the bugs it must catch."""
    config = CONFIGS["window"]
    params = mf.init_params(config, seed=5)
    tokens = _inputs(config)["tokens"]
    with torch.no_grad():
        ref = hf_model(config, params)(tokens).logits
    if break_it == "theta":
        ours = mf.forward(params, tokens, config.replace(rope_theta=1e6))
    elif break_it == "window":
        ours = mf.forward(params, tokens, config.replace(sliding_window=None))
    else:
        cfg = CONFIGS["gqa"]
        params = mf.init_params(cfg, seed=5)
        tokens = _inputs(cfg)["tokens"]
        with torch.no_grad():
            ref = hf_model(cfg, params)(tokens).logits
        swapped = [dict(layer, attn=dict(layer["attn"])) for layer in params["layers"]]
        for layer in swapped:
            for w in ("wk", "wv"):
                layer["attn"][w] = layer["attn"][w].view(2, -1, cfg.dim).flip(0).reshape(-1, cfg.dim)
        ours = mf.forward(dict(params, layers=swapped), tokens, cfg)
    assert (ours - ref).abs().max().item() > 1e-3


def test_bf16_forward_close_to_float32():
    config = CONFIGS["gqa"]
    params = mf.init_params(config, seed=6)
    tokens = _inputs(config)["tokens"]
    full = mf.forward(params, tokens, config)
    half = mf.forward(mf.params.cast(params, torch.bfloat16), tokens, config)
    assert half.dtype == torch.float32
    assert (half - full).abs().max().item() < 0.05


def test_tokens_outside_vocab_rejected():
    config = CONFIGS["gqa"]
    params = mf.init_params(config)
    for bad in (config.vocab_size, -1):
        tokens = torch.tensor([[1, 2, bad]])
        with pytest.raises(mf.InputError, match=f"token id {bad} is outside the vocabulary"):
            mf.forward(params, tokens, config)


def test_batch_shape_mismatch_rejected():
    config = CONFIGS["gqa"]
    batch = _inputs(config)
    batch["labels"] = batch["labels"][:, :-1]
    with pytest.raises(mf.InputError, match="share one"):
        mf.loss_fn(mf.init_params(config), batch, config)
