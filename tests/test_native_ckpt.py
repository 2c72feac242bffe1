"""Native training checkpoints: bit-exact resume, atomicity, keep-last-N, the latest pointer, clear errors."""

import functools

import msgpack
import pytest
import torch
from torch.utils import _pytree as pytree

import mistral_fn as mf
from checkpoints import native
from mistral_fn import optim, train
from mistral_fn.errors import CheckpointError

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

    monkeypatch.setattr(native, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        native.save_native(tmp_path, 2, fresh())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000001", "latest"]
    assert native.latest_step(tmp_path) == 1


def test_non_tensor_leaf_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="'lr' is a float"):
        native.save_native(tmp_path, 1, {"lr": 0.1})
    assert list(tmp_path.iterdir()) == []


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
    tensors.write_bytes(b"\x00" * 10)
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
