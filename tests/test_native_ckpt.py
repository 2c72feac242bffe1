"""Native training checkpoints: bit-exact resume, atomicity, keep-last-N, the latest pointer, clear errors."""

import functools
import logging
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest
import torch
from torch.utils import _pytree as pytree

import mistral_fn as mf
from checkpoints import native
from mistral_fn import optim, train
from mistral_fn.errors import CheckpointError
from tests.native_ranks import on_ranks

REPO = Path(__file__).resolve().parents[1]

CFG = mf.MistralConfig(vocab_size=128, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64)
OPT = optim.adamw(optim.warmup_cosine(1e-2, decay_steps=6, warmup_steps=1), b2=0.95, weight_decay=0.1,
                  mask=optim.decay_mask)
STEP = train.make_train_step(functools.partial(mf.loss_fn, config=CFG), OPT, micro_batch_size=1, max_grad_norm=1.0)


def fresh(seed=0):
    """(train state, data generator state) of a new run: what a resumed run passes as the template."""
    return {"train": train.init_train_state(mf.init_params(CFG, seed=seed), OPT),
            "rng": torch.Generator().manual_seed(1234).get_state()}


def run(ckpt, n):
    """`n` steps from `ckpt`; random batches drawn from the checkpointed generator. Returns (ckpt, losses)."""
    g = torch.Generator()
    g.set_state(ckpt["rng"])
    state, losses = ckpt["train"], []
    for _ in range(n):
        x = torch.randint(0, CFG.vocab_size, (2, 13), generator=g)
        state, m = STEP(state, {"tokens": x[:, :-1], "labels": x[:, 1:], "loss_mask": torch.ones_like(x[:, 1:])})
        losses.append(m["loss"])
    return {"train": state, "rng": g.get_state()}, losses


def test_resume_is_bit_exact(tmp_path):
    full, full_losses = run(fresh(), 6)
    half, first = run(fresh(), 3)
    native.save_native(tmp_path, int(half["train"].step), half, extra={"note": "half"})
    restored, meta = native.load_native(tmp_path, fresh(seed=99))
    assert meta["step"] == 3 and meta["extra"] == {"note": "half"}
    assert int(restored["train"].consumed_samples) == 6
    resumed, second = run(restored, 3)
    assert first + second == full_losses  # exact float equality
    for a, b in zip(pytree.tree_leaves(resumed), pytree.tree_leaves(full)):
        assert torch.equal(a, b)


def test_latest_pointer_keep_last_n_and_explicit_step(tmp_path):
    state = fresh()
    for step in (1, 2, 3, 4):
        native.save_native(tmp_path, step, state, keep=2)
    assert native.list_steps(tmp_path) == [3, 4] and native.latest_step(tmp_path) == 4
    assert (tmp_path / "latest").read_text() == "iter_0000004\n"
    _, meta = native.load_native(tmp_path, fresh(), step=3)
    assert meta["step"] == 3
    _, meta = native.load_native(tmp_path / "iter_0000003", fresh())
    assert meta["step"] == 3
    assert native.is_native(tmp_path) and not native.is_native(tmp_path / "nothing")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    native.save_native(tmp_path, 1, fresh())

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(native, "write_safetensors", broken)
    with pytest.raises(OSError, match="disk full"):
        native.save_native(tmp_path, 2, fresh())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000001", "latest", "owner.msgpack"]
    assert native.latest_step(tmp_path) == 1


def test_non_tensor_leaf_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="'lr' is a float"):
        native.save_native(tmp_path, 1, {"lr": 0.1})
    assert [p.name for p in tmp_path.iterdir()] == ["owner.msgpack"]


