"""Pretraining and instruction datasets, their indices, and the data-parallel batch iterator."""

import ast
import multiprocessing
import os
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

import mistral_fn as mf
from experiments.preprocess_data import PreprocessConfig, run
from mistral_fn.data import datasets
from mistral_fn.data.datasets import (GPTDataset, InstructionDataset, build_gpt_indices, iterate_batches,
                                      split_bounds)
from mistral_fn.data.handlers import InstructionHandler
from mistral_fn.data.indexed import IndexedDataset, IndexedDatasetWriter
from mistral_fn.errors import InputError
from mistral_fn.tokenizer import load_tokenizer
from tests.snapshots import contents

ROOT = Path(__file__).parent.parent
ALPACA = ROOT / "tests" / "data" / "alpaca_sample.jsonl"


def write_unique_docs(prefix, lengths):
    """Documents whose tokens are all distinct (doc k, position p → 1000 * k + p + 1), so a token names its origin."""
    with IndexedDatasetWriter(prefix) as w:
        for k, n in enumerate(lengths):
            w.add_document(1000 * k + np.arange(n) + 1)


@pytest.fixture
def corpus(tmp_path):
    lengths = np.random.default_rng(0).integers(1, 40, 30).tolist()
    lengths[7] = 0  # an empty document is skipped, not a crash
    write_unique_docs(tmp_path / "c", lengths)
    return str(tmp_path / "c"), lengths


def test_split_bounds():
    assert split_bounds("949,50,1", 1000) == {"train": (0, 949), "valid": (949, 999), "test": (999, 1000)}
    assert split_bounds("100,0,0", 7) == {"train": (0, 7), "valid": (7, 7), "test": (7, 7)}
    bounds = split_bounds("1,1,1", 10)
    assert bounds["test"][1] == 10 and bounds["train"][0] == 0
    for bad in ("a,b", "1,2,3,4", "0,0,0", "-1,2"):
        with pytest.raises(InputError, match="--split"):
            split_bounds(bad, 10)


def test_indices_deterministic_for_a_seed(corpus):
    lengths = IndexedDataset(corpus[0]).document_lengths()
    docs = np.arange(len(lengths))
    a, b, c = (build_gpt_indices(lengths, docs, 16, 50, seed) for seed in (5, 5, 6))
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    assert not np.array_equal(a["document_index"], c["document_index"])
    assert not np.array_equal(a["shuffle_index"], c["shuffle_index"])


def test_every_token_once_per_epoch(corpus, tmp_path):
    prefix, lengths = corpus
    per_epoch, seq = sum(lengths), 16
    ds = GPTDataset(prefix, seq, num_samples=(3 * per_epoch - 1) // seq, seed=3, split="1,0,0",
                    cache_dir=str(tmp_path / "cache"))
    assert len(ds) == (3 * per_epoch - 1) // seq
    windows = [ds.window(j) for j in range(len(ds))]
    assert all(len(w) == seq + 1 for w in windows)
    assert all(w[-1] == v[0] for w, v in zip(windows, windows[1:]))  # consecutive windows share one token
    stream = np.concatenate([w[:-1] for w in windows] + [windows[-1][-1:]])
    every_token = Counter(t for k, n in enumerate(lengths) for t in 1000 * k + np.arange(n) + 1)
    for epoch in range(2):
        assert Counter(stream[epoch * per_epoch:(epoch + 1) * per_epoch].tolist()) == every_token
    assert Counter(stream[2 * per_epoch:].tolist()) <= every_token
    served = sorted(tuple(ds[i]["tokens"].tolist()) + (int(ds[i]["labels"][-1]),) for i in range(len(ds)))
    assert served == sorted(tuple(w.tolist()) for w in windows)  # the shuffle serves each window once
    sample = ds[0]
    np.testing.assert_array_equal(sample["tokens"][1:], sample["labels"][:-1])
    assert sample["tokens"].dtype == np.int64 and sample["loss_mask"].tolist() == [1.0] * seq


def entries(cache):
    """The cache directory's entries: `{name: sorted file names}` (the `.lock` file as None)."""
    return {p.name: sorted(f.name for f in p.iterdir()) if p.is_dir() else None for p in sorted(cache.iterdir())}


ARRAYS = ["description.json", "document_index.npy", "sample_index.npy", "shuffle_index.npy"]


