"""MistralConfig presets / HF mapping / validation, and deterministic parameter init."""

import json

import numpy as np
import pytest
import torch

import mistral_fn as mf
from mistral_fn.params import leaves_with_paths
from tests.snapshots import contents, one_line


def test_7b_on_meta_has_the_published_parameter_count():
    for preset in (mf.MistralConfig.mistral_7b_v0_1(), mf.MistralConfig.mistral_7b_instruct_v0_2()):
        params = mf.init_params(preset, dtype=torch.bfloat16, device="meta")
        assert mf.count_params(params) == 7_241_732_096
        assert all(t.device.type == "meta" and t.dtype == torch.bfloat16 for _, t in leaves_with_paths(params))


def test_presets_match_the_published_configs():
    v01, v02 = mf.MistralConfig.mistral_7b_v0_1(), mf.MistralConfig.mistral_7b_instruct_v0_2()
    assert (v01.sliding_window, v01.rope_theta) == (4096, 1e4)
    assert (v02.sliding_window, v02.rope_theta, v02.max_seq_len) == (None, 1e6, 32768)
    assert v02.head_dim == 128 and v02.n_rep == 4 and v02.norm_eps == 1e-5


def _hub_v02_config():
    # mistralai/Mistral-7B-Instruct-v0.2 config.json as published (rope_theta at the top level).
    return {
        "architectures": ["MistralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
        "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
        "max_position_embeddings": 32768, "model_type": "mistral", "num_attention_heads": 32,
        "num_hidden_layers": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0,
        "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
        "vocab_size": 32000,
    }


def test_from_hf_reads_both_rope_spellings(tmp_path):
    hub = _hub_v02_config()
    assert mf.MistralConfig.from_hf(hub) == mf.MistralConfig.mistral_7b_instruct_v0_2()
    v5 = dict(hub, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    del v5["rope_theta"]
    (tmp_path / "config.json").write_text(json.dumps(v5))
    assert mf.MistralConfig.from_hf(tmp_path) == mf.MistralConfig.mistral_7b_instruct_v0_2()


def test_from_hf_reads_transformers_own_output():
    transformers = pytest.importorskip("transformers")
    hf = transformers.MistralConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, vocab_size=100, sliding_window=8, rope_theta=321.0)
    cfg = mf.MistralConfig.from_hf(hf.to_dict())
    assert (cfg.rope_theta, cfg.sliding_window, cfg.head_dim, cfg.n_kv_heads) == (321.0, 8, 16, 2)
    assert mf.MistralConfig.from_hf(cfg.to_hf()) == cfg


@pytest.mark.parametrize("change, message", [
    ({"model_type": "llama"}, "unsupported model_type 'llama'"),
    ({"num_key_value_heads": 3}, "n_heads=32 is not divisible by n_kv_heads=3"),
    ({"head_dim": 127}, "head_dim=127 must be even"),
    ({"rope_scaling": {"type": "linear", "factor": 2}}, "rope scaling"),
    ({"tie_word_embeddings": True}, "tie_word_embeddings"),
    ({"hidden_size": None}, "hidden_size"),
])
def test_bad_hf_configs_are_named(change, message):
    with pytest.raises(mf.ConfigError, match=message):
        mf.MistralConfig.from_hf(dict(_hub_v02_config(), **change))


def test_missing_config_file(tmp_path):
    with pytest.raises(mf.ConfigError, match="no such HF config file"):
        mf.MistralConfig.from_hf(tmp_path)


@pytest.mark.parametrize("kwargs, message", [
    ({"n_heads": 6, "n_kv_heads": 4, "head_dim": 128}, "not divisible by n_kv_heads"),
    ({"dim": 30, "n_heads": 4, "n_kv_heads": 2}, "dim=30 is not divisible by n_heads=4"),
    ({"sliding_window": 0}, "sliding_window"),
    ({"vocab_size": 0}, "vocab_size must be a positive integer"),
    ({"rope_theta": 0.0}, "rope_theta"),
])
def test_config_validation(kwargs, message):
    with pytest.raises(mf.ConfigError, match=message):
        mf.MistralConfig(**kwargs)


def test_init_is_deterministic_and_seed_dependent():
    cfg = mf.MistralConfig.tiny()
    a, b, c = mf.init_params(cfg, seed=0), mf.init_params(cfg, seed=0), mf.init_params(cfg, seed=1)
    for (path, x), (_, y), (_, z) in zip(leaves_with_paths(a), leaves_with_paths(b), leaves_with_paths(c)):
        assert torch.equal(x, y), path
        assert x.dim() == 1 or not torch.equal(x, z), path
    # Machine-independent: each leaf is numpy PCG64 seeded by (seed, crc32(path)), scaled by 0.02.
    rng = np.random.Generator(np.random.PCG64([0, 3367442441]))  # crc32(b"layers/1/attn/wq")
    expected = torch.from_numpy(rng.standard_normal((64, 64), dtype=np.float32) * np.float32(0.02))
    assert torch.equal(a["layers"][1]["attn"]["wq"], expected)


def test_init_dtype_and_layout():
    cfg = mf.MistralConfig.tiny()
    params = mf.init_params(cfg, dtype=torch.bfloat16)
    shapes = dict(leaves_with_paths(params))
    assert shapes["layers/0/attn/wk"].shape == (cfg.n_kv_heads * cfg.head_dim, cfg.dim)
    assert shapes["layers/1/mlp/w_down"].shape == (cfg.dim, cfg.ffn_dim)
    assert all(t.dtype == torch.bfloat16 for t in shapes.values())
    assert torch.equal(shapes["norm"], torch.ones(cfg.dim, dtype=torch.bfloat16))


def test_grad_and_value_on_meta():
    cfg = mf.MistralConfig.tiny()
    params = mf.init_params(cfg, device="meta")
    tokens = torch.zeros(2, 8, dtype=torch.long, device="meta")
    batch = {"tokens": tokens, "labels": tokens, "loss_mask": torch.ones(2, 8, device="meta")}
    grads, loss = torch.func.grad_and_value(mf.loss_fn)(params, batch, cfg)
    assert loss.shape == () and grads["embed"].shape == (cfg.vocab_size, cfg.dim)


@pytest.mark.parametrize("text, message", [
    ('[{"model_type": "mistral"}]', "config.json: expected a JSON object, got a JSON list"),
    ("{'model_type': 'mistral'}", "config.json: not valid JSON"),
    ("", "config.json: not valid JSON"),
    (b'{"model_type": "mistral", "x": "\xff"}', "config.json: not valid JSON .*utf-8"),
    ({"rms_norm_eps": "abc"}, "config.json: rms_norm_eps: expected a number, got 'abc'"),
    ({"rope_theta": [1e6]}, r"config.json: rope_theta: expected a number, got \[1000000.0\]"),
    ({"hidden_size": "4096"}, "config.json: hidden_size: expected a positive integer, got '4096'"),
    ({"num_hidden_layers": True}, "config.json: num_hidden_layers: expected a positive integer, got True"),
    ({"intermediate_size": -1}, "config.json: intermediate_size: expected a positive integer, got -1"),
    ({"sliding_window": 4.5}, "config.json: sliding_window: expected a positive integer, got 4.5"),
    ({"rope_parameters": "default"}, "config.json: rope_parameters: expected a JSON object, got 'default'"),
    ({"eos_token_id": "</s>"}, "config.json: eos_token_id: expected a token id"),
    ({"vocab_size": None}, "config.json: missing required key 'vocab_size'"),
    ({"num_attention_heads": None}, "config.json: missing required key 'num_attention_heads'"),
])
def test_bad_config_json_is_one_error_naming_file_and_field(tmp_path, text, message):
    if isinstance(text, dict):
        text = json.dumps({k: v for k, v in dict(_hub_v02_config(), **text).items() if v is not None})
    (tmp_path / "config.json").write_bytes(text if isinstance(text, bytes) else text.encode())
    before = contents(tmp_path)
    with pytest.raises(mf.ConfigError, match=message) as caught:
        mf.MistralConfig.from_hf(tmp_path)
    assert one_line(caught.value).startswith(str(tmp_path / "config.json"))
    assert contents(tmp_path) == before