def test_corrupted_or_missing_files_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no 'latest' pointer"):
        native.load_native(tmp_path, fresh())
    directory = native.save_native(tmp_path, 5, fresh())
    tensors, meta = directory / "rank_000.safetensors", directory / "rank_000.msgpack"
    with pytest.raises(CheckpointError, match="rank 1"):
        native.load_native(tmp_path, fresh(), rank=1)
    with pytest.raises(CheckpointError, match="no such checkpoint iteration"):
        native.load_native(tmp_path, fresh(), step=7)

    other = {"train": train.init_train_state(mf.init_params(CFG.replace(dim=64)), OPT), "rng": fresh()["rng"]}
    with pytest.raises(CheckpointError, match=r"'train/params/embed' is torch.float32 \(128, 32\), expected"):
        native.load_native(tmp_path, other)
    smaller = fresh()
    smaller["train"] = smaller["train"]._replace(params={**smaller["train"].params, "layers": []},
                                                 opt_state=OPT.init({**smaller["train"].params, "layers": []}))
    with pytest.raises(CheckpointError, match="is not in the state being restored"):
        native.load_native(tmp_path, smaller)

    data = bytearray(tensors.read_bytes())
    data[-3] ^= 0xFF
    tensors.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256 does not match"):
        native.load_native(tmp_path, fresh())
    size = tensors.stat().st_size
    tensors.write_bytes(b"\x00" * 10)
    with pytest.raises(CheckpointError, match=f"rank_000.safetensors: 10 bytes, its metadata records {size}"):
        native.load_native(tmp_path, fresh(), verify=False)
    tensors.write_bytes(b"\x00" * size)
    with pytest.raises(CheckpointError, match="unreadable safetensors"):
        native.load_native(tmp_path, fresh(), verify=False)
    meta.write_bytes(msgpack.packb({"format": "something-else"}))
    with pytest.raises(CheckpointError, match="not a mistral_fn-native metadata file"):
        native.load_native(tmp_path, fresh())
    meta.unlink()
    with pytest.raises(CheckpointError, match="missing metadata file"):
        native.load_native(tmp_path, fresh())
    (tmp_path / "latest").write_text("garbage")
    with pytest.raises(CheckpointError, match="expected 'iter_NNNNNNN'"):
        native.load_native(tmp_path, fresh())



# ---- multi-rank saves: every rank checks the others' metadata before any tensor is used ------------

def save_ranks(root, step, world=2, extra=None, run_id=None, keep=None):
    """`world` ranks (threads sharing a barrier) save their own tree, as a torchrun job does."""
    on_ranks(world, lambda rank, barrier: native.save_native(
        root, step, {"x": torch.full((3,), float(rank + step))}, extra=extra or {"tp": world}, run_id=run_id,
        rank=rank, world_size=world, keep=keep, barrier=barrier))
    return root / native.iter_name(step)


def load_errors(root, world=2):
    """The error message each rank's load raises (None where it loads)."""
    messages = []
    for rank in range(world):
        try:
            native.load_native(root, {"x": torch.zeros(3)}, rank=rank)
            messages.append(None)
        except CheckpointError as e:
            messages.append(str(e))
    return messages


def test_ranks_from_two_runs_are_the_same_error_on_every_rank(tmp_path):
    a, b = save_ranks(tmp_path / "a", 4), save_ranks(tmp_path / "b", 4)
    loaded = [native.load_native(tmp_path / "a", {"x": torch.zeros(3)}, rank=r)[0]["x"] for r in range(2)]
    assert [x.tolist() for x in loaded] == [[4.0] * 3, [5.0] * 3]
    for name in ("rank_001.safetensors", "rank_001.msgpack"):  # rank 1 copied over from another run
        shutil.copyfile(b / name, a / name)
    errors = load_errors(tmp_path / "a")
    assert errors[0] == errors[1] and "rank_001.msgpack: run_id '" in errors[0]
    assert "different checkpoints" in errors[0] and "\n" not in errors[0]


def test_ranks_of_two_iterations_or_sizes_are_refused(tmp_path):
    save_ranks(tmp_path, 2)
    save_ranks(tmp_path, 3)
    two, three = tmp_path / "iter_0000002", tmp_path / "iter_0000003"
    shutil.copyfile(three / "rank_001.msgpack", two / "rank_001.msgpack")
    shutil.copyfile(three / "rank_001.safetensors", two / "rank_001.safetensors")
    errors = load_errors(two)
    assert errors[0] == errors[1] and "rank_001.msgpack: step 3 differs from rank 0's 2;" in errors[0]

    shutil.copyfile(three / "rank_000.msgpack", two / "rank_000.msgpack")
    assert "iter_0000002/rank_000.msgpack: holds step 3, not 2" in load_errors(two)[0]
    (three / "rank_001.msgpack").unlink()
    assert load_errors(three)[0] == load_errors(three)[1]
    assert "rank_001.msgpack: missing rank metadata; rank 0 says world_size=2" in load_errors(three)[0]
    save_ranks(tmp_path / "one", 5, world=1)
    shutil.copyfile(tmp_path / "one" / "iter_0000005" / "rank_000.msgpack",
                    tmp_path / "one" / "iter_0000005" / "rank_001.msgpack")
    assert "rank_001.msgpack: unexpected rank metadata; rank 0 says world_size=1" in load_errors(tmp_path / "one")[0]