def test_index_cache_written_once(corpus, tmp_path, monkeypatch):
    prefix, _ = corpus
    cache = tmp_path / "cache"
    first = GPTDataset(prefix, 8, num_samples=40, seed=1, split="9,1,0", cache_dir=str(cache))
    (entry,) = [name for name in entries(cache) if name != ".lock"]
    assert entries(cache) == {".lock": None, entry: ARRAYS} and entry.endswith("-GPTDataset")
    stamps = {p: p.stat().st_mtime_ns for p in cache.rglob("*")}
    monkeypatch.setattr(datasets, "build_gpt_indices", lambda *a: pytest.fail("indices rebuilt despite the cache"))
    again = GPTDataset(prefix, 8, num_samples=40, seed=1, split="9,1,0", cache_dir=str(cache))
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*")} == stamps
    assert all(np.array_equal(first[i]["tokens"], again[i]["tokens"]) for i in range(len(first)))
    monkeypatch.undo()
    valid = GPTDataset(prefix, 8, seed=1, split="9,1,0", split_name="valid", cache_dir=str(cache))
    assert len(entries(cache)) == 3 and len(valid) > 0  # another split is another cache entry
    with pytest.raises(InputError, match="test part of --split 9,1,0 has no documents"):
        GPTDataset(prefix, 8, split="9,1,0", split_name="test", cache_dir=str(cache))


def test_re_preprocessed_dataset_never_reads_a_stale_index(tmp_path):
    prefix, seq = tmp_path / "data" / "c", 8
    write_unique_docs(prefix, [30, 5, 17, 40])
    old = GPTDataset(str(prefix), seq, seed=4, split="1,0,0")  # cached beside the dataset, Megatron's place
    assert len(old) == 91 // seq
    write_unique_docs(prefix, [3, 9, 4, 2])  # same prefix, same document count, other contents
    new = GPTDataset(str(prefix), seq, seed=4, split="1,0,0")
    fresh = GPTDataset(str(prefix), seq, seed=4, split="1,0,0", cache_dir=str(tmp_path / "fresh"))
    assert len(new) == len(fresh) == 17 // seq
    for i in range(len(new)):
        assert np.array_equal(new[i]["tokens"], fresh[i]["tokens"])
    cache = prefix / "cache" / "GPTDataset_indices"
    assert len(entries(cache)) == 3  # the lock and one entry per contents


def test_cache_beside_a_writable_dataset_else_in_the_user_cache_dir(tmp_path, monkeypatch):
    data = tmp_path / "shared"
    write_unique_docs(data / "c", [20, 30, 12])
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    before = contents(data)
    data.chmod(0o555)
    if os.geteuid() == 0:  # root ignores permission bits; judge by them as any other user would
        monkeypatch.setattr(os, "access", lambda path, mode, **_: bool(os.stat(path).st_mode & 0o200))
    try:
        ds = GPTDataset(str(data / "c"), 8, seed=0, split="1,0,0")
    finally:
        data.chmod(0o755)
    assert contents(data) == before  # nothing written beside a read-only dataset
    user = tmp_path / "xdg" / "mistral_fn" / "GPTDataset_indices"
    assert [name for name in entries(user) if name != ".lock"] and len(ds) == 62 // 8
    monkeypatch.undo()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    GPTDataset(str(data / "c"), 8, seed=0, split="1,0,0")  # writable now: the complete entry is still found
    assert not (data / "c").exists()
    GPTDataset(str(data / "c"), 8, seed=1, split="1,0,0")  # a new entry goes beside the dataset
    assert len(entries(data / "c" / "cache" / "GPTDataset_indices")) == 2


def test_a_killed_builders_partial_entry_is_swept(corpus, tmp_path, caplog):
    prefix, _ = corpus
    GPTDataset(prefix, 8, seed=0, split="1,0,0", cache_dir=str(tmp_path / "a"))
    (entry,) = [name for name in entries(tmp_path / "a") if name != ".lock"]
    partial = tmp_path / "b" / f".{entry}.partial"
    partial.mkdir(parents=True)
    (partial / "document_index.npy").write_bytes(b"half written")
    with caplog.at_level("WARNING", logger="mistral_fn.atomic"):
        ds = GPTDataset(prefix, 8, seed=0, split="1,0,0", cache_dir=str(tmp_path / "b"))
    assert entries(tmp_path / "b") == {".lock": None, entry: ARRAYS} and len(ds) > 0
    assert any("interrupted write" in r.getMessage() for r in caplog.records)


def _build_concurrently(args):
    prefix, cache, barrier, log = args
    original = datasets.build_gpt_indices

    def slow_build(*a):
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(0.5)  # long enough for the other ranks to arrive while this one builds
        return original(*a)

    datasets.build_gpt_indices = slow_build
    barrier.wait()
    ds = GPTDataset(prefix, 8, num_samples=50, seed=3, split="1,0,0", cache_dir=cache)
    return [ds[i]["tokens"].tolist() for i in range(len(ds))]


@pytest.mark.slow
def test_data_parallel_ranks_building_one_cache_at_once(corpus, tmp_path):
    ctx = multiprocessing.get_context("fork")
    barrier, log = ctx.Manager().Barrier(3), tmp_path / "builds.log"
    with ctx.Pool(3) as pool:
        results = pool.map(_build_concurrently, [(corpus[0], str(tmp_path / "cache"), barrier, log)] * 3)
    assert results[0] == results[1] == results[2] and len(results[0]) == 50
    assert len(log.read_text().split()) == 1  # one rank built, the others waited and read
    assert [name for name, files in entries(tmp_path / "cache").items() if files != ARRAYS] == [".lock"]


