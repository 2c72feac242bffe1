"""Checkpoints cross to ModelLink/Megatron and back: Megatron's own argument check accepts our files
for the seed's scripts, the seed's conversion commands run unchanged, and a trained native checkpoint
goes back to HF with the seed's mg2hg command and loads in transformers with the trained weights."""

import argparse
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import checkpoints
import mistral_fn as mf
import sharding
from checkpoints.convert import convert
from checkpoints.megatron import TRACKER, megatron_args, save_megatron
from checkpoints.megatron_pickle import load_pt
from mistral_fn import optim, train
from mistral_fn.params import leaves_with_paths
from mistral_fn.tokenizer import default_tokenizer_path
from tests.hf_reference import hf_model

REPO = Path(__file__).resolve().parents[1]
MISTRAL_7B = mf.MistralConfig.mistral_7b_instruct_v0_2()


def check_checkpoint_args(checkpoint_args, args, checkpoint_version: float) -> None:
    """Megatron-LM core_r0.6.0 `megatron/training/checkpointing.py:check_checkpoint_args`, which
    `load_checkpoint` runs unless `--finetune`; here the run's `args` and the checkpoint version are
    arguments instead of globals. Raises AssertionError with Megatron's message."""
    def compare(name, old_name=None, default=None):
        stored = (getattr(checkpoint_args, old_name or name, default) if default is not None
                  else getattr(checkpoint_args, old_name or name))
        given = getattr(args, name)
        assert stored == given, (f"{name} value from checkpoint ({stored}) is not equal to the input argument "
                                 f"value ({given}).")

    compare("num_layers")
    compare("hidden_size")
    compare("num_attention_heads")
    compare("add_position_embedding", default=True)
    if args.vocab_file:
        compare("max_position_embeddings")
        compare("make_vocab_size_divisible_by")
        if not args.use_dist_ckpt:
            compare("padded_vocab_size")
        compare("tokenizer_type")
    if args.data_parallel_random_init:
        compare("data_parallel_random_init")
    if checkpoint_version < 3.0:
        compare("tensor_model_parallel_size", old_name="model_parallel_size")
    if checkpoint_version >= 3.0 and not args.use_dist_ckpt:
        compare("tensor_model_parallel_size")
        compare("pipeline_model_parallel_size")


def seed_run_args(script: str, num_layers=32, hidden_size=4096, num_attention_heads=32, vocab=32000,
                  vocab_file=None) -> argparse.Namespace:
    """The args a run of one of the seed's ModelLink 1.0.RC2 Mistral scripts compares (examples/mistral/
    {pretrain,generate,evaluate}_mistral_7b_ptd.sh: TP 8, PP 1, --max-position-embeddings 32768,
    --make-vocab-size-divisible-by 1, --tokenizer-type PretrainedFromHF, no --no-position-embedding;
    seq-length 32768 for pretraining, 4096 otherwise). `padded_vocab_size` is what Megatron computes
    from the tokenizer's vocabulary. ModelLink's runs leave `vocab_file` unset, which skips the four
    vocabulary comparisons; passing one makes the check compare them too."""
    return argparse.Namespace(
        num_layers=num_layers, hidden_size=hidden_size, num_attention_heads=num_attention_heads,
        add_position_embedding=True, max_position_embeddings=32768, make_vocab_size_divisible_by=1,
        padded_vocab_size=sharding.padded_vocab_size(vocab, 8, 1), tokenizer_type="PretrainedFromHF",
        tensor_model_parallel_size=8, pipeline_model_parallel_size=1, seq_length=32768 if script == "pretrain" else 4096,
        vocab_file=vocab_file, use_dist_ckpt=False, data_parallel_random_init=False)


@pytest.mark.parametrize("script", ["pretrain", "generate", "evaluate"])
@pytest.mark.parametrize("vocab_file", [None, "tokenizer.model"])
def test_megatron_accepts_our_args_for_the_seed_scripts_at_7b(script, vocab_file):
    args = megatron_args(MISTRAL_7B, tp=8, pp=1, dtype=torch.bfloat16, divisible_by=1)
    check_checkpoint_args(args, seed_run_args(script, vocab_file=vocab_file), checkpoint_version=3.0)


