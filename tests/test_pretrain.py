"""experiments.pretrain end to end: resume, TP=2 / DP=2 (gloo) against one process, accumulation, fine-tuning."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

import mistral_fn as mf
from checkpoints import native
from mistral_fn import optim, train
from mistral_fn.params import leaves_with_paths
from experiments.preprocess_data import PreprocessConfig, run
from mistral_fn.data import InstructionDataset
from mistral_fn.data.handlers import InstructionHandler
from mistral_fn.tokenizer import load_tokenizer
from tests.test_preprocess import ALPACA

TINY = ["--model=tiny", "--seq_length=32", "--lr=1e-2", "--train_iters=6", "--log_interval=1", "--global_batch_size=4",
        "--micro_batch_size=1", "--loss_chunk_size=16"]


def pretrain(*flags, nproc=1, check=True):
    """Run the script (under torchrun when `nproc` > 1); returns the completed process."""
    if nproc == 1:
        cmd = [sys.executable, "-m", "experiments.pretrain"]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={port}", "-m", "experiments.pretrain"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd + list(flags), capture_output=True, text=True, env=env, timeout=120)
    if check:
        assert done.returncode == 0, done.stderr[-2000:]
    return done


def losses(path):
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted single-process run of TINY saving every 3 steps, natively and as a Megatron
    (ModelLink) model checkpoint: (save dir, its losses)."""
    save = tmp_path_factory.mktemp("reference")
    pretrain(*TINY, f"--save={save}", "--save_interval=3", "--save_format=megatron")
    return save, losses(save / "metrics.jsonl")


@pytest.mark.slow
def test_resume_equals_uninterrupted_run_bit_for_bit_and_exit_interval_stops(tmp_path, reference):
    pretrain(*TINY, f"--load={reference[0]}/iter_0000003", f"--save={tmp_path}", "--exit_interval=5")
    assert (tmp_path / "latest").read_text() == "iter_0000005\n"
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["steps"] == 5
    assert losses(tmp_path / "metrics.jsonl") == reference[1][3:5]  # exact float equality


@pytest.mark.slow
def test_dp2_x_tp2_with_sp_zero1_and_overlap_matches_one_process(tmp_path, reference):
    """The seed's --sequence-parallel --use-distributed-optimizer --overlap-grad-reduce on a dp2 x tp2 mesh."""
    pretrain(*TINY, "--tensor_model_parallel_size=2", "--sequence-parallel", "--use-distributed-optimizer",
             "--overlap-grad-reduce", f"--metrics_file={tmp_path}/m.jsonl", nproc=4)
    got, ref = losses(tmp_path / "m.jsonl"), reference[1]
    assert len(got) == 6 and ref[-1] != ref[0]
    assert max(abs(a - b) for a, b in zip(got, ref, strict=True)) < 1e-5


@pytest.mark.slow
def test_resume_on_another_mesh_continues_the_loss_curve(tmp_path, reference):
    """Saved on one process (tp1 dp1, plain optimizer), resumed resharded on dp2 with ZeRO-1, then on tp2."""
    pretrain(*TINY, f"--load={reference[0]}/iter_0000003", f"--save={tmp_path}/zero", "--exit_interval=5",
             "--use-distributed-optimizer", nproc=2)
    meta = native.read_metadata(tmp_path / "zero", rank=1)["extra"]
    assert (meta["tp"], meta["dp"], meta["distributed_optimizer"]) == (1, 2, True)
    pretrain(*TINY, f"--load={tmp_path}/zero", f"--save={tmp_path}/zero", "--tensor_model_parallel_size=2", nproc=2)
    assert losses(tmp_path / "zero" / "metrics.jsonl") == pytest.approx(reference[1][3:], abs=1e-6)


@pytest.mark.slow
def test_flag_errors_are_one_line():
    done = pretrain(*TINY, "--global_batch_size=3", "--micro_batch_size=2", check=False)
    assert done.returncode == 1 and done.stderr.strip().splitlines()[-1].startswith("error: --global_batch_size=3")


@pytest.fixture(scope="module")
def sft_prefix(tmp_path_factory):
    prefix = tmp_path_factory.mktemp("sft") / "alpaca"
    run(PreprocessConfig(input=str(ALPACA), output_prefix=str(prefix), handler=InstructionHandler(append_eod=True),
                         tokenizer=load_tokenizer()))
    return prefix


