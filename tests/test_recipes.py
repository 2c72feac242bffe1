"""The 7B recipes: every flagfile parses with its script's flags, and the launcher builds the torchrun command."""

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
