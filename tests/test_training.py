"""experiments.training.train in-process: where a run starts (Megatron iteration, native resume with
--no-load-optim/--no-load-rng), architecture flags against a checkpoint, and divergence as an error."""

import json

import pytest
import torch

import checkpoints
import mistral_fn as mf
import sharding
from checkpoints import native
from checkpoints.megatron import save_megatron
from experiments.architecture import Architecture
from experiments.training import TrainConfig, starting_point, train
from mistral_fn.errors import ConfigError, DivergenceError
from mistral_fn.params import leaves_with_paths

TINY = dict(model="tiny", seq_length=16, global_batch_size=2, micro_batch_size=1, lr=1e-2, lr_decay_iters=10,
            loss_chunk_size=8)


@pytest.fixture(scope="module")
def mesh():
    return sharding.Mesh({"dp": 1, "tp": 1})


def records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_megatron_load_resumes_its_iteration_unless_finetune(tmp_path, mesh):
    cfg = mf.MistralConfig.tiny()
    save_megatron(tmp_path / "mg", cfg, mf.init_params(cfg, seed=3), tp=1, pp=1, iteration=3)
    start = starting_point(TrainConfig(**TINY, load=str(tmp_path / "mg")))
    assert (start.step, start.model) == (3, cfg)
    assert starting_point(TrainConfig(**TINY, load=str(tmp_path / "mg"), finetune=True)).step == 0
    summary = train(TrainConfig(**TINY, load=str(tmp_path / "mg"), train_iters=5, metrics_file=str(tmp_path / "m")),
                    mesh)
    assert summary["start_step"] == 3 and summary["steps"] == 5
    assert [r["step"] for r in records(tmp_path / "m") if "loss" in r] == [4, 5]


def test_speed_is_recorded_when_the_last_step_is_off_the_log_interval(tmp_path, mesh):
    summary = train(TrainConfig(**TINY, train_iters=5, log_interval=2, metrics_file=str(tmp_path / "m")), mesh)
    logged = [r for r in records(tmp_path / "m") if "loss" in r]
    assert [r["step"] for r in logged] == [2, 4, 5]
    assert all(r["tokens_per_sec"] > 0 for r in logged) and summary["mean_tokens_per_sec"] > 0


def test_native_resume_no_load_optim_and_no_load_rng(tmp_path, mesh):
    train(TrainConfig(**TINY, train_iters=2, save=str(tmp_path / "a")), mesh)
    template = {"train": mf.train.init_train_state(mf.init_params(mf.MistralConfig.tiny()), mf.optim.adamw(1e-3)),
                "rng": torch.Generator().get_state()}

    def resumed(**flags):  # one more step from the step-2 checkpoint: (its loss, the saved state)
        out = tmp_path / ("_".join(flags) or "plain")
        train(TrainConfig(**TINY, train_iters=3, load=str(tmp_path / "a"), save=str(out), **flags), mesh)
        return [r["loss"] for r in records(out / "metrics.jsonl") if "loss" in r], native.load_native(out, template)[0]

    (loss, plain), (loss_no_optim, no_optim), (loss_no_rng, _) = (
        resumed(), resumed(no_load_optim=True), resumed(no_load_rng=True))
    train(TrainConfig(**TINY, train_iters=3, save=str(tmp_path / "whole")), mesh)
    whole = native.load_native(tmp_path / "whole", template)[0]
    for (p, a), (_, b) in zip(leaves_with_paths(plain), leaves_with_paths(whole), strict=True):
        assert torch.equal(a, b), p  # a plain resume is the uninterrupted run, optimizer and RNG included
    assert int(plain["train"].opt_state.count) == 3 and int(no_optim["train"].opt_state.count) == 1
    assert loss_no_optim == loss  # the same batch and parameters; only the update differs
    assert loss_no_rng != loss  # a fresh generator draws other synthetic tokens


def test_architecture_flags_are_checked_against_the_checkpoint(tmp_path):
    cfg = mf.MistralConfig.tiny()
    checkpoints.save_hf(tmp_path / "hf", cfg, mf.init_params(cfg))
    ok = Architecture(num_layers=cfg.n_layers, hidden_size=cfg.dim, num_query_groups=cfg.n_kv_heads, sliding_window=8)
    assert starting_point(TrainConfig(**TINY, load=str(tmp_path / "hf"), arch=ok)).model == cfg.replace(sliding_window=8)
    with pytest.raises(ConfigError, match=r"--ffn_hidden_size=192 does not match .*hf, which has ffn_dim=160"):
        starting_point(TrainConfig(**TINY, load=str(tmp_path / "hf"), arch=Architecture(ffn_hidden_size=192)))
    new = starting_point(TrainConfig(**TINY, arch=Architecture(num_layers=3, hidden_size=32, num_attention_heads=2,
                                                               num_query_groups=1, group_query_attention=True)))
    assert (new.model.n_layers, new.model.dim, new.model.head_dim, new.model.n_kv_heads) == (3, 32, 16, 1)


def test_a_diverging_run_is_an_error_and_latest_stays_finite(tmp_path, mesh):
    save = tmp_path / "ckpt"
    with pytest.raises(DivergenceError, match="non-finite"):
        train(TrainConfig(**{**TINY, "lr": 1e10}, train_iters=4, save=str(save), save_interval=1, clip_grad=0.0),
              mesh)
    steps = [r for r in records(save / "metrics.jsonl") if "loss" in r]
    finite = [r["step"] for r in steps if not r["skipped"]]
    assert finite and steps[-1]["skipped"] == 1
    assert native.latest_step(save) == finite[-1] == native.list_steps(save)[-1]


def test_config_errors_name_the_flag():
    with pytest.raises(ConfigError, match="--global_batch_size=3 is not divisible by micro_batch_size x dp = 2 x 1"):
        TrainConfig(**{**TINY, "global_batch_size": 3, "micro_batch_size": 2}).mesh_shape(1)
    with pytest.raises(ConfigError, match="--tensor_model_parallel_size=2 does not divide WORLD_SIZE=3"):
        TrainConfig(**TINY, tensor_model_parallel_size=2).mesh_shape(3)
    with pytest.raises(ConfigError, match="--finetune needs --load"):
        TrainConfig(**TINY, finetune=True)
