"""LoRA: init as PEFT, step-0 identity, gradients by the chain rule, merge/unmerge, sharding rules, the PEFT
adapter files against the real `peft` library, and a train step against torch.optim.AdamW."""

import json
import math
import resource
import signal

import peft
import pytest
import torch
import transformers
from torch.utils import _pytree as pytree

import checkpoints
import mistral_fn as mf
import sharding as sh
from mistral_fn import lora
from mistral_fn.errors import CheckpointError, ConfigError
from mistral_fn.params import leaves_with_paths, tree_map
from tests.hf_reference import hf_model

CFG = mf.MistralConfig(vocab_size=300, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, rope_theta=1e6)
ALL_PEFT = list(lora.PEFT_TARGETS)


def _batch(config=CFG, batch=2, seq=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, config.vocab_size, (batch, seq + 1), generator=g)
    mask = (torch.rand(batch, seq, generator=g) > 0.2).long()
    return {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": mask}


def _trained(tree, seed=1, std=0.05):
    """`tree` with every B (and A) moved off its init, as a few training steps would: B != 0."""
    g = torch.Generator().manual_seed(seed)
    return tree_map(lambda x: x + std * torch.randn(x.shape, generator=g, dtype=x.dtype), tree)


def _loss(base, config=CFG):
    return lambda adapters, batch: mf.loss_fn(lora.apply(base, adapters), batch, config)


def _max_diff(a, b) -> float:
    return max((x - y).abs().max().item() for x, y in zip(pytree.tree_leaves(a), pytree.tree_leaves(b), strict=True))


# ---- init -----------------------------------------------------------------------------------------

def test_init_layout_and_peft_initialisation():
    params = mf.init_params(CFG, seed=0)
    tree = lora.init(params, CFG, rank=8, alpha=16, targets=["dense_4h_to_h", "query_key_value", "dense",
                                                                "dense_h_to_4h"], seed=3)
    q, kv = CFG.n_heads * CFG.head_dim, CFG.n_kv_heads * CFG.head_dim
    D, F = CFG.dim, CFG.ffn_dim
    want = {"attn/query_key_value/a": (8, D), "attn/query_key_value/wq": (q, 8), "attn/query_key_value/wk": (kv, 8),
            "attn/query_key_value/wv": (kv, 8), "attn/dense/a": (8, q), "attn/dense/wo": (D, 8),
            "mlp/dense_h_to_4h/a": (8, D), "mlp/dense_h_to_4h/w_gate": (F, 8), "mlp/dense_h_to_4h/w_up": (F, 8),
            "mlp/dense_4h_to_h/a": (8, F), "mlp/dense_4h_to_h/w_down": (D, 8)}
    expected = [(f"layers/{i}/{p}", s) for i in range(CFG.n_layers) for p, s in want.items()]
    assert [(p, tuple(x.shape)) for p, x in leaves_with_paths(tree)] == expected  # TARGETS order, not the flags'
    assert tree.alpha == 16 and tree.rank == 8 and tree.targets == list(lora.MODELLINK_TARGETS)
    assert mf.count_params(tree) == CFG.n_layers * sum(math.prod(s) for s in want.values())

    # PEFT's own init of a LoRA layer with the same fan-in is the reference for the bound of A
    ref = peft.get_peft_model(torch.nn.Sequential(torch.nn.Linear(D, q)), peft.LoraConfig(r=8, target_modules=["0"]))
    ref_a = ref.base_model.model[0].lora_A.default.weight.detach()
    gain = torch.nn.init.calculate_gain("leaky_relu", math.sqrt(5))
    bound = gain * math.sqrt(3.0 / D)
    assert ref_a.abs().max() <= bound
    for path, x in leaves_with_paths(tree):
        if path.endswith("/a"):
            fan_in = x.shape[1]
            assert x.abs().max() <= gain * math.sqrt(3.0 / fan_in) and x.abs().max() > 0.8 * gain * math.sqrt(
                3.0 / fan_in), path
            assert abs(x.std().item() / (gain / math.sqrt(fan_in)) - 1) < 0.2, path  # uniform: std = gain/sqrt(fan)
        else:
            assert not x.any(), f"{path}: B must start at zero"


def test_init_is_deterministic_per_leaf_and_runs_on_meta():
    params = mf.init_params(CFG, seed=0)
    one = lora.init(params, CFG, rank=4, alpha=8, targets=["query_key_value"], seed=5)
    two = lora.init(params, CFG, rank=4, alpha=8, targets=["dense", "query_key_value"], seed=5)
    a_path = "layers/1/attn/query_key_value/a"
    assert torch.equal(mf.params.get_path(one, a_path), mf.params.get_path(two, a_path))
    assert not torch.equal(one["layers"][0]["attn"]["query_key_value"]["a"],
                           lora.init(params, CFG, rank=4, alpha=8, targets=["query_key_value"], seed=6)["layers"][0]
                           ["attn"]["query_key_value"]["a"])
    meta = lora.init(mf.init_params(CFG, device="meta", dtype=torch.bfloat16), CFG, rank=4, alpha=8,
                     targets=ALL_PEFT, seed=0)
    real = lora.init(params, CFG, rank=4, alpha=8, targets=ALL_PEFT, seed=0)
    assert all(x.is_meta and x.dtype == torch.bfloat16 and x.shape == y.shape
               for x, y in zip(pytree.tree_leaves(meta), pytree.tree_leaves(real), strict=True))
    made_on_cpu = lora.init(mf.init_params(CFG, device="meta"), CFG, rank=4, alpha=8, targets=ALL_PEFT, seed=0,
                            device="cpu")  # the base need not exist yet (e.g. each TP rank loads its shard)
    assert _max_diff(made_on_cpu, real) == 0


@pytest.mark.parametrize("kwargs, message", [
    ({"targets": ["qkv"]}, "unknown lora target 'qkv'"),
    ({"targets": ["query_key_value", "k_proj"]}, "'query_key_value' and 'k_proj' both adapt attn/wk"),
    ({"targets": "dense"}, "must be a list of module names"),
    ({"targets": []}, "targets are empty"),
    ({"rank": 0}, "rank must be a positive integer"),
    ({"alpha": float("nan")}, "alpha must be a positive number"),
])
def test_init_errors_name_the_culprit(kwargs, message):
    args = {"rank": 4, "alpha": 8, "targets": ["dense"], **kwargs}
    with pytest.raises(ConfigError, match=message):
        lora.init(mf.init_params(CFG, device="meta"), CFG, seed=0, **args)


# ---- apply: step 0, gradients ---------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_step_zero_equals_the_base_model(dtype):
    params = mf.init_params(CFG, seed=0, dtype=dtype)
    tree = lora.init(params, CFG, rank=8, alpha=32, targets=[*lora.MODELLINK_TARGETS], seed=0)
    tokens = _batch()["tokens"]
    assert torch.equal(mf.forward(lora.apply(params, tree), tokens, CFG), mf.forward(params, tokens, CFG))


def test_gradients_equal_the_chain_rule_through_the_merged_weights():
    """d loss / dA = s * sum_leaves B^T G, d loss / dB = s * G A^T, G = the gradient of the merged model's
    loss at the merged weight (torch.func.grad of plain `loss_fn`; merged here by hand, float64)."""
    params = mf.init_params(CFG, seed=0, dtype=torch.float64)
    tree = _trained(lora.init(params, CFG, rank=4, alpha=8, targets=["query_key_value", "dense", "gate_proj",
                                                                      "down_proj"], seed=0))
    batch, s = _batch(), 8 / 4
    grads = torch.func.grad(_loss(params))(tree, batch)
    value, autograd = mf.value_and_grad(_loss(params))(tree, batch)

    merged = {**params, "layers": [{**layer, "attn": dict(layer["attn"]), "mlp": dict(layer["mlp"])}
                                   for layer in params["layers"]]}
    for i, group, _, adapter in lora.adapters(tree):
        for leaf, b in adapter.items():
            if leaf != "a":
                merged["layers"][i][group][leaf] = params["layers"][i][group][leaf] + s * b @ adapter["a"]
    g_merged = torch.func.grad(mf.loss_fn)(merged, batch, CFG)
    assert torch.allclose(value, mf.loss_fn(merged, batch, CFG), rtol=1e-12)
    for i, group, target, adapter in lora.adapters(tree):
        got = grads["layers"][i][group][target]
        g = {leaf: g_merged["layers"][i][group][leaf] for leaf in adapter if leaf != "a"}
        want = {"a": s * sum(adapter[leaf].T @ g[leaf] for leaf in g), **{leaf: s * g[leaf] @ adapter["a"].T
                                                                            for leaf in g}}
        assert got.keys() == want.keys()
        for name in want:
            ref = want[name]
            assert ((got[name] - ref).abs().max() / ref.abs().max()).item() < 1e-10, f"layers/{i}/{target}/{name}"
            assert torch.allclose(autograd["layers"][i][group][target][name], got[name], rtol=1e-10, atol=0)
    assert type(grads) is lora.LoraTree and grads.alpha == 8


def test_apply_keeps_the_base_frozen_under_autograd():
    params = tree_map(lambda x: x.requires_grad_(), mf.init_params(CFG, seed=0))
    tree = tree_map(lambda x: x.requires_grad_(), _trained(lora.init(params, CFG, rank=2, alpha=4,
                                                                    targets=["o_proj"], seed=0)))
    _loss(params)(tree, _batch()).backward()
    assert all(x.grad is None for x in pytree.tree_leaves(params))
    assert all(x.grad is not None and x.grad.any() for x in pytree.tree_leaves(tree))


def test_apply_errors_name_the_culprit():
    params = mf.init_params(CFG, seed=0)
    other = mf.MistralConfig(vocab_size=300, dim=64, n_layers=2, n_heads=4, n_kv_heads=1, ffn_dim=96)
    tree = lora.init(mf.init_params(other, device="meta"), other, rank=2, alpha=4, targets=["k_proj"], seed=0)
    with pytest.raises(ConfigError, match=r"lora layers/0/attn/wk: B \(16, 2\) @ A \(2, 64\) does not fit"):
        lora.apply(params, tree)
    with pytest.raises(ConfigError, match="expected a LoraTree"):
        lora.apply(params, dict(tree))
    deep = lora.init(params, CFG, rank=2, alpha=4, targets=["k_proj"], seed=0)
    with pytest.raises(ConfigError, match="lora adapts layers/1/attn/wk, which the params do not have"):
        lora.apply({**params, "layers": params["layers"][:1]}, deep)


# ---- merge / unmerge ------------------------------------------------------------------------------

def test_merge_unmerge_round_trip():
    params = mf.init_params(CFG, seed=0)
    tree = _trained(lora.init(params, CFG, rank=8, alpha=16, targets=[*lora.MODELLINK_TARGETS], seed=0))
    merged = lora.merge(params, tree)
    eps = torch.finfo(torch.float32).eps
    for i, group, _, adapter in lora.adapters(tree):
        for leaf, b in (kv for kv in adapter.items() if kv[0] != "a"):
            exact = params["layers"][i][group][leaf].double() + 2.0 * b.double() @ adapter["a"].double()
            assert (merged["layers"][i][group][leaf] - exact).abs().max() <= 2 * eps * exact.abs().max()
    back = lora.unmerge(merged, tree)
    for (path, x), (_, y) in zip(leaves_with_paths(back), leaves_with_paths(params), strict=True):
        if "/attn/w" in path or "/mlp/w" in path:
            assert (x - y).abs().max() <= 4 * eps * mf.params.get_path(merged, path).abs().max(), path
        else:
            assert torch.equal(x, y), path  # leaves without an adapter are untouched

    # dyadic values: every sum and product is exact in float32, so the round trip is bit-exact
    dyadic = tree_map(lambda x: torch.round(x * 64) / 64, params)
    small = tree_map(lambda x: torch.round(x * 8) / 8, tree)
    assert all(torch.equal(x, y) for x, y in zip(pytree.tree_leaves(lora.unmerge(lora.merge(dyadic, small), small)),
                                                 pytree.tree_leaves(dyadic), strict=True))


def test_merge_rounds_once_to_the_weight_dtype():
    """A bf16 base merged equals the float32 merge rounded to bf16 (the merged checkpoint loaded in bf16)."""
    params = mf.params.cast(mf.params.cast(mf.init_params(CFG, seed=0), torch.bfloat16), torch.float32)
    tree = _trained(lora.init(params, CFG, rank=8, alpha=16, targets=[*lora.MODELLINK_TARGETS], seed=0))
    bf16 = lora.merge(mf.params.cast(params, torch.bfloat16), tree)
    assert all(torch.equal(x, y) for x, y in zip(pytree.tree_leaves(bf16), pytree.tree_leaves(
        mf.params.cast(lora.merge(params, tree), torch.bfloat16)), strict=True))


# ---- sharding rules -------------------------------------------------------------------------------

def test_sharding_rules_split_a_and_b_like_megatron_and_shards_merge_to_shards():
    params = mf.init_params(CFG, seed=0)
    tree = _trained(lora.init(params, CFG, rank=4, alpha=8, targets=[*lora.MODELLINK_TARGETS], seed=0))
    rules = sh.with_lora_rules(sh.mistral_rules(CFG))
    specs = dict(leaves_with_paths(sh.match(tree, rules), is_leaf=lambda x: isinstance(x, sh.PartitionSpec)))
    hd = CFG.head_dim
    heads_col, heads_row = sh.P("tp", None, head_dim=hd), sh.P(None, "tp", head_dim=hd)  # whole heads per rank
    col, row, whole = sh.P("tp", None), sh.P(None, "tp"), sh.P(None, None)
    assert {p.split("/", 2)[2]: s for p, s in specs.items() if p.startswith("layers/1/")} == {
        "attn/query_key_value/a": whole, "attn/query_key_value/wq": heads_col, "attn/query_key_value/wk": heads_col,
        "attn/query_key_value/wv": heads_col, "attn/dense/a": heads_row, "attn/dense/wo": whole,
        "mlp/dense_h_to_4h/a": whole, "mlp/dense_h_to_4h/w_gate": col, "mlp/dense_h_to_4h/w_up": col,
        "mlp/dense_4h_to_h/a": row, "mlp/dense_4h_to_h/w_down": whole}
    peft_specs = sh.match(lora.init(params, CFG, rank=4, alpha=8, targets=ALL_PEFT, seed=0), rules)
    assert {p.split("/", 3)[3]: s for p, s in leaves_with_paths(peft_specs, is_leaf=lambda x: isinstance(
        x, sh.PartitionSpec)) if p.startswith("layers/0/")} == {
        "q_proj/a": whole, "q_proj/wq": heads_col, "k_proj/a": whole, "k_proj/wk": heads_col, "v_proj/a": whole,
        "v_proj/wv": heads_col, "o_proj/a": heads_row, "o_proj/wo": whole, "gate_proj/a": whole,
        "gate_proj/w_gate": col, "up_proj/a": whole, "up_proj/w_up": col, "down_proj/a": row, "down_proj/w_down": whole}
    sh.match(params, rules)  # the extended table still covers the parameter tree

    tp = {"tp": 2}
    tree_specs, param_specs = sh.match(tree, rules), sh.match(params, rules)
    pieces = [sh.shard(tree, tree_specs, tp, {"tp": t}) for t in range(2)]
    assert all(type(p) is lora.LoraTree and p.alpha == 8 for p in pieces)
    whole_again = sh.unshard(pieces, tree_specs, tp)
    assert type(whole_again) is lora.LoraTree and _max_diff(whole_again, tree) == 0
    merged = lora.merge(params, tree)
    for t in range(2):  # each rank's merge of its shards is its shard of the full merge
        local = lora.merge(sh.shard(params, param_specs, tp, {"tp": t}), pieces[t])
        assert _max_diff(local, sh.shard(merged, param_specs, tp, {"tp": t})) < 1e-6

    state = mf.init_train_state(tree, mf.optim.adamw(1e-3))  # a train state of adapters reshards by the same rules
    state_specs = dict(leaves_with_paths(sh.state_specs(state, rules), is_leaf=lambda x: isinstance(x, sh.P)))
    assert state_specs["opt_state/mu/layers/0/attn/dense/a"] == heads_row
    assert state_specs["params/layers/0/mlp/dense_h_to_4h/w_up"] == col and state_specs["step"] == sh.P()
    with pytest.raises(ConfigError, match=r"query_key_value/wk: 2 heads .* not divisible by mesh axis tp=4"):
        sh.shard(tree, tree_specs, {"tp": 4}, {"tp": 0})


def test_lora_rules_refuse_a_table_that_splits_a_shared_a_two_ways():
    rules = [(p, sh.P(None, "tp") if p.endswith("(wq|wk|wv)") else s) for p, s in sh.mistral_rules(CFG)]
    rules = [(r"layers/\d+/attn/wq", sh.P("tp", None))] + [(p.replace("(wq|wk|wv)", "(wk|wv)"), s) for p, s in rules]
    with pytest.raises(ConfigError, match="query_key_value: its leaves wq, wk, wv split their inputs differently"):
        sh.with_lora_rules(rules)


# ---- PEFT adapter files against the real peft library ---------------------------------------------

@pytest.mark.parametrize("targets", [list(lora.MODELLINK_TARGETS), ["q_proj", "v_proj", "down_proj"]])
def test_peft_loads_our_adapter_with_our_logits(targets, tmp_path):
    params = mf.init_params(CFG, seed=0)
    tree = _trained(lora.init(params, CFG, rank=4, alpha=16, targets=targets, seed=0))
    out = checkpoints.save_peft(tmp_path / "adapter", CFG, tree, base_model_name_or_path="base")
    settings = json.loads((out / "adapter_config.json").read_text())
    assert (settings["r"], settings["lora_alpha"], settings["base_model_name_or_path"]) == (4, 16, "base")
    tokens = _batch()["tokens"]
    model = peft.PeftModel.from_pretrained(hf_model(CFG, params), str(out)).eval()
    with torch.no_grad():
        ref = model(tokens).logits
        with model.disable_adapter():
            plain = model(tokens).logits
    ours = mf.forward(lora.apply(params, tree), tokens, CFG)
    assert (ours - ref).abs().max().item() < 1e-4
    assert (plain - ref).abs().max().item() > 1e-2  # the adapters matter at this size

    back = checkpoints.load_peft(out, CFG)  # PEFT's module names, one A per module: the same function
    assert back.targets == sorted({m for t in targets for m in _peft_modules(t)}, key=lora.PEFT_TARGETS.index)
    assert torch.allclose(mf.forward(lora.apply(params, back), tokens, CFG), ours, atol=1e-6, rtol=0)


def _peft_modules(target: str) -> list[str]:
    leaves = lora.TARGETS[target][1]
    return [name for name in lora.PEFT_TARGETS if lora.TARGETS[name][1][0] in leaves]


def test_we_load_an_adapter_written_by_peft(tmp_path):
    params = mf.init_params(CFG, seed=0)
    torch.manual_seed(0)
    model = peft.get_peft_model(hf_model(CFG, params), peft.LoraConfig(
        r=4, lora_alpha=12, target_modules=["k_proj", "o_proj", "up_proj", "down_proj"], lora_dropout=0.0))
    with torch.no_grad():
        for name, x in model.named_parameters():
            if "lora_B" in name:
                x.normal_(0, 0.05)
    model.save_pretrained(tmp_path / "adapter")
    tokens = _batch()["tokens"]
    with torch.no_grad():
        ref = model.eval()(tokens).logits
    tree = checkpoints.load_peft(tmp_path / "adapter", CFG)
    assert tree.alpha == 12 and tree.rank == 4 and tree.targets == ["k_proj", "o_proj", "up_proj", "down_proj"]
    assert (mf.forward(lora.apply(params, tree), tokens, CFG) - ref).abs().max().item() < 1e-4
    again = checkpoints.load_peft(checkpoints.save_peft(tmp_path / "again", CFG, tree), CFG, dtype=torch.float64)
    assert all(x.dtype == torch.float64 for x in pytree.tree_leaves(again)) and _max_diff(again, tree) == 0


def test_merged_model_saves_as_an_hf_dir_transformers_loads(tmp_path):
    params = mf.init_params(CFG, seed=0)
    tree = _trained(lora.init(params, CFG, rank=4, alpha=8, targets=[*lora.MODELLINK_TARGETS], seed=0))
    tokens = _batch()["tokens"]
    checkpoints.save_hf(tmp_path / "merged", CFG, lora.merge(params, tree))
    model = transformers.MistralForCausalLM.from_pretrained(tmp_path / "merged", attn_implementation="eager").eval()
    with torch.no_grad():
        ref = model(tokens).logits
    assert (mf.forward(lora.apply(params, tree), tokens, CFG) - ref).abs().max().item() < 1e-4


@pytest.mark.parametrize("edit, message", [
    (lambda d: (d / "adapter_config.json").unlink(), "adapter_config.json: missing"),
    (lambda d: _edit_config(d, use_dora=True), "use_dora=True is not supported"),
    (lambda d: _edit_config(d, use_rslora=True), "use_rslora=True is not supported"),
    (lambda d: _edit_config(d, rank_pattern={"q_proj": 8}), "rank_pattern=.* is not supported"),
    (lambda d: _edit_config(d, peft_type="IA3"), "peft_type is 'IA3', expected 'LORA'"),
    (lambda d: _edit_config(d, r=8), r"q_proj.lora_A.weight has shape \[4, 64\], expected \[8, 64\]"),
    (lambda d: _edit_tensors(d, lambda t: {**t, "base_model.model.model.layers.0.mlp.gate_proj.lora_magnitude_vector":
                                           torch.ones(96)}), "lora_magnitude_vector is not a LoRA A/B"),
    (lambda d: _edit_tensors(d, lambda t: {k: v for k, v in t.items() if "layers.1.self_attn.q_proj.lora_B" not in k}),
     "layers.1.self_attn.q_proj.lora_B.weight is missing"),
    (lambda d: (d / "adapter_model.safetensors").write_bytes(b"not safetensors"), "unreadable safetensors file"),
])
def test_load_peft_errors_name_the_culprit(edit, message, tmp_path):
    tree = lora.init(mf.init_params(CFG, seed=0), CFG, rank=4, alpha=8, targets=["q_proj"], seed=0)
    out = checkpoints.save_peft(tmp_path / "adapter", CFG, tree)
    edit(out)
    with pytest.raises(CheckpointError, match=message):
        checkpoints.load_peft(out, CFG)


def _edit_config(directory, **changes):
    path = directory / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _edit_tensors(directory, change):
    from safetensors.torch import load_file, save_file
    path = directory / "adapter_model.safetensors"
    save_file(change(load_file(path)), path)


def test_save_peft_is_atomic(tmp_path):
    tree = lora.init(mf.init_params(CFG, seed=0), CFG, rank=2, alpha=4, targets=["dense"], seed=0)
    checkpoints.save_peft(tmp_path / "adapter", CFG, tree)
    with pytest.raises(CheckpointError, match="already exists"):
        checkpoints.save_peft(tmp_path / "adapter", CFG, tree)
    shard = sh.shard(tree, sh.match(tree, sh.with_lora_rules(sh.mistral_rules(CFG))), {"tp": 2}, {"tp": 1})
    with pytest.raises(CheckpointError, match=r"layers.0.self_attn.o_proj.lora_A.weight would have shape \[2, 32\]"):
        checkpoints.save_peft(tmp_path / "shard", CFG, shard)

    limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails like a full disk
    resource.setrlimit(resource.RLIMIT_FSIZE, (100, limit[1]))
    try:
        with pytest.raises(OSError, match=r"\[Errno 27\] File too large: '.*/adapter/adapter_model.safetensors'"):
            checkpoints.save_peft(tmp_path / "adapter", CFG, _trained(tree), overwrite=True)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)
        signal.signal(signal.SIGXFSZ, handler)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no partial directory left
    assert _max_diff(checkpoints.load_peft(tmp_path / "adapter", CFG), tree) == 0  # the old one is intact