def test_resume_equals_uninterrupted_and_ranks_partition(corpus, tmp_path):
    ds = GPTDataset(corpus[0], 8, num_samples=45, seed=2, split="1,0,0", cache_dir=str(tmp_path / "cache"))
    mbs, dp = 2, 3
    full = {r: list(iterate_batches(ds, mbs, dp_rank=r, dp_size=dp)) for r in range(dp)}
    assert all(len(b) == 45 // (mbs * dp) for b in full.values())
    for step in range(len(full[0])):  # each step: the ranks split the next mbs * dp samples in order
        tokens = torch.cat([full[r][step]["tokens"] for r in range(dp)])
        want = np.stack([ds[i]["tokens"] for i in range(step * mbs * dp, (step + 1) * mbs * dp)])
        np.testing.assert_array_equal(tokens.numpy(), want)
    for r in range(dp):
        resumed = list(iterate_batches(ds, mbs, dp_rank=r, dp_size=dp, consumed_samples=3 * mbs * dp))
        assert len(resumed) == len(full[r]) - 3
        for a, b in zip(resumed, full[r][3:]):
            assert all(torch.equal(a[k], b[k]) for k in ("tokens", "labels", "loss_mask"))
    with pytest.raises(InputError, match="dp_rank 3"):
        next(iterate_batches(ds, mbs, dp_rank=3, dp_size=dp))


@pytest.fixture(scope="module")
def sft(tmp_path_factory):
    prefix = tmp_path_factory.mktemp("sft") / "sft"
    tok = load_tokenizer()
    run(PreprocessConfig(input=str(ALPACA), output_prefix=str(prefix), handler=InstructionHandler(append_eod=True),
                         tokenizer=tok))
    return str(prefix), tok


def test_instruction_samples_are_shifted_padded_and_masked(sft):
    prefix, tok = sft
    ids = IndexedDataset(f"{prefix}_packed_input_ids_document")
    labels = IndexedDataset(f"{prefix}_packed_labels_document")
    seq = 96
    ds = InstructionDataset(prefix, seq, tok.pad_id, seed=0, split="1,0,0")
    assert len(ds) == ids.num_documents and sorted(ds.order.tolist()) == list(range(len(ds)))
    for i in range(len(ds)):
        k, sample = int(ds.order[i]), ds[i]
        x, y = list(ids.document(k)[:-1][:seq]), list(labels.document(k)[1:][:seq])
        assert sample["tokens"].tolist() == x + [tok.eos_id] * (seq - len(x))
        assert sample["labels"].tolist() == y + [-100] * (seq - len(y))
        assert sample["loss_mask"].tolist() == [float(t != -100) for t in sample["labels"].tolist()]
    longest = max(range(len(ds)), key=lambda i: ids.document_lengths()[ds.order[i]])
    assert ids.document_lengths()[ds.order[longest]] > seq + 1  # truncation was exercised
    two_epochs = InstructionDataset(prefix, seq, tok.pad_id, num_samples=50, seed=0, split="1,0,0")
    assert len(two_epochs) == 50 and sorted(two_epochs.order[:36].tolist()) == list(range(36))


def test_batches_feed_loss_fn(sft):
    prefix, tok = sft
    cfg = mf.MistralConfig.tiny()
    params = mf.init_params(cfg, seed=0)
    ds = InstructionDataset(prefix, 128, tok.pad_id, split="1,0,0")
    batch = next(iterate_batches(ds, 2))
    assert {k: (tuple(v.shape), v.dtype) for k, v in batch.items()} == {
        "tokens": ((2, 128), torch.int64), "labels": ((2, 128), torch.int64), "loss_mask": ((2, 128), torch.float32)}
    assert batch["loss_mask"].sum() > 0
    loss = mf.loss_fn(params, batch, cfg)
    assert torch.isfinite(loss) and 9.0 < loss.item() < 12.0  # ~ln(32000) for random weights


def test_ignore_index_is_defined_once_and_vocab_parallel_needs_no_loss():
    from mistral_fn import loss, vocab_parallel
    from mistral_fn.data import handlers
    assert loss.IGNORE_INDEX is vocab_parallel.IGNORE_INDEX is handlers.IGNORE_INDEX is datasets.IGNORE_INDEX == -100
    trees = {path: ast.parse(path.read_text()) for path in (ROOT / "mistral_fn").rglob("*.py")}
    definitions = [path.name for path, tree in trees.items() for node in ast.walk(tree) if isinstance(node, ast.Assign)
                   and any(getattr(target, "id", None) == "IGNORE_INDEX" for target in node.targets)]
    assert definitions == ["vocab_parallel.py"]
    assert not [node for node in ast.walk(trees[ROOT / "mistral_fn" / "vocab_parallel.py"])
                if isinstance(node, ast.ImportFrom) and node.module == "mistral_fn.loss"]  # no import cycle
