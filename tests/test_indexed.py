"""Megatron MMIDIDX indexed dataset: round trip, hand-built bytes, validation, memory mapping."""

import os
import struct
import time
import tracemalloc

import numpy as np
import pytest

from mistral_fn.data.indexed import IndexedDataset, IndexedDatasetWriter
from mistral_fn.errors import InputError


def write(prefix, docs, dtype=np.int32):
    """docs: list of documents, each a list of sequences."""
    with IndexedDatasetWriter(prefix, dtype) as w:
        for doc in docs:
            for seq in doc:
                w.add_item(seq)
            w.end_document()


@pytest.mark.parametrize("dtype", [np.int32, np.uint16, np.int64])
def test_round_trip(tmp_path, dtype):
    rng = np.random.default_rng(0)
    docs = [[rng.integers(0, 30000, rng.integers(0, 50)) for _ in range(rng.integers(1, 4))] for _ in range(20)]
    write(tmp_path / "ds", docs, dtype)
    assert sorted(os.listdir(tmp_path)) == ["ds.bin", "ds.idx"]  # no temporaries left
    ds = IndexedDataset(tmp_path / "ds")
    seqs = [s for doc in docs for s in doc]
    assert len(ds) == len(seqs) and ds.num_documents == len(docs) and ds.dtype == np.dtype(dtype)
    for i, seq in enumerate(seqs):
        np.testing.assert_array_equal(ds[i], seq)
    np.testing.assert_array_equal(ds[-1], seqs[-1])
    for got, want in zip(ds[3:9:2], seqs[3:9:2]):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(ds.get(5, 2, 3), seqs[5][2:5])
    for k, doc in enumerate(docs):
        np.testing.assert_array_equal(ds.document(k), np.concatenate(doc))
    np.testing.assert_array_equal(ds.document_lengths(), [sum(len(s) for s in doc) for doc in docs])
    with pytest.raises(IndexError):
        ds[len(seqs)]


def test_hand_built_index_parses(tmp_path):
    # Two documents: [5, 6, 7] and [8] + [9, 10] (two sequences), uint16 (code 8).
    idx = (b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", 8) + struct.pack("<Q", 3)
           + struct.pack("<Q", 3) + struct.pack("<3i", 3, 1, 2) + struct.pack("<3q", 0, 6, 8)
           + struct.pack("<3q", 0, 1, 3))
    (tmp_path / "h.idx").write_bytes(idx)
    (tmp_path / "h.bin").write_bytes(struct.pack("<6H", 5, 6, 7, 8, 9, 10))
    ds = IndexedDataset(tmp_path / "h")
    assert ds.dtype == np.uint16 and len(ds) == 3 and ds.num_documents == 2
    assert [list(s) for s in ds[:]] == [[5, 6, 7], [8], [9, 10]]
    assert list(ds.document(1)) == [8, 9, 10]
    # and our writer produces exactly these bytes
    write(tmp_path / "w", [[[5, 6, 7]], [[8], [9, 10]]], np.uint16)
    assert (tmp_path / "w.idx").read_bytes() == idx
    assert (tmp_path / "w.bin").read_bytes() == (tmp_path / "h.bin").read_bytes()


@pytest.mark.parametrize("corrupt, message", [
    (lambda b: b"TNTIDX\x00\x00" + b[7:], "not a Megatron mmap index"),
    (lambda b: b[:9] + struct.pack("<Q", 2) + b[17:], "version 2"),
    (lambda b: b[:17] + bytes([9]) + b[18:], "unknown dtype code 9"),
    (lambda b: b[:-5], "truncated or corrupt"),
    (lambda b: b[:20], "truncated index"),
    (lambda b: b"", "truncated index"),
])
def test_foreign_or_truncated_index_rejected(tmp_path, corrupt, message):
    write(tmp_path / "ds", [[[1, 2, 3]], [[4, 5]]])
    idx = tmp_path / "ds.idx"
    idx.write_bytes(corrupt(idx.read_bytes()))
    with pytest.raises(InputError, match=message):
        IndexedDataset(tmp_path / "ds")


def test_truncated_bin_and_missing_files_rejected(tmp_path):
    write(tmp_path / "ds", [[[1, 2, 3]], [[4, 5]]])
    with open(tmp_path / "ds.bin", "r+b") as f:
        f.truncate(12)
    with pytest.raises(InputError, match="ds.bin: 12 bytes, but its index describes 20"):
        IndexedDataset(tmp_path / "ds")
    with pytest.raises(InputError, match="not found"):
        IndexedDataset(tmp_path / "nothing")


def test_writer_aborts_and_checks_range(tmp_path):
    with pytest.raises(RuntimeError):
        with IndexedDatasetWriter(tmp_path / "ds") as w:
            w.add_document([1, 2])
            raise RuntimeError("interrupted")
    assert os.listdir(tmp_path) == []
    with pytest.raises(InputError, match="do not fit uint16"):
        IndexedDatasetWriter(tmp_path / "u", np.uint16).add_item([70000])


def test_reader_maps_without_reading(tmp_path):
    n = 256 * 1024 * 1024  # 1 GiB of int32 tokens, as a sparse file: reading it whole would allocate 1 GiB
    (tmp_path / "big.idx").write_bytes(b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, 4, 1, 2)
                                       + struct.pack("<iqqq", n, 0, 0, 1))
    with open(tmp_path / "big.bin", "wb") as f:
        f.truncate(4 * n)
    tracemalloc.start()
    start = time.perf_counter()
    ds = IndexedDataset(tmp_path / "big")
    tail = ds.get(0, n - 4)
    assert list(tail) == [0, 0, 0, 0]
    elapsed = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert isinstance(ds.tokens, np.memmap) and np.shares_memory(tail, ds.tokens)
    assert peak < 1024 * 1024 and elapsed < 1.0
