"""`checkpoints.load`, the one loader: HF, Megatron (TP x PP) and native (TP-sharded training state)
checkpoints all give the same full params and config; unknown or ambiguous directories are a clear error."""

import pytest
import torch

import checkpoints
import mistral_fn as mf
from checkpoints import megatron
from checkpoints import load as load_any
from mistral_fn.params import leaves_with_paths
from tests.native_ranks import save_tp_ranks

# A vocab that needs padding on 2 ranks with divisor 8 (1001 -> 1008).
CONFIG = mf.MistralConfig(vocab_size=1001, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48,
                          sliding_window=5, max_seq_len=64)


def assert_same(config, params):
    assert config == CONFIG
    expected = mf.init_params(CONFIG, seed=1)
    for (path, got), (_, want) in zip(leaves_with_paths(params), leaves_with_paths(expected), strict=True):
        assert torch.equal(got, want), path


def test_hf(tmp_path):
    checkpoints.save_hf(tmp_path / "hf", CONFIG, mf.init_params(CONFIG, seed=1))
    assert_same(*load_any(tmp_path / "hf"))


def test_megatron(tmp_path):
    megatron.save_megatron(tmp_path / "mg", CONFIG, mf.init_params(CONFIG, seed=1), tp=2, pp=2,
                              make_vocab_size_divisible_by=8)
    assert_same(*load_any(tmp_path / "mg"))
    assert_same(*checkpoints.load_megatron(tmp_path / "mg"))
    config, lazy = checkpoints.lazy_megatron(tmp_path / "mg")
    assert config == CONFIG and all(isinstance(x, checkpoints.LazyTensor) for _, x in leaves_with_paths(lazy))


def test_native_tp2(tmp_path):
    """Two TP ranks save their shards (with optimizer-like extra state) as the training loop does."""
    params = mf.init_params(CONFIG, seed=1)
    save_tp_ranks(tmp_path / "native", 7, params, CONFIG, divisible_by=8,
                  state=lambda local: {"params": local, "mu": mf.params.tree_map(torch.zeros_like, local)})
    assert_same(*load_any(tmp_path / "native"))
    assert_same(*load_any(tmp_path / "native" / "iter_0000007"))
    config, bf16 = load_any(tmp_path / "native", dtype=torch.bfloat16)
    assert bf16["layers"][0]["attn"]["wq"].dtype == torch.bfloat16
    assert checkpoints.open_checkpoint(tmp_path / "native").iteration == 7


def test_unknown_directory(tmp_path):
    with pytest.raises(mf.CheckpointError, match="unrecognised checkpoint"):
        load_any(tmp_path)
    with pytest.raises(mf.CheckpointError, match="no such checkpoint directory"):
        load_any(tmp_path / "missing")


def test_a_directory_of_two_formats_is_refused_not_guessed(tmp_path):
    """An HF model directory that a training run also saved into: which weights to use is not guessed."""
    checkpoints.save_hf(tmp_path / "hf", CONFIG, mf.init_params(CONFIG, seed=1))
    checkpoints.save_native(tmp_path / "hf", 1, {"x": torch.ones(1)})
    with pytest.raises(mf.CheckpointError, match=r"hf: looks like two checkpoint formats at once \(hf and native\)"):
        load_any(tmp_path / "hf")
