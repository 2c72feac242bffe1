"""Conversion never destroys or poisons checkpoints: outputs never overlap inputs, rank files of two
checkpoints are never merged, float16 never overflows silently, HF index entries stay inside their
directory, non-weight files travel with the weights, and a killed save leaves nothing after the next one."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import checkpoints
import mistral_fn as mf
from checkpoints.convert import convert
from checkpoints.megatron import SAVE_ID
from checkpoints.megatron_pickle import load_pt, save_pt
from mistral_fn.errors import CheckpointError
from tests.snapshots import contents

CONFIG = mf.MistralConfig(vocab_size=125, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48,
                          rope_theta=1e6, sliding_window=None, max_seq_len=256)
REPO = Path(__file__).resolve().parents[1]
COMPANIONS = {"tokenizer.model": b"sp-bytes", "tokenizer_config.json": b'{"chat_template": "x"}',
              "generation_config.json": b'{"do_sample": true}', "chat_template.jinja": b"{{ messages }}",
              "README.md": b"# model card"}


@pytest.fixture
def hf_dir(tmp_path):
    """A bf16 HF model directory with the companion files a hub download has."""
    path = tmp_path / "hf"
    checkpoints.save_hf(path, CONFIG, mf.init_params(CONFIG, seed=3, dtype=torch.bfloat16), max_shard_bytes=20_000)
    for name, data in COMPANIONS.items():
        (path / name).write_bytes(data)
    return path


def _rank(ckpt, t):
    return ckpt / "iter_0000001" / f"mp_rank_{t:02d}" / "model_optim_rng.pt"


# ---- writes never delete what they read ----------------------------------------------------------

@pytest.mark.parametrize("overwrite", [False, True])
def test_an_output_that_overlaps_an_input_is_refused(hf_dir, tmp_path, overwrite):
    convert("hf", "megatron", hf_dir, tmp_path / "mg", tp=2)
    inputs = {"hf": contents(hf_dir), "mg": contents(tmp_path / "mg")}
    cases = [("hf", "megatron", hf_dir, hf_dir, "is"), ("hf", "hf", hf_dir, hf_dir, "is"),
             ("hf", "megatron", hf_dir, hf_dir / "sub", "lies inside"),
             ("hf", "megatron", hf_dir, tmp_path, "contains"),
             ("megatron", "megatron", tmp_path / "mg", tmp_path / "mg", "is"),
             ("megatron", "hf", tmp_path / "mg", tmp_path / "mg" / "iter_0000001", "lies inside")]
    for loader, saver, src, out, relation in cases:
        with pytest.raises(CheckpointError, match=f"the output {relation} the input {src}; writing it would delete"):
            convert(loader, saver, src, out, overwrite=overwrite)
    convert("hf", "hf", hf_dir, tmp_path / "copy")
    copied = contents(tmp_path / "copy")
    with pytest.raises(CheckpointError, match="the output contains the input .*copy/tokenizer.model"):
        convert("hf", "hf", hf_dir, tmp_path / "copy", tokenizer=tmp_path / "copy" / "tokenizer.model",
                overwrite=overwrite)
    assert {"hf": contents(hf_dir), "mg": contents(tmp_path / "mg"), "copy": contents(tmp_path / "copy")} == {
        **inputs, "copy": copied}
    assert not [p for p in tmp_path.rglob(".*partial")]


def test_mg2hg_inside_the_original_hf_directory_stays_allowed(hf_dir, tmp_path):
    convert("hf", "megatron", hf_dir, tmp_path / "mg", tp=2, dtype=torch.float16)
    before = contents(hf_dir)
    convert("megatron", "hf", tmp_path / "mg", hf_dir)
    out = hf_dir / "mg2hg"
    assert {p: d for p, d in contents(hf_dir).items() if p.split("/")[0] != "mg2hg"} == before
    # ModelLink's save_huggingface_llama: the original directory supplies config, dtype and companions
    config, params = checkpoints.load_hf(out)
    assert config == CONFIG and params["embed"].dtype == torch.bfloat16
    assert {name: (out / name).read_bytes() for name in COMPANIONS} == COMPANIONS
    with pytest.raises(CheckpointError, match="mg2hg: already exists"):
        convert("megatron", "hf", tmp_path / "mg", hf_dir)
    convert("megatron", "hf", tmp_path / "mg", hf_dir, overwrite=True)
    assert {p: d for p, d in contents(hf_dir).items() if p.split("/")[0] != "mg2hg"} == before


def test_hf_dtype_conversion_keeps_every_non_weight_file(hf_dir, tmp_path):
    convert("hf", "hf", hf_dir, tmp_path / "fp32", dtype=torch.float32)
    out = tmp_path / "fp32"
    assert {name: (out / name).read_bytes() for name in COMPANIONS} == COMPANIONS
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"
    config, params = checkpoints.load_hf(out)
    reference = mf.params.cast(checkpoints.load_hf(hf_dir)[1], torch.float32)
    for (path, a), (_, b) in zip(mf.params.leaves_with_paths(params), mf.params.leaves_with_paths(reference),
                                 strict=True):
        assert torch.equal(a, b), path


# ---- rank files of one checkpoint only -----------------------------------------------------------

def test_rank_files_of_two_checkpoints_are_refused(hf_dir, tmp_path):
    convert("hf", "megatron", hf_dir, tmp_path / "a", tp=2)
    checkpoints.save_hf(tmp_path / "other", CONFIG, mf.init_params(CONFIG, seed=4, dtype=torch.bfloat16))
    convert("hf", "megatron", tmp_path / "other", tmp_path / "b", tp=2)  # same shapes and args, other weights
    os.replace(_rank(tmp_path / "b", 1), _rank(tmp_path / "a", 1))
    message = (rf"{_rank(tmp_path / 'a', 1)}: args {SAVE_ID}='\w+' but rank 0 \({_rank(tmp_path / 'a', 0)}\) has "
               r"'\w+'; the rank files come from different checkpoints")
    with pytest.raises(CheckpointError, match=message):
        checkpoints.load(tmp_path / "a")
    with pytest.raises(CheckpointError, match="different checkpoints"):
        convert("megatron", "hf", tmp_path / "a", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_modellink_rank_files_of_two_trainings_are_refused_by_their_args(hf_dir, tmp_path):
    """Files without our save id are compared on what Megatron stores: iteration, counters, args."""
    convert("hf", "megatron", hf_dir, tmp_path / "a", tp=2)
    for t in range(2):
        state = load_pt(_rank(tmp_path / "a", t), mmap=False)
        delattr(state["args"], SAVE_ID)
        state["args"].consumed_train_samples = 64 if t == 1 else 32  # rank 1 from a later save of another run
        save_pt(state, _rank(tmp_path / "a", t))
    with pytest.raises(CheckpointError, match=r"mp_rank_01/model_optim_rng.pt: args consumed_train_samples=64 but "
                                              r"rank 0 .* has 32; the rank files come from different checkpoints"):
        checkpoints.load(tmp_path / "a")


def test_a_wrong_shape_on_any_rank_is_found_before_reading(hf_dir, tmp_path):
    convert("hf", "megatron", hf_dir, tmp_path / "a", tp=2)
    state = load_pt(_rank(tmp_path / "a", 1), mmap=False)
    encoder = state["model"]["language_model"]["encoder"]
    encoder["layers.1.mlp.dense_4h_to_h.weight"] = encoder["layers.1.mlp.dense_4h_to_h.weight"][:, :-1].clone()
    save_pt(state, _rank(tmp_path / "a", 1))
    with pytest.raises(CheckpointError, match=r"mp_rank_01/model_optim_rng.pt: model/language_model/encoder/"
                                              r"layers.1.mlp.dense_4h_to_h.weight is torch.bfloat16 \[32, 23\], "
                                              r"expected torch.bfloat16 \[32, 24\] for tp=2, pp=1"):
        checkpoints.open_checkpoint(tmp_path / "a")


# ---- float16 range, index paths --------------------------------------------------------------------

def test_fp16_conversion_refuses_weights_beyond_its_range(tmp_path):
    params = mf.init_params(CONFIG, seed=1)
    params["layers"][1]["mlp"]["w_down"][3, 5] = -1.5e5
    checkpoints.save_hf(tmp_path / "hf", CONFIG, params)
    message = r"max \|value\| 150000 is beyond float16's range \(65504\); converting would turn it into inf"
    with pytest.raises(CheckpointError, match=rf"^layers/1/mlp/w_down: {message}"):
        convert("hf", "megatron", tmp_path / "hf", tmp_path / "mg", tp=2, dtype=torch.float16)
    with pytest.raises(CheckpointError, match=rf"^model.layers.1.mlp.down_proj.weight: {message}"):
        convert("hf", "hf", tmp_path / "hf", tmp_path / "fp16", dtype=torch.float16)
    with pytest.raises(CheckpointError, match=rf"^layers/1/mlp/w_down: {message}"):
        checkpoints.load(tmp_path / "hf", dtype=torch.float16)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
    convert("hf", "megatron", tmp_path / "hf", tmp_path / "mg", tp=2, dtype=torch.bfloat16)  # bf16 holds it
    assert checkpoints.load(tmp_path / "mg")[1]["layers"][1]["mlp"]["w_down"][3, 5] == -1.5e5


@pytest.mark.parametrize("entry", ["/etc/passwd", "../outside.safetensors", "sub/../../outside.safetensors", ""])
def test_index_entries_outside_the_directory_are_refused(tmp_path, entry):
    checkpoints.save_hf(tmp_path / "hf", CONFIG, mf.init_params(CONFIG), max_shard_bytes=20_000)
    index = tmp_path / "hf" / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    first = next(iter(data["weight_map"]))
    save_file(load_file(tmp_path / "hf" / data["weight_map"][first]), tmp_path / "outside.safetensors")
    data["weight_map"][first] = entry
    index.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=rf"model.safetensors.index.json: {first} points outside the checkpoint "
                                              rf"directory \('{entry}'\)"):
        checkpoints.load_hf(tmp_path / "hf")


def test_symlinked_shards_inside_the_directory_still_load(tmp_path):
    """The hub cache links each shard to a blob elsewhere: the index entry is still a plain file name."""
    checkpoints.save_hf(tmp_path / "hf", CONFIG, mf.init_params(CONFIG, seed=2), max_shard_bytes=20_000)
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    for shard in (tmp_path / "hf").glob("model-*.safetensors"):
        os.replace(shard, blobs / shard.name)
        shard.symlink_to(blobs / shard.name)
    assert checkpoints.load_hf(tmp_path / "hf")[0] == CONFIG


# ---- kill -9 during a Megatron save --------------------------------------------------------------

KILLED_SAVE = """
import sys, time, torch
import mistral_fn as mf
from checkpoints.megatron import save_megatron
from tests.test_convert_safety import CONFIG
calls = []
def stall():  # once rank 0's file is written (rank 1 has read a layer): say so, then wait to be killed
    calls.append(1)
    if len(calls) == CONFIG.n_layers + 1:
        open(sys.argv[2], "w").close()
        time.sleep(120)
save_megatron(sys.argv[1], CONFIG, mf.init_params(CONFIG), tp=2, pp=1, on_layer=stall)
"""


@pytest.mark.slow
def test_kill_9_during_a_megatron_save_leaves_nothing_after_the_next_save(tmp_path, caplog):
    out, marker = tmp_path / "mg", tmp_path / "writing"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_SAVE, str(out), str(marker)], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    deadline = time.monotonic() + 60
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), "the save did not start"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    marker.unlink()
    partial = tmp_path / ".mg.partial"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".mg.partial"] and any(partial.rglob("*.pt"))
    with pytest.raises(CheckpointError, match="partial: unrecognised checkpoint"):  # no tracker: never loaded
        checkpoints.load(partial)
    checkpoints.save_megatron(out, CONFIG, mf.init_params(CONFIG), tp=2, pp=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mg"]
    assert any(f"{partial}, left by an interrupted write" in r.getMessage() for r in caplog.records)
    assert checkpoints.load(out)[0] == CONFIG