def test_instruction_prompt_tokens_carry_no_loss(sft_prefix):
    cfg = mf.MistralConfig.tiny()
    ds = InstructionDataset(str(sft_prefix), 128, pad_id=2, split="100,0,0")
    sample = {k: torch.from_numpy(v)[None] for k, v in ds[0].items()}
    prompt = sample["loss_mask"] == 0
    assert prompt.any() and not prompt.all() and (sample["labels"][prompt] == -100).all()
    params = mf.init_params(cfg, seed=0)
    relabelled = {**sample, "labels": sample["labels"].masked_fill(prompt, 7)}  # any targets on prompt positions
    assert torch.equal(mf.loss_fn(params, relabelled, cfg), mf.loss_fn(params, sample, cfg))
    assert not torch.equal(mf.loss_fn(params, {**relabelled, "loss_mask": torch.ones_like(prompt)}, cfg),
                           mf.loss_fn(params, sample, cfg))


def test_megatron_copy_holds_the_trained_params(reference):
    from checkpoints.lazy import materialize
    from checkpoints.megatron import read_megatron
    cfg = mf.MistralConfig.tiny()
    _, source, lazy = read_megatron(reference[0] / "megatron", hf=cfg)
    assert (reference[0] / "megatron" / "latest_checkpointed_iteration.txt").read_text() == "6"
    assert (source.step, source.consumed_train_samples) == (6, 24)  # the true iteration, as Megatron resumes it
    template = {"train": train.init_train_state(mf.init_params(cfg), optim.adamw(1e-3)),
                "rng": torch.Generator().get_state()}
    saved, _ = native.load_native(reference[0], template)
    for (path, a), (_, b) in zip(leaves_with_paths(materialize(lazy)), leaves_with_paths(saved["train"].params),
                                 strict=True):
        assert torch.equal(a, b), path


@pytest.mark.slow
def test_finetune_from_megatron_checkpoint_starts_at_step_0_and_loss_falls(tmp_path, sft_prefix, reference):
    pretrain("--model=tiny", "--seq_length=128", "--global_batch_size=4", "--micro_batch_size=2", "--split=100,0,0",
             "--train_iters=12", "--lr=5e-3", f"--load={reference[0]}/megatron", "--finetune",
             "--is_instruction_dataset",
             f"--data_path={sft_prefix}", f"--save={tmp_path}", "--recompute_granularity=full", "--loss_chunk_size=64")
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert steps[0]["step"] == 1 and records[-1]["start_step"] == 0 and records[-1]["steps"] == 12
    first, last = sum(r["loss"] for r in steps[:3]) / 3, sum(r["loss"] for r in steps[-3:]) / 3
    assert last < first - 0.5, (first, last)


FLAGFILE_PROBE = """
import json, torch
from absl import flags
import mistral_fn as mf
from experiments import cli, pretrain as script
from experiments.training import schedule_and_optimizer
flags.FLAGS(cli.normalize_argv(["pretrain", "--flagfile=experiments/recipes/finetune_tp8.flags"]))
config = script.config_from_flags()
sched, _ = schedule_and_optimizer(config)
model = config.arch.check(mf.MistralConfig.mistral_7b_instruct_v0_2(), "the HF config")
print(json.dumps({"config": model.to_hf(), "mesh": config.mesh_shape(8),
                  "lr": [float(sched(torch.tensor(s))) for s in (0, 5, 10, 1000)],
                  "on": [config.finetune, config.is_instruction_dataset, config.precision, config.no_load_optim,
                         config.sequence_parallel, config.distributed_optimizer, config.eval_iters],
                  "paths": [config.load, config.save, config.data_path, config.tokenizer]}))
"""


@pytest.mark.slow
def test_7b_flagfiles_parse_into_the_seed_recipe():
    done = subprocess.run([sys.executable, "-c", FLAGFILE_PROBE], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.splitlines()[-1])
    want = mf.MistralConfig.mistral_7b_instruct_v0_2().replace(sliding_window=4096)  # --sliding-window 4096
    assert got["config"] == want.to_hf() and got["mesh"] == {"dp": 1, "tp": 8}
    assert got["lr"] == pytest.approx([0.0, 6.25e-7, 1.25e-6, 1.25e-7])  # warmup: 0.01 x 1000 = 10 steps
    assert got["on"] == [True, True, "bf16", True, True, True, 0]
    assert got["paths"] == ["./ckpt/Mistral-7B-Instruct-v0.2-tp8-pp1/", "./ckpt/Mistral-7B-Instruct-v0.2-sft-tp8-pp1/",
                            "./finetune_dataset/Mistral-7B/alpaca", "./model_from_hf/Mistral-7B-Instruct-v0.2/"]