def test_the_check_rejects_what_megatron_rejects():
    """The re-implemented check is not vacuous: the old args (`add_position_embedding=False`), a wrong
    tokenizer type or tp all fail it."""
    run = seed_run_args("generate", vocab_file="tokenizer.model")
    for field, value in (("add_position_embedding", False), ("tokenizer_type", "Llama2Tokenizer"),
                         ("tensor_model_parallel_size", 4), ("max_position_embeddings", 4096)):
        args = megatron_args(MISTRAL_7B, tp=8, pp=1, dtype=torch.bfloat16, divisible_by=1)
        setattr(args, field, value)
        with pytest.raises(AssertionError, match=f"{field} value from checkpoint"):
            check_checkpoint_args(args, run, checkpoint_version=3.0)


@pytest.mark.parametrize("script", ["pretrain", "generate", "evaluate"])
def test_megatron_accepts_a_written_checkpoint_for_the_seed_scripts(tmp_path, script):
    """A real save at the scripts' TP 8 / PP 1, positions and vocab, with the layer count scaled down;
    every rank file passes the check and carries what ModelLink's Megatron loader requires."""
    config = mf.MistralConfig(vocab_size=32000, dim=64, n_layers=2, n_heads=8, n_kv_heads=8, ffn_dim=128,
                              max_seq_len=32768)
    save_megatron(tmp_path / "mg", config, mf.init_params(config), tp=8, pp=1, dtype=torch.bfloat16, iteration=100)
    run = seed_run_args(script, num_layers=2, hidden_size=64, num_attention_heads=8, vocab_file="tokenizer.model")
    assert (tmp_path / "mg" / TRACKER).read_text() == "100"  # Megatron's read_metadata: an int > 0
    for t in range(8):
        state = load_pt(tmp_path / "mg" / "iter_0000100" / f"mp_rank_{t:02d}" / "model_optim_rng.pt")
        check_checkpoint_args(state["args"], run, state["checkpoint_version"])
        assert state["iteration"] == 100
        # ModelLink's tools/checkpoint/loader_megatron.py exits unless these args are set
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "num_layers", "hidden_size",
                     "seq_length", "num_attention_heads", "max_position_embeddings", "position_embedding_type",
                     "tokenizer_type", "params_dtype"):
            assert getattr(state["args"], name) is not None, name


# ---- native training checkpoints are read like Megatron ones ----------------------------------------

CONFIG = mf.MistralConfig(vocab_size=125, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48,
                          rope_theta=1e6, sliding_window=None, max_seq_len=256)


