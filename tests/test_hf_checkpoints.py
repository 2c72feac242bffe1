"""HF directories: our saves load in transformers, transformers' saves load here, bad input is named."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import checkpoints
import mistral_fn as mf
from mistral_fn.params import leaves_with_paths
from tests.hf_reference import hf_model

CONFIG = mf.MistralConfig(vocab_size=120, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48,
                          rope_theta=1e4, sliding_window=6)
TOKENS = torch.arange(30).view(2, 15) % CONFIG.vocab_size


def _assert_same_params(a, b):
    for (pa, ta), (pb, tb) in zip(leaves_with_paths(a), leaves_with_paths(b), strict=True):
        assert pa == pb and ta.dtype == tb.dtype and torch.equal(ta, tb), pa


def test_saved_dir_loads_in_transformers_with_same_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    params = mf.init_params(CONFIG, seed=3)
    checkpoints.save_hf(tmp_path / "hf", CONFIG, params)
    model = transformers.MistralForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").float()
    with torch.no_grad():
        ref = model(TOKENS).logits
    assert (mf.forward(params, TOKENS, CONFIG) - ref).abs().max().item() < 1e-4


def test_transformers_sharded_save_loads_here(tmp_path):
    params = mf.init_params(CONFIG, seed=4)
    model = hf_model(CONFIG, params)
    model.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    config, loaded = checkpoints.load_hf(tmp_path / "hf")
    assert config == CONFIG
    _assert_same_params(loaded, params)
    with torch.no_grad():
        assert (mf.forward(loaded, TOKENS, config) - model(TOKENS).logits).abs().max().item() < 1e-4


def test_sharded_round_trip_with_dtype_and_tokenizer(tmp_path):
    params = mf.init_params(CONFIG, seed=5)
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.model").write_bytes(b"sp-model-bytes")
    (tok / "tokenizer_config.json").write_text("{}")
    out = checkpoints.save_hf(tmp_path / "hf", CONFIG, params, dtype=torch.bfloat16, max_shard_bytes=8_000, tokenizer=tok)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert index["metadata"]["total_size"] == mf.count_params(params) * 2
    assert (out / "tokenizer.model").read_bytes() == b"sp-model-bytes"
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    _, loaded = checkpoints.load_hf(out)
    _assert_same_params(loaded, mf.params.cast(params, torch.bfloat16))
    _, as_f32 = checkpoints.load_hf(out, dtype=torch.float32)
    assert as_f32["embed"].dtype == torch.float32


def test_existing_output_is_not_overwritten(tmp_path):
    params = mf.init_params(CONFIG)
    checkpoints.save_hf(tmp_path / "hf", CONFIG, params)
    with pytest.raises(mf.CheckpointError, match="already exists"):
        checkpoints.save_hf(tmp_path / "hf", CONFIG, params)
    checkpoints.save_hf(tmp_path / "hf", CONFIG, mf.init_params(CONFIG, seed=9), overwrite=True)
    _assert_same_params(checkpoints.load_hf(tmp_path / "hf")[1], mf.init_params(CONFIG, seed=9))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_failed_save_leaves_nothing(tmp_path):
    params = mf.init_params(CONFIG)
    del params["layers"][1]["mlp"]["w_up"]
    with pytest.raises(mf.CheckpointError, match="layers/1/mlp/w_up"):
        checkpoints.save_hf(tmp_path / "hf", CONFIG, params)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def saved(tmp_path):
    checkpoints.save_hf(tmp_path / "hf", CONFIG, mf.init_params(CONFIG))
    return tmp_path / "hf"


def _rewrite(path, edit):
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_missing_tensor_is_named(saved):
    _rewrite(saved / "model.safetensors", lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(mf.CheckpointError, match="missing tensor model.layers.1.self_attn.k_proj.weight"):
        checkpoints.load_hf(saved)


def test_wrong_shape_is_named(saved):
    def shrink(t):
        t["model.layers.0.mlp.down_proj.weight"] = t["model.layers.0.mlp.down_proj.weight"][:, :-1].contiguous()
    _rewrite(saved / "model.safetensors", shrink)
    with pytest.raises(mf.CheckpointError, match=r"model.layers.0.mlp.down_proj.weight has shape \[32, 47\], expected \[32, 48\]"):
        checkpoints.load_hf(saved)


def test_truncated_file_is_named(saved):
    data = (saved / "model.safetensors").read_bytes()
    (saved / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(mf.CheckpointError, match="model.safetensors: unreadable safetensors file"):
        checkpoints.load_hf(saved)


def test_unknown_model_type_is_named(saved):
    cfg = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps(dict(cfg, model_type="gpt2")))
    with pytest.raises(mf.ConfigError, match="unsupported model_type 'gpt2'"):
        checkpoints.load_hf(saved)


def test_missing_shard_and_empty_dir(tmp_path):
    checkpoints.save_hf(tmp_path / "hf", CONFIG, mf.init_params(CONFIG), max_shard_bytes=8_000)
    second = sorted((tmp_path / "hf").glob("model-00002-of-*.safetensors"))[0]
    second.unlink()
    with pytest.raises(mf.CheckpointError, match=f"{second.name}: shard listed"):
        checkpoints.load_hf(tmp_path / "hf")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text(json.dumps(CONFIG.to_hf()))
    with pytest.raises(mf.CheckpointError, match="no model.safetensors"):
        checkpoints.load_hf(tmp_path / "empty")
