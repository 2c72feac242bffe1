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


# ---- the params tree checked against the config at the API boundary ---------------------------------

TINY = mf.MistralConfig.tiny()


def _api_calls(params, cfg=TINY):
    """Every public entry that takes a params tree, as thunks."""
    tokens = torch.randint(0, cfg.vocab_size, (1, 4), generator=torch.Generator().manual_seed(0))
    batch = {"tokens": tokens, "labels": tokens, "loss_mask": torch.ones(1, 4)}
    cache = mf.init_cache(mf.init_params(cfg, device="meta"), cfg, 1, 4)
    return {
        "forward": lambda: mf.forward(params, tokens, cfg),
        "hidden_states": lambda: mf.hidden_states(params, tokens, cfg),
        "loss_fn": lambda: mf.loss_fn(params, batch, cfg),
        "loss_fn chunked": lambda: mf.loss_fn(params, batch, cfg, recompute=True, chunk_size=2),
        "hidden_states_with_cache": lambda: mf.hidden_states_with_cache(params, tokens, cfg, cache, tokens * 0),
        "generate": lambda: mf.generate(params, [[1, 2]], cfg, max_new_tokens=1),
        "next_token_logits": lambda: mf.next_token_logits(params, [[1, 2]], cfg),
    }


@pytest.mark.parametrize("mutate, message", [
    (lambda t: t["layers"].pop(), "params layers: 1 layers, expected 2"),
    (lambda t: t["layers"][1]["attn"].pop("wk"), "params layers/1/attn/wk: missing"),
    (lambda t: t["layers"][0]["attn"].pop("wk"), "params layers/0/attn/wk: missing"),
    (lambda t: t.pop("norm"), "params norm: missing"),
    (lambda t: t["layers"][0]["mlp"].update(bias=torch.zeros(3)), "params layers/0/mlp/bias: unexpected"),
    (lambda t: t.update(lm_head=torch.zeros(3)), "params lm_head: unexpected"),
    (lambda t: t["layers"][0]["attn"].update(wq=torch.zeros(64, 32)),
     r"params layers/0/attn/wq: shape \(64, 32\), expected \(64, 64\)"),
    (lambda t: t["layers"][1].update(mlp_norm=torch.ones(64, 1)), r"mlp_norm: shape \(64, 1\), expected \(64,\)"),
    (lambda t: t.update(norm=[1.0] * 64), r"params norm: expected a tensor of shape \(64,\), got list"),
    (lambda t: t.update(layers=tuple(t["layers"])), "params layers: expected a list, got tuple"),
    (lambda t: t.update(output=torch.zeros(31999, 64)),
     r"params output: shape \(31999, 64\), expected \(>=32000, 64\)"),
    (lambda t: t.update(output=torch.zeros(32008, 64)), "params output: 32008 vocab rows but embed has 32000"),
])
def test_params_tree_is_checked_at_every_entry(mutate, message):
    params = mf.params.tree_map(lambda x: x, mf.init_params(TINY))  # new containers, same tensors
    mutate(params)
    for name, call in _api_calls(params).items():
        with pytest.raises(mf.ConfigError, match=message) as caught:
            call()
        assert one_line(caught.value).endswith("(config: 2 layers, dim 64, vocab 32000)"), name


def test_tp_local_shards_pass_and_wrong_shards_are_named():
    sh = pytest.importorskip("sharding")
    cfg = mf.MistralConfig(vocab_size=100, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=64)
    full = mf.init_params(cfg, device="meta")
    for tp, divisible_by in ((1, 1), (1, 8), (2, 1), (2, 8)):  # 100 rows padded to 100, 104, 100, 112
        specs = sh.match(full, sh.mistral_rules(cfg, divisible_by))
        for rank in range(tp):
            local = sh.shard(full, specs, {"tp": tp}, {"tp": rank})
            mf.params.check_params(local, cfg, tp)
    local = sh.shard(full, sh.match(full, sh.mistral_rules(cfg)), {"tp": 2}, {"tp": 0})
    with pytest.raises(mf.ConfigError, match=r"params embed: shape \(50, 64\), expected \(>=100, 64\)"):
        mf.params.check_params(local, cfg)  # a tp=2 shard passed as the whole model
    with pytest.raises(mf.ConfigError, match=r"params layers/0/attn/wq: shape \(64, 64\), expected \(32, 64\) .*tp=2"):
        mf.params.check_params(full, cfg, 2)  # whole weights passed as a tp=2 rank's
    local["layers"][1]["mlp"]["w_down"] = full["layers"][1]["mlp"]["w_down"]
    with pytest.raises(mf.ConfigError, match=r"params layers/1/mlp/w_down: shape \(64, 96\), expected \(64, 48\)"):
        mf.params.check_params(local, cfg, 2)
    with pytest.raises(mf.ConfigError, match="does not split over tp=3"):
        mf.params.check_params(full, cfg, 3)


def test_tp_split_dims_agree_with_the_sharding_rules():
    sh = pytest.importorskip("sharding")
    cfg = mf.MistralConfig.tiny()
    specs = sh.match(mf.init_params(cfg, device="meta"), sh.mistral_rules(cfg))
    for path, spec in leaves_with_paths(specs, is_leaf=lambda x: isinstance(x, sh.PartitionSpec)):
        assert spec.split_dim("tp") == mf.params.TP_SPLIT_DIMS.get(path.rsplit("/", 1)[-1]), path


def test_params_check_composes_with_transforms():
    """It reads shapes only (meta trees pass too: `test_grad_and_value_on_meta`)."""
    cfg = TINY
    params = mf.init_params(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 6), generator=torch.Generator().manual_seed(1))
    grads = torch.func.grad(lambda p: mf.forward(p, tokens, cfg).logsumexp(-1).mean())(params)
    assert grads["layers"][1]["attn"]["wq"].shape == (64, 64)
    heads = dict(params, output=torch.stack([params["output"], 2 * params["output"]]))
    in_dims = ({"embed": None, "layers": None, "norm": None, "output": 0},)
    logits = torch.func.vmap(lambda p: mf.forward(p, tokens, cfg), in_dims=in_dims)(heads)  # per-example leaf shapes
    torch.testing.assert_close(logits[1], 2 * logits[0])
    compiled = torch.compile(mf.forward, backend="eager")  # dynamo traces the check; no kernels to build
    torch.testing.assert_close(compiled(params, tokens, cfg), mf.forward(params, tokens, cfg))
    with pytest.raises(mf.ConfigError, match="params layers: 1 layers, expected 2"):
        compiled(dict(params, layers=params["layers"][:1]), tokens, cfg)