# ---- training the adapters alone ------------------------------------------------------------------

def test_train_step_trains_only_the_adapters_as_torch_adamw():
    base = mf.init_params(CFG, seed=0)
    before = tree_map(torch.clone, base)
    # moved off B = 0, where the first gradients of A are ~eps and Adam would amplify their rounding
    tree = _trained(lora.init(base, CFG, rank=4, alpha=8, targets=[*lora.MODELLINK_TARGETS], seed=0))
    batches = [_batch(seed=s) for s in range(3)]
    step = mf.make_train_step(_loss(base), mf.optim.adamw(1e-2, weight_decay=0.1), micro_batch_size=2)
    state = mf.init_train_state(tree, mf.optim.adamw(1e-2, weight_decay=0.1))
    for batch in batches:
        state, metrics = step(state, batch)

    leaves, treedef = pytree.tree_flatten(tree)
    ref = [x.clone().requires_grad_() for x in leaves]
    opt = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1)
    for batch in batches:
        opt.zero_grad()
        _loss(base)(pytree.tree_unflatten(ref, treedef), batch).backward()
        opt.step()
    assert type(state.params) is lora.LoraTree
    assert _max_diff(state.params, pytree.tree_unflatten(ref, treedef)) < 1e-6
    assert mf.count_params(state.opt_state.mu) == mf.count_params(tree)  # moments for the adapters only
    assert _max_diff(base, before) == 0
