"""HF ⇄ Megatron conversion: bit-exact round trips, re-sharding, the on-disk layout computed by hand
(plain slicing, independent of `sharding`), transformers parity of the HF output, and bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import checkpoints
import mistral_fn as mf
from checkpoints.convert import convert
from checkpoints.megatron import SAVE_ID, save_megatron
from checkpoints.megatron_pickle import load_pt, save_pt
from mistral_fn.params import leaves_with_paths

# 8 kv heads so tp=8 works; vocab 125 is padded for tp>1 (126 at tp2, 128 at tp4/8); 4 layers split by pp=2.
CONFIG = mf.MistralConfig(vocab_size=125, dim=64, n_layers=4, n_heads=16, n_kv_heads=8, ffn_dim=96,
                          rope_theta=1e6, sliding_window=None, max_seq_len=512)
REPO = Path(__file__).resolve().parents[1]
TOP_KEYS = {"args", "checkpoint_version", "iteration", "model", "num_floating_point_operations_so_far"}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A bf16 HF directory of random weights with tokenizer files."""
    path = tmp_path_factory.mktemp("src") / "hf"
    checkpoints.save_hf(path, CONFIG, mf.init_params(CONFIG, seed=7, dtype=torch.bfloat16))
    (path / "tokenizer.model").write_bytes(b"sentencepiece-bytes")
    return path


def _same_params(a, b):
    for (pa, ta), (pb, tb) in zip(leaves_with_paths(a), leaves_with_paths(b), strict=True):
        assert pa == pb and ta.dtype == tb.dtype and torch.equal(ta, tb), pa


def _rank(ckpt, tp_rank, pp_rank, pp):
    name = f"mp_rank_{tp_rank:02d}" + (f"_{pp_rank:03d}" if pp > 1 else "")
    return ckpt / "iter_0000001" / name / "model_optim_rng.pt"


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (2, 2), (4, 1), (8, 1)])
def test_round_trip_is_bit_exact(hf_dir, tmp_path, tp, pp):
    convert("hf", "megatron", hf_dir, tmp_path / "mg", tp=tp, pp=pp)
    convert("megatron", "hf", tmp_path / "mg", tmp_path / "back")
    config, params = checkpoints.load_hf(tmp_path / "back")
    assert config == CONFIG
    _same_params(params, checkpoints.load_hf(hf_dir)[1])


