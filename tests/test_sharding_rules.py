"""The Mistral rule table, `match`, `shard`/`unshard` and TP validation: deterministic, no processes."""

import json
import os
import pickle
import re
from pathlib import Path

import pytest
import torch

import mistral_fn as mf
import sharding as sh
from mistral_fn.errors import ConfigError
from mistral_fn.params import leaves_with_paths

SMALL = mf.MistralConfig(vocab_size=1001, dim=32, n_layers=3, n_heads=16, n_kv_heads=8, ffn_dim=48, head_dim=4,
                         sliding_window=5, max_seq_len=64)


def _megatron_local_shape(path: str, cfg: mf.MistralConfig, tp: int, divisible_by: int) -> tuple[int, ...]:
    """Megatron's per-rank shapes (shared/megatron_formats.md section 2), written out independently."""
    h, hn = cfg.dim, cfg.head_dim
    name = path.rsplit("/", 1)[-1]
    table = {
        "wq": (cfg.n_heads * hn // tp, h), "wk": (cfg.n_kv_heads * hn // tp, h), "wv": (cfg.n_kv_heads * hn // tp, h),
        "wo": (h, cfg.n_heads * hn // tp), "w_gate": (cfg.ffn_dim // tp, h), "w_up": (cfg.ffn_dim // tp, h),
        "w_down": (h, cfg.ffn_dim // tp), "attn_norm": (h,), "mlp_norm": (h,), "norm": (h,),
    }
    if name in ("embed", "output"):
        multiple = divisible_by * tp
        return (-(-cfg.vocab_size // multiple) * multiple // tp, h)
    return table[name]


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
@pytest.mark.parametrize("divisible_by", [1, 128])
def test_7b_local_shapes_are_megatrons(tp, divisible_by):
    cfg = mf.MistralConfig.mistral_7b_instruct_v0_2()
    params = mf.init_params(cfg, dtype=torch.bfloat16, device="meta")
    specs = sh.match(params, sh.mistral_rules(cfg, make_vocab_size_divisible_by=divisible_by))
    for coord in sorted({0, tp - 1}):
        local = sh.shard(params, specs, {"tp": tp}, {"tp": coord})
        for path, x in leaves_with_paths(local):
            assert tuple(x.shape) == _megatron_local_shape(path, cfg, tp, divisible_by), path
            assert x.device.type == "meta" and x.dtype == torch.bfloat16
    # ModelLink (divisor 1) never pads Mistral's 32000; Megatron's default 128 pads tp=8 to 32768.
    assert sh.padded_vocab_size(32000, tp, 1) == 32000
    assert sh.padded_vocab_size(32000, 8, 128) == 32768


def _random_tree(cfg, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return mf.params.map_with_path(
        lambda _, x: torch.randn(x.shape, generator=g).to(dtype), mf.init_params(cfg, device="meta"))


def _shard_all(tree, specs, tp):
    return [sh.shard(tree, specs, {"tp": tp}, {"tp": t}) for t in range(tp)]


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unshard_of_shard_is_bit_exact(tp, dtype):
    tree = _random_tree(SMALL, dtype, seed=tp)
    specs = sh.match(tree, sh.mistral_rules(SMALL, make_vocab_size_divisible_by=8))
    back = sh.unshard(_shard_all(tree, specs, tp), specs, {"tp": tp})
    for (path, a), (_, b) in zip(leaves_with_paths(tree), leaves_with_paths(back)):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), path


def test_unshard_of_shard_on_a_two_axis_mesh():
    g = torch.Generator().manual_seed(0)
    tree = {"m": torch.randn(6, 8, generator=g), "v": torch.randn(10, generator=g), "r": torch.randn(3, generator=g),
            "e": torch.randn(7, 4, generator=g)}
    specs = {"m": sh.P("dp", "tp"), "v": sh.P("tp"), "r": sh.P(None), "e": sh.P(None, "dp")}
    mesh = {"dp": 2, "tp": 2}
    pieces = [[sh.shard(tree, specs, mesh, {"dp": d, "tp": t}) for t in range(2)] for d in range(2)]
    assert torch.equal(pieces[1][0]["m"], tree["m"][3:, :4])
    assert torch.equal(pieces[0][1]["v"], tree["v"][5:])
    back = sh.unshard(pieces, specs, mesh)
    assert all(torch.equal(tree[k], back[k]) for k in tree)


def _indexed(cfg):
    """A tree whose every element is its own flat index, so slices can be checked by value."""
    return mf.params.map_with_path(lambda _, x: torch.arange(x.numel(), dtype=torch.float64).view(x.shape),
                                   mf.init_params(cfg, device="meta"))


def test_known_slices_by_index():
    tree = _indexed(SMALL)
    specs = sh.match(tree, sh.mistral_rules(SMALL, make_vocab_size_divisible_by=8))
    rank1 = sh.shard(tree, specs, {"tp": 2}, {"tp": 1})
    attn, full_attn, hd, dim = rank1["layers"][2]["attn"], tree["layers"][2]["attn"], SMALL.head_dim, SMALL.dim
    # rank 1 of 2 holds kv heads 4..7 (of 8) of wk and wv, query heads 8..15 (of 16) of wq and wo's columns.
    assert torch.equal(attn["wk"], full_attn["wk"].view(8, hd, dim)[4:8].reshape(-1, dim))
    assert torch.equal(attn["wv"], full_attn["wv"].view(8, hd, dim)[4:8].reshape(-1, dim))
    assert torch.equal(attn["wq"], full_attn["wq"].view(16, hd, dim)[8:16].reshape(-1, dim))
    assert torch.equal(attn["wo"], full_attn["wo"].view(dim, 16, hd)[:, 8:16].reshape(dim, -1))
    mlp, full_mlp = rank1["layers"][2]["mlp"], tree["layers"][2]["mlp"]
    assert torch.equal(mlp["w_gate"], full_mlp["w_gate"][24:48]) and torch.equal(mlp["w_up"], full_mlp["w_up"][24:48])
    assert torch.equal(mlp["w_down"], full_mlp["w_down"][:, 24:48])
    assert torch.equal(rank1["norm"], tree["norm"])
    assert torch.equal(rank1["layers"][0]["mlp_norm"], tree["layers"][0]["mlp_norm"])
    # vocab 1001, divisor 8, tp 2 -> 1008 rows: rank 1 holds ids 504..1000 and 7 copies of row 1000.
    for name in ("embed", "output"):
        assert rank1[name].shape == (504, dim)
        assert torch.equal(rank1[name][:497], tree[name][504:])
        assert torch.equal(rank1[name][497:], tree[name][1000:].expand(7, dim))


def test_shard_returns_fresh_contiguous_tensors():
    tree = _random_tree(SMALL, torch.float32, seed=0)
    specs = sh.match(tree, sh.mistral_rules(SMALL))
    local = sh.shard(tree, specs, {"tp": 2}, {"tp": 1})
    for (path, full), (_, x) in zip(leaves_with_paths(tree), leaves_with_paths(local)):
        assert x.is_contiguous() and x.untyped_storage().data_ptr() != full.untyped_storage().data_ptr(), path
        assert x.untyped_storage().nbytes() == x.numel() * x.element_size(), path


def test_every_leaf_matches_exactly_one_rule():
    tree = mf.init_params(SMALL, device="meta")
    rules = sh.mistral_rules(SMALL)
    for path, _ in leaves_with_paths(tree):
        assert sum(bool(re.fullmatch(p, path)) for p, _ in rules) == 1, path
    with pytest.raises(ConfigError, match=r"^layers/0/mlp/w_down: no sharding rule matches this leaf$"):
        sh.match(tree, [r for r in rules if "w_down" not in r[0]])
    with pytest.raises(ConfigError, match=r"^embed: matches 2 sharding rules"):
        sh.match(tree, rules + [(r"embed|norm", sh.P("tp", None))])
    with pytest.raises(ConfigError, match=r"^norm: rule 'norm' gives P\('tp', None\) for 2 dims but the leaf has 1"):
        sh.match(tree, [r for r in rules if r[0] != "norm"] + [("norm", sh.P("tp", None))])
    # fullmatch: a rule for "norm" does not also catch "layers/0/attn_norm".
    assert sh.match(tree, rules)["layers"][0]["attn_norm"] == sh.P(None)


@pytest.mark.parametrize("change, culprit", [
    ({"n_heads": 12, "n_kv_heads": 4, "dim": 48}, "n_heads=12"),
    ({"n_kv_heads": 4}, "n_kv_heads=4"),
    ({"ffn_dim": 44}, "ffn_dim=44"),
])
def test_validate_tp_names_what_does_not_divide(change, culprit):
    cfg = SMALL.replace(**change)
    with pytest.raises(ConfigError, match=rf"^{culprit} is not divisible by tensor-parallel size tp=8$"):
        sh.validate_tp(cfg, 8)


def test_validate_tp_padded_vocab_and_arguments():
    assert sh.validate_tp(SMALL, 8, make_vocab_size_divisible_by=8) == 1024
    assert sh.validate_tp(SMALL, 2) == 1002
    with pytest.raises(ConfigError, match=r"^padded vocab=1004 is not divisible by tensor-parallel size tp=8$"):
        sh.validate_tp(SMALL, 8, padded_vocab=1004)
    with pytest.raises(ConfigError, match=r"padded vocab 1000 is smaller than vocab_size=1001"):
        sh.validate_tp(SMALL, 8, padded_vocab=1000)
    for tp, div in ((0, 1), (2, 0), (2.0, 1)):
        with pytest.raises(ConfigError, match="must be a positive integer"):
            sh.validate_tp(SMALL, tp, div)


def test_shard_and_unshard_errors_name_the_culprit():
    tree = _random_tree(SMALL, torch.float32, seed=0)
    specs = sh.match(tree, sh.mistral_rules(SMALL))
    with pytest.raises(ConfigError, match=r"coordinate tp=2 is outside the mesh axis of size 2"):
        sh.shard(tree, specs, {"tp": 2}, {"tp": 2})
    with pytest.raises(ConfigError, match=r"must name exactly the mesh axes"):
        sh.shard(tree, specs, {"dp": 1, "tp": 2}, {"tp": 0})
    with pytest.raises(ConfigError, match=r"^layers/0/mlp/w_gate: dim 0 of size 48 is not divisible by mesh axis "
                                          r"tp=5$"):
        sh.shard(tree, {**specs, "embed": sh.P(None, None), "output": sh.P(None, None),
                        "layers": [{**layer, "attn": {k: sh.P(None, None) for k in layer["attn"]}}
                                   for layer in specs["layers"]]}, {"tp": 5}, {"tp": 0})
    with pytest.raises(ConfigError, match=r"^norm: spec P\('pp'\) names mesh axis 'pp'"):
        sh.shard(tree, {**specs, "norm": sh.P("pp")}, {"tp": 2}, {"tp": 0})
    with pytest.raises(ConfigError, match=r"^embed: dim 0 has 1000 rows, expected the unpadded vocab 1001"):
        sh.shard({**tree, "embed": tree["embed"][:1000]}, specs, {"tp": 2}, {"tp": 0})
    with pytest.raises(ConfigError, match="different leaves"):
        sh.shard({k: v for k, v in tree.items() if k != "norm"}, specs, {"tp": 1}, {"tp": 0})
    pieces = _shard_all(tree, specs, 2)
    with pytest.raises(ConfigError, match=r"expected a list of 4 pieces along mesh axis 'tp', got 2"):
        sh.unshard(pieces, specs, {"tp": 4})
    with pytest.raises(ConfigError, match=r"^output: the pieces hold 1000 vocab rows, expected the padded 1002"):
        sh.unshard([{**p, "output": p["output"][:500]} for p in pieces], specs, {"tp": 2})


@pytest.mark.parametrize("tp, culprit, heads, rows", [
    (4, "layers/0/attn/wk", 2, 32),  # the tiny preset: 4 query heads, 2 kv heads of 16 rows
    (8, "layers/0/attn/wq", 4, 64),
])
def test_shard_refuses_to_split_a_head(tp, culprit, heads, rows):
    cfg = mf.MistralConfig.tiny()
    tree = mf.init_params(cfg, device="meta")
    specs = sh.match(tree, sh.mistral_rules(cfg))
    with pytest.raises(ConfigError, match=rf"^{culprit}: {heads} heads \(dim 0 of size {rows}, head_dim=16\) are not "
                                          rf"divisible by mesh axis tp={tp}; a rank would hold part of a head$"):
        sh.shard(tree, specs, {"tp": tp}, {"tp": 0})
    # the same rows split without head granularity: half heads, no error (what the spec prevents)
    assert sh.shard(mf.params.get_path(tree, culprit), sh.P("tp", None), {"tp": tp}, {"tp": 0}).shape[0] == rows // tp
    wo = sh.shard(tree["layers"][0]["attn"]["wo"], specs["layers"][0]["attn"]["wo"], {"tp": 2}, {"tp": 1})
    assert wo.shape == (cfg.dim, 2 * cfg.head_dim)
    with pytest.raises(ConfigError, match=r"^x: dim 1 of size 24 is not a whole number of heads of head_dim=16$"):
        sh.shard({"x": torch.zeros(2, 24, device="meta")}, {"x": sh.P(None, "tp", head_dim=16)}, {"tp": 2}, {"tp": 0})


def test_partition_spec_rejects_bad_specs():
    with pytest.raises(ConfigError, match="same mesh axis"):
        sh.P("tp", "tp")
    with pytest.raises(ConfigError, match="mesh axis names or None"):
        sh.P(0, None)
    with pytest.raises(ConfigError, match="exactly one dim"):
        sh.P(None, None, unpadded=10)
    with pytest.raises(ConfigError, match="divisible_by=8 needs the unpadded size"):
        sh.P("tp", None, divisible_by=8)
    assert sh.P("tp", None) == sh.P("tp", None) and sh.P("tp", None) != sh.P(None, "tp")
    with pytest.raises(ConfigError, match="in heads must split exactly one unpadded dim"):
        sh.P("tp", None, unpadded=5, head_dim=2)
    with pytest.raises(ConfigError, match="head_dim must be a positive integer, got 0"):
        sh.P("tp", None, head_dim=0)
    assert sh.P("tp", None, head_dim=4) != sh.P("tp", None)
    padded = sh.P("tp", None, unpadded=5, divisible_by=2)
    assert padded != sh.P("tp", None) and pickle.loads(pickle.dumps(padded)) == padded


def test_a_single_tensor_is_a_tree():
    """Streaming converters shard one tensor at a time: a bare tensor with a bare spec."""
    x = torch.arange(10.0).view(5, 2)
    spec = sh.P("tp", None, unpadded=5, divisible_by=1)
    pieces = [sh.shard(x, spec, {"tp": 2}, {"tp": t}) for t in range(2)]
    assert torch.equal(pieces[1], torch.tensor([[6.0, 7.0], [8.0, 9.0], [8.0, 9.0]]))
    assert torch.equal(sh.unshard(pieces, spec, {"tp": 2}), x)


GOLDEN = Path(__file__).parent / "golden"


def _golden_diff(expected: dict, actual: dict) -> list[str]:
    lines = [f"{path}: missing" for path in expected if path not in actual]
    lines += [f"{path}: unexpected leaf {actual[path]}" for path in actual if path not in expected]
    for path in expected.keys() & actual.keys():
        for key in expected[path].keys() | actual[path].keys():
            if expected[path].get(key) != actual[path].get(key):
                lines.append(f"{path}: {key} expected {expected[path].get(key)}, got {actual[path].get(key)}")
    return sorted(lines)


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_7b_layout_matches_golden_dump(tp):
    """Regenerate with MISTRAL_FN_UPDATE_GOLDEN=1 after an intended change, and review the git diff."""
    cfg = mf.MistralConfig.mistral_7b_instruct_v0_2()
    actual = sh.layout(mf.init_params(cfg, dtype=torch.bfloat16, device="meta"), sh.mistral_rules(cfg), {"tp": tp})
    path = GOLDEN / f"sharding_7b_tp{tp}.json"
    if os.environ.get("MISTRAL_FN_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(exist_ok=True)
        rows = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in actual.items())
        path.write_text("{\n" + rows + "\n}\n")
    expected = json.loads(path.read_text())
    diff = _golden_diff(expected, actual)
    assert not diff, f"{path.name} differs in {len(diff)} places:\n" + "\n".join(diff[:40])
    assert list(expected) == list(actual), "leaf order differs from the golden dump"


def test_describe_prints_every_leaf_and_bytes_per_rank(capsys):
    cfg = mf.MistralConfig.mistral_7b_instruct_v0_2()
    sh.describe(mf.init_params(cfg, dtype=torch.bfloat16, device="meta"), sh.mistral_rules(cfg), {"tp": 8})
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 + 291 + 1
    assert re.fullmatch(r"layers/0/attn/wk +1024x4096 +P\('tp', None, head_dim=128\) +128x4096 +1,048,576", out[4])
    # 7,241,732,096 bf16 parameters over 8 ranks, plus 65 replicated norms' other 7/8.
    assert out[-1] == "291 leaves on mesh {'tp': 8}: 1,810,898,944 bytes (1.69 GiB) per rank"