def test_different_run_metadata_is_refused(tmp_path):
    a = save_ranks(tmp_path / "a", 1, extra={"tp": 2, "config": {"dim": 32}}, run_id="run-a")
    b = save_ranks(tmp_path / "b", 1, extra={"tp": 2, "config": {"dim": 64}}, run_id="run-a")
    for name in ("rank_001.safetensors", "rank_001.msgpack"):
        shutil.copyfile(b / name, a / name)
    errors = load_errors(a)
    assert errors[0] == errors[1] and "rank_001.msgpack: extra differs from rank 0's; the rank files" in errors[0]


def test_keep_last_deletes_only_this_runs_iterations(tmp_path):
    save_ranks(tmp_path, 50, run_id="older")  # an earlier run got further
    save_ranks(tmp_path, 60, run_id="older")
    native.write_owner(tmp_path, "newer")  # what claim_save_dir does for a new run
    for step in (10, 20, 30):
        save_ranks(tmp_path, step, run_id="newer", keep=2)
    assert native.list_steps(tmp_path) == [20, 30, 50, 60]
    assert native.latest_step(tmp_path) == 30  # the newest of this run, even though 50 and 60 are higher
    assert [native.read_metadata(tmp_path, s)["run_id"] for s in (20, 30, 50)] == ["newer", "newer", "older"]
    save_ranks(tmp_path, 40, run_id="newer", keep=1)
    assert native.list_steps(tmp_path) == [40, 50, 60] and native.latest_step(tmp_path) == 40


def test_a_save_into_a_directory_another_run_claimed_is_refused(tmp_path):
    save_ranks(tmp_path, 1, run_id="first")
    native.write_owner(tmp_path, "second")
    with pytest.raises(CheckpointError, match="owned by run second, not by this run \\(first\\)"):
        save_ranks(tmp_path, 2, run_id="first")
    assert native.list_steps(tmp_path) == [1] and native.latest_step(tmp_path) == 1


def test_a_killed_save_leaves_a_partial_that_the_next_save_sweeps(tmp_path, caplog):
    save_ranks(tmp_path, 1)
    for leftover in (".iter_0000002.partial", ".iter_0000001.old"):
        (tmp_path / leftover).mkdir()
        (tmp_path / leftover / "rank_000.safetensors").write_bytes(b"half")
    with caplog.at_level(logging.WARNING, logger="mistral_fn.atomic"):
        save_ranks(tmp_path, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000001", "iter_0000003", "latest", "owner.msgpack"]
    assert sum("interrupted write" in r.getMessage() for r in caplog.records) == 2


@pytest.mark.slow
def test_a_two_process_resume_from_mixed_ranks_fails_on_every_rank_without_hanging(tmp_path):
    """Both processes of a TP=2 resume read every rank's metadata, so each exits on its own with the same
    line (no launcher that kills the peer of a failed worker: plain processes with torchrun's variables)."""
    for run in ("a", "b"):
        save_ranks(tmp_path / run, 3, extra={"tp": 2, "dp": 1, "config": mf.MistralConfig.tiny().to_hf()})
    for name in ("rank_001.safetensors", "rank_001.msgpack"):
        shutil.copyfile(tmp_path / "b" / "iter_0000003" / name, tmp_path / "a" / "iter_0000003" / name)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "experiments.pretrain", "--model=tiny", "--seq_length=16", "--train_iters=4",
               "--global_batch_size=2", "--tensor_model_parallel_size=2", f"--load={tmp_path / 'a'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port)}
    procs = [subprocess.Popen(command, cwd=REPO, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outputs = [p.communicate(timeout=120) for p in procs]
    errors = [err.strip().splitlines()[-1] for _, err in outputs]
    assert [p.returncode for p in procs] == [1, 1] and errors[0] == errors[1], outputs
    assert errors[0].startswith("error: ") and "rank_001.msgpack: run_id" in errors[0]
    assert "different checkpoints" in errors[0]