def test_layout_matches_hand_sliced_megatron_tensors(hf_dir, tmp_path):
    """Rank (t, p) of a tp2-pp2 save, computed from the HF tensors with plain slicing."""
    tp, pp = 2, 2
    convert("hf", "megatron", hf_dir, tmp_path / "mg", tp=tp, pp=pp)
    hf = {path: t for path, t in leaves_with_paths(checkpoints.load_hf(hf_dir)[1])}
    hd, r = CONFIG.head_dim, CONFIG.n_heads // CONFIG.n_kv_heads
    groups, ffn, cols = CONFIG.n_kv_heads // tp, CONFIG.ffn_dim // tp, CONFIG.n_heads * hd // tp
    vp = 126  # ceil(125 / 2) * 2; the padding row copies the last real row
    for p in range(pp):
        for t in range(tp):
            state = load_pt(_rank(tmp_path / "mg", t, p, pp))
            assert set(state) == TOP_KEYS
            assert state["checkpoint_version"] == 3.0 and state["iteration"] == 1
            lm = state["model"]["language_model"]
            assert set(state["model"]) == {"language_model"}
            assert set(lm) == ({"embedding", "encoder"} if p == 0 else {"encoder", "output_layer"})
            enc = lm["encoder"]
            expected_keys = {f"layers.{j}.{k}" for j in range(2) for k in (
                "input_norm.weight", "self_attention.query_key_value.weight", "self_attention.dense.weight",
                "post_attention_norm.weight", "mlp.dense_h_to_4h.weight", "mlp.dense_4h_to_h.weight")}
            assert set(enc) == expected_keys | ({"final_norm.weight"} if p == 1 else set())
            for j in range(2):
                i = p * 2 + j
                q, k, v = (hf[f"layers/{i}/attn/{w}"] for w in ("wq", "wk", "wv"))
                rows = []
                for g in range(t * groups, (t + 1) * groups):
                    rows += [q[g * r * hd:(g + 1) * r * hd], k[g * hd:(g + 1) * hd], v[g * hd:(g + 1) * hd]]
                assert torch.equal(enc[f"layers.{j}.self_attention.query_key_value.weight"], torch.cat(rows))
                gate, up = hf[f"layers/{i}/mlp/w_gate"], hf[f"layers/{i}/mlp/w_up"]
                assert torch.equal(enc[f"layers.{j}.mlp.dense_h_to_4h.weight"],
                                   torch.cat([gate[t * ffn:(t + 1) * ffn], up[t * ffn:(t + 1) * ffn]]))
                assert torch.equal(enc[f"layers.{j}.self_attention.dense.weight"],
                                   hf[f"layers/{i}/attn/wo"][:, t * cols:(t + 1) * cols])
                assert torch.equal(enc[f"layers.{j}.mlp.dense_4h_to_h.weight"],
                                   hf[f"layers/{i}/mlp/w_down"][:, t * ffn:(t + 1) * ffn])
                assert torch.equal(enc[f"layers.{j}.input_norm.weight"], hf[f"layers/{i}/attn_norm"])
                assert torch.equal(enc[f"layers.{j}.post_attention_norm.weight"], hf[f"layers/{i}/mlp_norm"])
            for key, leaf in (("embedding", "embed"), ("output_layer", "output")):
                if key in lm:
                    weight = lm[key]["word_embeddings"]["weight"] if key == "embedding" else lm[key]["weight"]
                    padded = torch.cat([hf[leaf], hf[leaf][-1:]])
                    assert padded.shape[0] == vp and torch.equal(weight, padded[t * vp // tp:(t + 1) * vp // tp])
            if p == 1:
                assert torch.equal(enc["final_norm.weight"], hf["norm"])
            for _, x in leaves_with_paths(state["model"]):  # no file stores a whole shared storage
                assert x.untyped_storage().nbytes() == x.numel() * x.element_size()


def test_tracker_args_and_pickled_names(hf_dir, tmp_path):
    convert("hf", "megatron", hf_dir, tmp_path / "mg", tp=4, pp=1, dtype=torch.float16)
    assert (tmp_path / "mg" / "latest_checkpointed_iteration.txt").read_bytes() == b"1"
    assert sorted(p.name for p in (tmp_path / "mg" / "iter_0000001").iterdir()) == [f"mp_rank_0{t}" for t in range(4)]
    file = _rank(tmp_path / "mg", 3, 0, 1)
    assert sorted(torch.serialization.get_unsafe_globals_in_checkpoint(file)) == [
        "argparse.Namespace", "megatron.core.enums.ModelType"]
    assert "megatron" not in sys.modules
    args = vars(load_pt(file)["args"])
    expected = dict(num_layers=4, hidden_size=64, ffn_hidden_size=96, num_attention_heads=16, num_query_groups=8,
                    group_query_attention=True, kv_channels=4, padded_vocab_size=128, make_vocab_size_divisible_by=1,
                    true_vocab_size=125, vocab_size=125, norm_epsilon=1e-5, rotary_base=1e6, sliding_window=None,
                    max_position_embeddings=512, seq_length=512, params_dtype=torch.float16, fp16=True, bf16=False,
                    tensor_model_parallel_size=4, pipeline_model_parallel_size=1,
                    untie_embeddings_and_output_weights=True, swiglu=True, normalization="RMSNorm",
                    add_bias_linear=False, add_position_embedding=True, position_embedding_type="rope",
                    tokenizer_type="PretrainedFromHF", consumed_train_samples=0)
    assert {k: args[k] for k in expected} == expected
    ids = {vars(load_pt(_rank(tmp_path / "mg", t, 0, 1))["args"])[SAVE_ID] for t in range(4)}
    assert len(ids) == 1 and len(ids.pop()) == 32  # one random id, shared by the save's rank files
    assert type(args["model_type"]).__module__ == "megatron.core.enums" and args["model_type"].value == 1
    assert load_pt(file)["model"]["language_model"]["encoder"]["layers.0.input_norm.weight"].dtype == torch.float16


def test_resharding_equals_direct_conversion(hf_dir, tmp_path):
    convert("hf", "megatron", hf_dir, tmp_path / "tp2", tp=2, pp=2)
    convert("megatron", "megatron", tmp_path / "tp2", tmp_path / "tp4", tp=4)
    convert("megatron", "megatron", tmp_path / "tp4", tmp_path / "tp1", tp=1)
    convert("hf", "megatron", hf_dir, tmp_path / "direct", tp=1)
    chained, direct = load_pt(_rank(tmp_path / "tp1", 0, 0, 1)), load_pt(_rank(tmp_path / "direct", 0, 0, 1))
    assert getattr(chained["args"], SAVE_ID) != getattr(direct["args"], SAVE_ID)
    assert vars(chained["args"]) | {SAVE_ID: ""} == vars(direct["args"]) | {SAVE_ID: ""}
    a, b = leaves_with_paths(chained["model"]), leaves_with_paths(direct["model"])
    assert [p for p, _ in a] == [p for p, _ in b]
    assert all(torch.equal(x, y) and x.dtype == y.dtype for (_, x), (_, y) in zip(a, b))


def test_hf_output_loads_in_transformers_with_original_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    from tests.hf_reference import hf_model

    params = mf.init_params(CONFIG, seed=11)
    checkpoints.save_hf(tmp_path / "hf", CONFIG, params)
    convert("hf", "megatron", tmp_path / "hf", tmp_path / "mg", tp=2, pp=2)
    convert("megatron", "hf", tmp_path / "mg", tmp_path / "hf")  # an HF model dir: output goes to mg2hg/
    model = transformers.MistralForCausalLM.from_pretrained(tmp_path / "hf" / "mg2hg", attn_implementation="eager")
    tokens = torch.arange(40).view(2, 20) % CONFIG.vocab_size
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, hf_model(CONFIG, params)(tokens).logits)


def _as_modellink_wrote_it(ckpt, tp=1):
    """Rewrite the rank files as ModelLink's converter leaves them: args without rotary_base (nor
    true_vocab_size) and a training run's RNG state."""
    for t in range(tp):
        file = _rank(ckpt, t, 0, 1)
        state = load_pt(file, mmap=False)
        for name in ("rotary_base", "true_vocab_size", "vocab_size", SAVE_ID):
            delattr(state["args"], name)
        state["rng_state"] = [{"np_rng_state": np.random.get_state(), "torch_rng_state": torch.get_rng_state()}]
        save_pt(state, file)


def test_modellink_args_without_rotary_base_take_it_from_the_caller(hf_dir, tmp_path):
    """θ comes from an explicit rope base, else an HF config.json, never a default; both missing is one error."""
    convert("hf", "megatron", hf_dir, tmp_path / "mg", tp=2)
    _as_modellink_wrote_it(tmp_path / "mg", tp=2)
    tok_only = tmp_path / "tokenizer_dir"
    tok_only.mkdir()
    with pytest.raises(mf.CheckpointError, match=r"mp_rank_00/model_optim_rng.pt: args have no rotary_base \(ModelLink "
                       r"does not store it\); pass the rope base \(--rotary-base\) or an HF model directory / "
                       r"config.json to take rope_theta from \(.*tokenizer_dir has no config.json\)$"):
        checkpoints.load(tmp_path / "mg", hf_dir=tok_only)
    with pytest.raises(mf.CheckpointError, match="args have no rotary_base"):
        convert("megatron", "hf", tmp_path / "mg", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    convert("megatron", "hf", tmp_path / "mg", tmp_path / "out", hf_config=hf_dir / "config.json")
    config, params = checkpoints.load_hf(tmp_path / "out")
    assert config == CONFIG
    _same_params(params, checkpoints.load_hf(hf_dir)[1])
    # the shared loader: explicit base first, then the HF directory (as apps pass --tokenizer-name-or-path)
    assert checkpoints.load(tmp_path / "mg", rotary_base=5e5, hf_dir=hf_dir)[0] == CONFIG.replace(rope_theta=5e5)
    config, params = checkpoints.load(tmp_path / "mg", hf_dir=hf_dir)
    assert config == CONFIG
    _same_params(params, checkpoints.load_hf(hf_dir)[1])
    config, _ = checkpoints.load(tmp_path / "mg", rotary_base=1e6)
    assert config == CONFIG.replace(vocab_size=126)  # without an HF config the padded vocab is all there is


def test_a_rope_base_that_contradicts_the_stored_one_is_an_error(hf_dir, tmp_path):
    convert("hf", "megatron", hf_dir, tmp_path / "mg", tp=1)
    assert checkpoints.load(tmp_path / "mg", rotary_base=1e6)[0] == CONFIG
    with pytest.raises(mf.CheckpointError, match=r"args rotary_base=1000000.0 but the given rope base is 10000.0"):
        checkpoints.load(tmp_path / "mg", rotary_base=1e4)


def test_release_and_trained_iterations_are_read_and_kept(hf_dir, tmp_path):
    convert("hf", "megatron", hf_dir, tmp_path / "mg", tp=2)
    os.rename(tmp_path / "mg" / "iter_0000001", tmp_path / "mg" / "release")
    (tmp_path / "mg" / "latest_checkpointed_iteration.txt").write_text("release\n")
    convert("megatron", "hf", tmp_path / "mg", tmp_path / "back")
    _same_params(checkpoints.load_hf(tmp_path / "back")[1], checkpoints.load_hf(hf_dir)[1])
    convert("megatron", "megatron", tmp_path / "mg", tmp_path / "released", tp=1)
    assert (tmp_path / "released" / "latest_checkpointed_iteration.txt").read_text() == "release"
    assert load_pt(tmp_path / "released" / "release" / "mp_rank_00" / "model_optim_rng.pt")["iteration"] == 0
    ckpt = checkpoints.read_megatron(tmp_path / "released")[1]
    assert (ckpt.iteration, ckpt.step) == ("release", 0)

    # a trained checkpoint: the true iteration in the directory name, the tracker and every rank file
    save_megatron(tmp_path / "trained", CONFIG, checkpoints.load_hf(hf_dir)[1], tp=2, pp=1, iteration=1000,
                  consumed_train_samples=32000)
    assert (tmp_path / "trained" / "latest_checkpointed_iteration.txt").read_text() == "1000"
    assert [load_pt(_rank(tmp_path / "trained", t, 0, 1).parents[2] / "iter_0001000" / f"mp_rank_0{t}" /
                    "model_optim_rng.pt")["iteration"] for t in range(2)] == [1000, 1000]
    ckpt = checkpoints.read_megatron(tmp_path / "trained")[1]
    assert (ckpt.step, ckpt.consumed_train_samples) == (1000, 32000)  # what a resuming run continues from
    convert("megatron", "megatron", tmp_path / "trained", tmp_path / "resharded", tp=1)
    assert (tmp_path / "resharded" / "latest_checkpointed_iteration.txt").read_text() == "1000"
    assert load_pt(tmp_path / "resharded" / "iter_0001000" / "mp_rank_00" / "model_optim_rng.pt")["iteration"] == 1000


def test_a_tracker_that_names_another_iteration_than_the_files_is_an_error(hf_dir, tmp_path):
    convert("hf", "megatron", hf_dir, tmp_path / "mg", tp=1)
    os.rename(tmp_path / "mg" / "iter_0000001", tmp_path / "mg" / "iter_0000100")
    (tmp_path / "mg" / "latest_checkpointed_iteration.txt").write_text("100")
    with pytest.raises(mf.CheckpointError, match=r"iter_0000100/mp_rank_00/model_optim_rng.pt: stores iteration 1 "
                                                 r"but latest_checkpointed_iteration.txt names 100"):
        checkpoints.load(tmp_path / "mg")


# ---- bad input: one clear error, nothing left behind ---------------------------------------------

def _fails(tmp_path, match, *args, **kwargs):
    out = tmp_path / "out"
    with pytest.raises(mf.MistralFnError, match=match) as info:
        convert(*args, out, **kwargs)
    assert "\n" not in str(info.value)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_heads_not_divisible_by_target_tp(hf_dir, tmp_path):
    _fails(tmp_path, "n_heads=16 is not divisible by tensor-parallel size tp=3", "hf", "megatron", hf_dir, tp=3)
    _fails(tmp_path, "n_kv_heads=8 is not divisible by tensor-parallel size tp=16", "hf", "megatron", hf_dir, tp=16)
    _fails(tmp_path, "n_layers=4 is not divisible by pipeline-parallel size pp=3", "hf", "megatron", hf_dir, pp=3)


def test_hf_config_is_for_megatron_input_only(hf_dir, tmp_path):
    _fails(tmp_path, "--hf_config describes a Megatron or native input", "hf", "megatron", hf_dir, hf_config=hf_dir)


@pytest.fixture
def mg_dir(hf_dir, tmp_path):
    convert("hf", "megatron", hf_dir, tmp_path / "mg", tp=2, pp=2)
    return tmp_path / "mg"


def test_missing_rank_file(mg_dir, tmp_path):
    _rank(mg_dir, 1, 1, 2).unlink()
    _fails(tmp_path, r"mp_rank_01_001/model_optim_rng.pt: missing rank file \(args say tp=2, pp=2\)",
           "megatron", "hf", mg_dir)


def test_corrupted_rank_file_fails_midway_and_leaves_nothing(mg_dir, tmp_path):
    file = _rank(mg_dir, 1, 1, 2)  # read only once conversion has started writing
    file.write_bytes(file.read_bytes()[:1000])
    _fails(tmp_path, r"mp_rank_01_001/model_optim_rng.pt: corrupt or not a torch checkpoint", "megatron", "hf", mg_dir)
    _fails(tmp_path, r"mp_rank_01_001/model_optim_rng.pt: corrupt", "megatron", "megatron", mg_dir, tp=1)


class _Marker:
    """Unpickling this calls os.mkdir(path): the effect a malicious checkpoint would have."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_non_allow_listed_pickle_is_refused_not_executed(mg_dir, tmp_path):
    file = _rank(mg_dir, 0, 0, 2)
    state = load_pt(file, mmap=False)
    state["extra"] = _Marker(tmp_path / "marker")
    save_pt(state, file)
    _fails(tmp_path, r"mp_rank_00_000/model_optim_rng.pt: refused to unpickle global posix.mkdir",
           "megatron", "hf", mg_dir)
    assert not (tmp_path / "marker").exists()
    with pytest.raises(ModuleNotFoundError, match="megatron"):  # an unsafe load runs the pickle up to the enum
        torch.load(file, weights_only=False)
    state.pop("args")
    save_pt(state, file)
    torch.load(file, weights_only=False)  # the marker is live: an unsafe load of it does run os.mkdir
    assert (tmp_path / "marker").exists()


def test_args_that_do_not_match_the_hf_config(mg_dir, hf_dir, tmp_path):
    cfg = json.loads((hf_dir / "config.json").read_text())
    (tmp_path / "layers.json").write_text(json.dumps(dict(cfg, num_hidden_layers=2)))
    _fails(tmp_path, r"args num_layers=4 does not match the HF config's n_layers=2",
           "megatron", "hf", mg_dir, hf_config=tmp_path / "layers.json")
    (tmp_path / "theta.json").write_text(json.dumps(dict(cfg, rope_theta=1e4, rope_parameters=None)))
    _fails(tmp_path, r"args rotary_base=1000000.0 does not match the HF config's rope_theta=10000.0",
           "megatron", "hf", mg_dir, hf_config=tmp_path / "theta.json")


def test_existing_output_needs_overwrite_and_must_be_a_checkpoint_of_the_output_format(mg_dir, hf_dir, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("x")
    with pytest.raises(mf.CheckpointError, match="out: already exists; pass --overwrite"):
        convert("megatron", "hf", mg_dir, tmp_path / "out")
    with pytest.raises(mf.CheckpointError, match="out: is not an HF checkpoint; --overwrite replaces only a "
                                                 "checkpoint of the output format"):
        convert("megatron", "hf", mg_dir, tmp_path / "out", overwrite=True)
    assert (tmp_path / "out" / "keep").read_text() == "x"
    checkpoints.save_hf(tmp_path / "an_hf_model", CONFIG, mf.init_params(CONFIG))
    with pytest.raises(mf.CheckpointError, match="an_hf_model: is not a Megatron checkpoint"):
        convert("megatron", "megatron", mg_dir, tmp_path / "an_hf_model", tp=1, overwrite=True)
    assert checkpoints.load_hf(tmp_path / "an_hf_model")[0] == CONFIG
    (tmp_path / "out" / "keep").unlink()
    convert("megatron", "hf", mg_dir, tmp_path / "out", overwrite=True)  # an empty directory may be replaced
    assert checkpoints.load_hf(tmp_path / "out")[0] == CONFIG
    convert("megatron", "megatron", mg_dir, tmp_path / "mg1", tp=1)
    convert("megatron", "megatron", mg_dir, tmp_path / "mg1", tp=1, overwrite=True, dtype=torch.float32)
    assert checkpoints.load_megatron(tmp_path / "mg1")[1]["embed"].dtype == torch.float32  # and a checkpoint


# ---- the absl command ----------------------------------------------------------------------------

def _cli(*flags):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "experiments.convert_ckpt", *map(str, flags)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_cli_bad_input_is_one_line(hf_dir, tmp_path):
    """ModelLink's flags are checked with their meaning (the library's own errors are one line the same way)."""
    run = _cli("--model-type", "BERT", "--load-dir", hf_dir, "--save-dir", tmp_path / "mg")
    assert run.returncode == 1 and run.stderr.strip().splitlines() == ["error: --model-type='BERT': only GPT is supported"]
    run = _cli("--loader", "megatron", "--save-model-type", "save_huggingface_llama", "--load-dir", hf_dir,
               "--save-dir", tmp_path)
    assert run.returncode == 1 and run.stderr.strip().splitlines() == [
        f"error: --save-dir={tmp_path}: no config.json; with --save-model-type=save_huggingface_llama it must be the "
        "original HF model directory (the output goes to its mg2hg/)"]
    assert sorted(p.name for p in tmp_path.iterdir()) == []