def trained_native_checkpoint(root, step=7, tp=2):
    """A TP=`tp` native checkpoint laid out as `experiments.pretrain` saves it, its params a few AdamW
    steps away from the seed-1 init (each rank steps its own shard, as a train step's update does)."""
    params = mf.init_params(CONFIG, seed=1)
    specs = sharding.match(params, sharding.mistral_rules(CONFIG, 8))
    opt = optim.adamw(1e-2)
    barrier = threading.Barrier(tp)

    def save(rank):
        local = sharding.shard(params, specs, {"tp": tp}, {"tp": rank})
        state = train.init_train_state(local, opt)
        grads = mf.params.tree_map(torch.ones_like, local)
        updates, opt_state = opt.update(grads, state.opt_state, local)
        state = state._replace(params=optim.apply_updates(local, updates), opt_state=opt_state)
        checkpoints.save_native(root, step, {"train": state, "rng": torch.Generator().get_state()},
                                extra={"tp": tp, "dp": 1, "config": CONFIG.to_hf()}, rank=rank, world_size=tp,
                                barrier=barrier.wait)

    threads = [threading.Thread(target=save, args=(r,)) for r in range(tp)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return checkpoints.load(root)[1]


def test_native_checkpoints_convert_to_megatron_at_their_step_and_to_hf(tmp_path):
    trained = trained_native_checkpoint(tmp_path / "ckpt")
    initial = mf.init_params(CONFIG, seed=1)
    assert not torch.equal(trained["layers"][0]["attn"]["wq"], initial["layers"][0]["attn"]["wq"])
    convert("megatron", "megatron", tmp_path / "ckpt", tmp_path / "mg", tp=2)  # ModelLink's loader name
    assert (tmp_path / "mg" / TRACKER).read_text() == "7"
    assert checkpoints.read_megatron(tmp_path / "mg")[1].step == 7
    config, params = checkpoints.load(tmp_path / "mg")
    assert config == CONFIG
    for (path, a), (_, b) in zip(leaves_with_paths(params), leaves_with_paths(trained), strict=True):
        assert torch.equal(a, b), path
    with pytest.raises(mf.CheckpointError, match="ckpt: is a native checkpoint, not hf"):
        convert("hf", "megatron", tmp_path / "ckpt", tmp_path / "x")


def test_native_training_params_are_verified_before_reading(tmp_path):
    trained_native_checkpoint(tmp_path / "ckpt")
    rank1 = tmp_path / "ckpt" / "iter_0000007" / "rank_001.safetensors"
    data = bytearray(rank1.read_bytes())
    data[-5] ^= 0xFF
    rank1.write_bytes(bytes(data))
    with pytest.raises(mf.CheckpointError, match="rank_001.safetensors: sha256 does not match"):
        checkpoints.open_checkpoint(tmp_path / "ckpt")


# ---- the seed's command lines, end to end ----------------------------------------------------------

def convert_ckpt(*argv):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "experiments.convert_ckpt", *map(str, argv)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=180)


def mg2hg(load_dir, hf_dir):
    """The seed's Megatron -> HF command (tools/checkpoint/convert_ckpt.py), flag for flag."""
    return convert_ckpt("--target-tensor-parallel-size", 1, "--target-pipeline-parallel-size", 1,
                        "--model-type", "GPT", "--loader", "megatron", "--saver", "megatron",
                        "--save-model-type", "save_huggingface_llama", "--load-dir", f"{load_dir}/",
                        "--save-dir", f"{hf_dir}/")


def hf_dir_with_tokenizer(path, config, seed):
    checkpoints.save_hf(path, config, mf.init_params(config, seed=seed, dtype=torch.bfloat16))
    (path / "tokenizer.model").write_bytes(Path(default_tokenizer_path()).read_bytes())
    return path


@pytest.mark.slow
def test_the_seed_conversion_commands_run_unchanged(tmp_path):
    config = CONFIG.replace(n_heads=16, n_kv_heads=8, dim=64)  # 8 kv heads: the seed's tp8
    hf = hf_dir_with_tokenizer(tmp_path / "model_from_hf" / "Mistral-7B-Instruct-v0.2", config, seed=5)
    mg = tmp_path / "model_weights" / "Mistral-7B-Instruct-v0.2-tp8-pp1"
    run = convert_ckpt("--model-type", "GPT", "--loader", "llama2_hf", "--saver", "megatron",
                       "--load-dir", f"{hf}/", "--save-dir", f"{mg}/", "--tokenizer-model", hf / "tokenizer.model",
                       "--target-tensor-parallel-size", 8, "--target-pipeline-parallel-size", 1)
    assert run.returncode == 0, run.stderr
    assert "wrote 120 tensors" in run.stdout and "16/16" in run.stderr  # 2 x 6 + 3 per rank; a bar by layer
    assert sorted(p.name for p in (mg / "iter_0000001").iterdir()) == [f"mp_rank_0{t}" for t in range(8)]
    run = mg2hg(mg, hf)
    assert run.returncode == 0, run.stderr
    transformers = pytest.importorskip("transformers")
    model = transformers.MistralForCausalLM.from_pretrained(hf / "mg2hg", attn_implementation="eager").float()
    tokens = torch.arange(24).view(2, 12) % config.vocab_size
    reference = hf_model(config, mf.params.cast(mf.init_params(config, seed=5, dtype=torch.bfloat16), torch.float32))
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, reference(tokens).logits)
    assert (hf / "mg2hg" / "tokenizer.model").read_bytes() == (hf / "tokenizer.model").read_bytes()
