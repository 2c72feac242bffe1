"""The 7B recipes: every flagfile parses with its script's flags, the launcher builds the torchrun command, and
the whole recipe runs in the seed's order, scaled down (a trained checkpoint goes back to HF with the seed's mg2hg)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "experiments" / "recipes"
MODULES = {"convert": "experiments.convert_ckpt", "preprocess": "experiments.preprocess_data",
           "pretrain": "experiments.pretrain", "finetune": "experiments.pretrain",
           "generate": "experiments.generate", "evaluate": "experiments.evaluate"}


def _by_module():
    groups = {}
    for flagfile in sorted(RECIPES.glob("*.flags")):
        groups.setdefault(MODULES[flagfile.stem.split("_")[0]], []).append(flagfile.name)
    return groups


def test_every_recipe_has_a_script():
    assert sum(len(v) for v in _by_module().values()) == 8


@pytest.mark.slow
@pytest.mark.parametrize("module, names", sorted(_by_module().items()))
def test_flagfiles_parse(module, names):
    code = ("import sys, importlib; from absl import flags; from experiments import cli; "
            "importlib.import_module(sys.argv[1]); "
            "[flags.FLAGS(cli.normalize_argv(['prog', '--flagfile=experiments/recipes/' + n])) for n in sys.argv[2:]]; "
            "print('parsed')")
    run = subprocess.run([sys.executable, "-c", code, module, *names], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0 and "parsed" in run.stdout, run.stderr[-1500:]


@pytest.mark.slow
def test_launcher_builds_multi_node_torchrun_command():
    env = dict(os.environ, PYTHON="echo", NNODES="2", NODE_RANK="1", MASTER_ADDR="node0", GPUS_PER_NODE="8")
    run = subprocess.run(["bash", str(RECIPES / "run.sh"), "pretrain_tp8", "--train_iters=5"], cwd=ROOT,
                         capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["-m", "torch.distributed.run", "--nproc_per_node=8", "--nnodes=2", "--node_rank=1",
                                  "--master_addr=node0", "--master_port=6000", "-m", "experiments.pretrain",
                                  f"--flagfile={RECIPES / 'pretrain_tp8.flags'}", "--train_iters=5"]
    bad = subprocess.run(["bash", str(RECIPES / "run.sh"), "nope"], cwd=ROOT, capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "no recipe nope" in bad.stderr


# ---- every recipe, in the seed's order, scaled down: TP=2 under torchrun, a tiny model, tiny data ----------

SCALED = ["--num-layers=2", "--hidden-size=64", "--ffn-hidden-size=160", "--num-attention-heads=4",
          "--num-query-groups=2", "--max-position-embeddings=2048", "--tensor-model-parallel-size=2"]


def _seed_layout(root):
    """The seed's working directory: an HF model (tiny, random, the real tokenizer), the Alpaca parquet, the
    Alpaca-GPT4 JSONL and MMLU CSVs, at the relative paths the recipes name."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import shutil
    import checkpoints
    import mistral_fn as mf
    from mistral_fn.tokenizer import default_tokenizer_path

    hf = root / "model_from_hf" / "Mistral-7B-Instruct-v0.2"
    checkpoints.save_hf(hf, mf.MistralConfig.tiny(), mf.init_params(mf.MistralConfig.tiny(), seed=7),
                        tokenizer=default_tokenizer_path())
    sample = ROOT / "experiments" / "data" / "alpaca_sample.jsonl"
    rows = [json.loads(line) for line in sample.read_text(encoding="utf-8").splitlines()]
    (root / "dataset").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), root / "dataset" / "train-00000-of-00001-a09b74b3ef9c3b56.parquet")
    (root / "finetune_dataset").mkdir()
    shutil.copy(sample, root / "finetune_dataset" / "Alpaca_data_gpt4_zh.jsonl")
    shutil.copytree(ROOT / "experiments" / "data" / "mmlu", root / "mmlu")
    return hf


def _recipe(root, stage, *overrides, nproc=None, stdin=None):
    """`run.sh STAGE` from the seed's working directory `root` (torchrun with `nproc` processes)."""
    env = dict(os.environ, PYTHON=sys.executable, GPUS_PER_NODE=str(nproc or 1), MASTER_PORT=str(_free_port()),
               OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run(["bash", str(RECIPES / "run.sh"), stage, *overrides], cwd=root, env=env, input=stdin,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"{stage}: {run.stderr[-3000:]}"
    return run


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_every_recipe_runs_scaled_down(tmp_path):
    import torch
    import transformers
    import checkpoints
    import mistral_fn as mf

    hf = _seed_layout(tmp_path)
    _recipe(tmp_path, "convert_hf2mg_tp8", "--target-tensor-parallel-size=2")
    _recipe(tmp_path, "preprocess_pretrain", "--workers=2")
    _recipe(tmp_path, "preprocess_finetune", "--workers=2")
    lengths = ["--seq-length=64", "--global-batch-size=4"]
    _recipe(tmp_path, "pretrain_tp8", *SCALED, *lengths, "--train-iters=4", nproc=2)
    ckpt = tmp_path / "ckpt" / "Mistral-7B-Instruct-v0.2-tp8-pp1"
    pretrain = [json.loads(line) for line in (ckpt / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in pretrain if "loss" in r] == [2, 3, 4]  # resumes the converted iteration 1
    _recipe(tmp_path, "finetune_tp8", *SCALED, *lengths, "--train-iters=3", nproc=2)
    sft = tmp_path / "ckpt" / "Mistral-7B-Instruct-v0.2-sft-tp8-pp1"
    assert checkpoints.latest_step(sft) == 3

    _recipe(tmp_path, "convert_mg2hf")  # the trained native ckpt/ -> <HF dir>/mg2hg
    model = transformers.MistralForCausalLM.from_pretrained(hf / "mg2hg")
    _, trained = checkpoints.load(ckpt)
    state = model.state_dict()
    for path, name in checkpoints.hf_names(mf.MistralConfig.tiny()).items():
        assert torch.equal(state[name], mf.params.get_path(trained, path).to(state[name].dtype)), name
    _, original = checkpoints.load_hf(hf)
    assert not torch.equal(original["layers"][0]["attn"]["wq"], trained["layers"][0]["attn"]["wq"])

    chat = _recipe(tmp_path, "generate_tp8", *SCALED, "--max-new-tokens=8", nproc=2, stdin="how are you?\n")
    assert "user> assistant> " in chat.stdout
    evaluation = _recipe(tmp_path, "evaluate_mmlu_tp8", *SCALED, "--seq-length=2048",
                         f"--results-path={tmp_path / 'mmlu.json'}", nproc=2)
    results = json.loads((tmp_path / "mmlu.json").read_text())
    assert results["n"] == 19 and "total (micro)" in evaluation.stdout


def test_readme_flag_table_covers_every_seed_flag():
    """Every flag of the seed's commands (the recipes are their argument lists) is in the README's table."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = readme[readme.index("## Coming from ModelLink"):readme.index("## Using it from Python")]
    names = {line.split("=", 1)[0] for flagfile in RECIPES.glob("*.flags")
             for line in flagfile.read_text().splitlines() if line.startswith("--") and "flagfile" not in line}
    missing = sorted(name for name in names if f"`{name}" not in table and f", `{name}`" not in table)
    assert len(names) > 60 and not missing, missing
