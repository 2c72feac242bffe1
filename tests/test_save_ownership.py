"""`checkpoints.claim_save_dir`: a training run writes only a new directory or the native checkpoint
directory it resumes; everything else is refused with one line, the same on every rank, untouched."""

import threading

import pytest
import torch

import checkpoints
import mistral_fn as mf
from checkpoints import native
from checkpoints.megatron import save_megatron
from mistral_fn.errors import CheckpointError
from tests.snapshots import contents

CONFIG = mf.MistralConfig(vocab_size=64, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=32, max_seq_len=32)


def refused(save, match, **kwargs):
    before = contents(save) if save.exists() else None
    with pytest.raises(CheckpointError, match=match) as info:
        checkpoints.claim_save_dir(save, **kwargs)
    assert "\n" not in str(info.value)
    assert (contents(save) if save.exists() else None) == before


def test_new_or_empty_directories_are_claimed(tmp_path):
    claim = checkpoints.claim_save_dir(tmp_path / "new")
    assert claim.resume_step is None and native.read_owner(tmp_path / "new") == claim.run_id
    (tmp_path / "empty").mkdir()
    other = checkpoints.claim_save_dir(tmp_path / "empty")
    assert other.run_id != claim.run_id and native.is_native(tmp_path / "empty")


def test_foreign_directories_are_refused(tmp_path):
    checkpoints.save_hf(tmp_path / "hf", CONFIG, mf.init_params(CONFIG))
    refused(tmp_path / "hf", "hf: is an HF model directory; --save must be an empty directory or a native",
            load=tmp_path / "hf")
    save_megatron(tmp_path / "mg", CONFIG, mf.init_params(CONFIG), tp=1, pp=1)
    refused(tmp_path / "mg", "mg: is a Megatron checkpoint directory")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "notes.txt").write_text("mine")
    refused(tmp_path / "data", r"data: is not empty \('notes.txt'\) and holds no native checkpoint")
    refused(tmp_path / "data" / "notes.txt", "notes.txt: is a file; --save must be a directory")


def test_a_native_directory_is_resumed_only_when_load_names_it(tmp_path):
    save = tmp_path / "ckpt"
    first = checkpoints.claim_save_dir(save)
    for step in (3, 6):
        native.save_native(save, step, {"x": torch.ones(2)}, run_id=first.run_id)
    refused(save, r"ckpt: holds the checkpoints of an earlier run \(latest iter_0000006\); pass --load=.*ckpt to "
                  "resume it, or choose an empty --save directory")
    refused(save, "ckpt: holds the checkpoints of an earlier run", load=tmp_path / "elsewhere")
    refused(save, "ckpt: --finetune starts a new run", load=save, finetune=True)
    resumed = checkpoints.claim_save_dir(save, load=save)
    assert resumed.resume_step == 6 and resumed.run_id != first.run_id
    assert native.read_owner(save) == resumed.run_id
    assert checkpoints.claim_save_dir(save, load=save / "iter_0000003").resume_step == 3


def test_a_directory_whose_run_stopped_before_its_first_save_is_reclaimed(tmp_path):
    checkpoints.claim_save_dir(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "metrics.jsonl").write_text("{}\n")
    assert checkpoints.claim_save_dir(tmp_path / "ckpt").resume_step is None


def test_every_rank_gets_the_same_run_id_or_the_same_error(tmp_path):
    def claim_on_ranks(save, world=3, **kwargs):
        barrier, results = threading.Barrier(world), [None] * world

        def claim(rank):
            try:
                results[rank] = checkpoints.claim_save_dir(save, rank=rank, barrier=barrier.wait, **kwargs).run_id
            except CheckpointError as e:
                results[rank] = str(e)

        threads = [threading.Thread(target=claim, args=(r,)) for r in range(world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert not any(t.is_alive() for t in threads), "a rank hung"
        return results

    ids = claim_on_ranks(tmp_path / "ckpt")
    assert len(set(ids)) == 1 and ids[0] == native.read_owner(tmp_path / "ckpt")
    native.save_native(tmp_path / "ckpt", 1, {"x": torch.ones(1)}, run_id=ids[0])
    errors = claim_on_ranks(tmp_path / "ckpt")
    assert len(set(errors)) == 1 and "holds the checkpoints of an earlier run" in errors[0]
