"""Megatron's mmap indexed dataset: `<prefix>.bin` (tokens) + `<prefix>.idx` ("MMIDIDX" index).

`.idx`, little-endian, no padding:
    magic b"MMIDIDX\\x00\\x00" | version <Q = 1 | dtype code <B | N <Q sequences | D <Q = documents + 1
    | int32[N] sequence lengths | int64[N] byte pointers into .bin | int64[D] document boundaries
    (sequence indices, 0 … N). An optional int8[N] multimodal mode array may follow; it is ignored.
`.bin` is the raw concatenation of the sequences in that dtype. The layout is Megatron-LM's
(legacy `MMapIndexedDataset` and core `IndexedDataset` alike), so files move both ways.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import struct

import numpy as np

from mistral_fn.atomic import naming, partial_path, sweep
from mistral_fn.errors import InputError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER = struct.Struct("<9sQBQQ")
DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
               8: np.uint16}
CODE_OF = {np.dtype(t): code for code, t in DTYPE_CODES.items()}


def paths(prefix: str | os.PathLike) -> tuple[str, str]:
    """(`<prefix>.bin`, `<prefix>.idx`)."""
    prefix = os.fspath(prefix)
    return prefix + ".bin", prefix + ".idx"


def encode_index(sequence_lengths, document_indices, dtype) -> bytes:
    """The `.idx` bytes for sequences of the given lengths and document boundaries."""
    lengths = np.asarray(sequence_lengths, dtype=np.int32)
    docs = np.asarray(document_indices, dtype=np.int64)
    pointers = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1].astype(np.int64) * np.dtype(dtype).itemsize, out=pointers[1:])
    header = HEADER.pack(MAGIC, VERSION, CODE_OF[np.dtype(dtype)], len(lengths), len(docs))
    return header + lengths.tobytes() + pointers.tobytes() + docs.tobytes()


class IndexedDatasetWriter:
    """Appends token sequences and document boundaries; `finalize` publishes `<prefix>.{bin,idx}`.

    Both files are written under `mistral_fn.atomic`'s deterministic partial names
    (`.<name>.bin.partial`, `.<name>.idx.partial`), which the next writer of the same prefix sweeps with
    a log line: a full disk or kill -9 leaves nothing the next run keeps. `commit` removes the old
    `.idx` first, then renames the `.bin` and the `.idx` into place, so a visible `.idx` always has its
    own complete `.bin`. `abort` (or leaving a `with` block by an exception) removes the partial files.
    Use `finish` + `commit` to publish several datasets only once all are written. An `OSError` from
    writing names the file.
    """

    def __init__(self, prefix: str | os.PathLike, dtype=np.int32):
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODE_OF:
            raise InputError(f"dtype {self.dtype} has no Megatron dtype code; expected one of "
                             f"{', '.join(str(np.dtype(t)) for t in DTYPE_CODES.values())}")
        self.bin_path, self.idx_path = paths(prefix)
        os.makedirs(os.path.dirname(os.path.abspath(self.bin_path)), exist_ok=True)
        for path in (self.bin_path, self.idx_path):
            sweep(path)
        with naming(self.bin_path):
            self._bin = open(partial_path(self.bin_path), "wb")
        self.sequence_lengths: list[int] = []
        self.document_indices: list[int] = [0]
        self._limits = np.iinfo(self.dtype) if self.dtype.kind in "iu" else None

    def add_item(self, tokens) -> None:
        """Append one sequence (any 1-D integer array-like)."""
        array = np.asarray(tokens)
        if self._limits is not None and array.size and (array.min() < self._limits.min
                                                        or array.max() > self._limits.max):
            raise InputError(f"{self.bin_path}: values [{array.min()}, {array.max()}] do not fit {self.dtype}")
        with naming(self.bin_path):
            self._bin.write(array.astype(self.dtype, copy=False).tobytes())
        self.sequence_lengths.append(int(array.size))

    def end_document(self) -> None:
        self.document_indices.append(len(self.sequence_lengths))

    def add_document(self, tokens) -> None:
        """Append one sequence as a whole document."""
        self.add_item(tokens)
        self.end_document()

    def finish(self) -> None:
        """Flush the data and write the index, both to disk, still under their partial names."""
        with naming(self.bin_path):
            self._bin.flush()
            os.fsync(self._bin.fileno())
            self._bin.close()
        with naming(self.idx_path), open(partial_path(self.idx_path), "wb") as f:
            f.write(encode_index(self.sequence_lengths, self.document_indices, self.dtype))
            f.flush()
            os.fsync(f.fileno())

    def commit(self) -> None:
        if os.path.exists(self.idx_path):
            os.remove(self.idx_path)
        os.replace(partial_path(self.bin_path), self.bin_path)
        os.replace(partial_path(self.idx_path), self.idx_path)

    def finalize(self) -> None:
        self.finish()
        self.commit()

    def abort(self) -> None:
        with contextlib.suppress(OSError):  # a full disk may fail the close's flush too
            self._bin.close()
        for path in (self.bin_path, self.idx_path):
            with contextlib.suppress(FileNotFoundError):
                os.remove(partial_path(path))

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.finalize()
        else:
            self.abort()


class IndexedDataset:
    """Zero-copy reader: both files are memory-mapped; items are views into the `.bin` map.

    `ds[i]` → sequence i (1-D array of the file dtype); `ds[a:b]` → list of sequences;
    `ds.get(i, offset, length)` → part of a sequence; `ds.document(k)` → document k's tokens.
    `sequence_lengths` [N] int32, `sequence_pointers` [N] int64, `document_indices` [D] int64.
    """

    def __init__(self, prefix: str | os.PathLike):
        self.prefix = os.fspath(prefix)
        bin_path, idx_path = paths(prefix)
        for path in (idx_path, bin_path):
            if not os.path.isfile(path):
                raise InputError(f"{path}: indexed dataset file not found")
        index = np.memmap(idx_path, dtype=np.uint8, mode="r") if os.path.getsize(idx_path) else b""
        if len(index) < HEADER.size:
            raise InputError(f"{idx_path}: truncated index ({len(index)} bytes, the header alone is {HEADER.size})")
        magic, version, code, n, d = HEADER.unpack(bytes(index[:HEADER.size]))
        if magic != MAGIC:
            raise InputError(f"{idx_path}: not a Megatron mmap index (magic {magic!r}, expected {MAGIC!r})")
        if version != VERSION:
            raise InputError(f"{idx_path}: index version {version}, only version {VERSION} is supported")
        if code not in DTYPE_CODES:
            raise InputError(f"{idx_path}: unknown dtype code {code}; expected one of {sorted(DTYPE_CODES)}")
        self.dtype = np.dtype(DTYPE_CODES[code])
        expected = HEADER.size + 12 * n + 8 * d
        if len(index) not in (expected, expected + n):
            raise InputError(f"{idx_path}: {len(index)} bytes, but a header with {n} sequences and {d} document "
                             f"boundaries needs {expected}: truncated or corrupt")
        offset = HEADER.size
        self.sequence_lengths = np.frombuffer(index, np.int32, n, offset)
        self.sequence_pointers = np.frombuffer(index, np.int64, n, offset + 4 * n)
        self.document_indices = np.frombuffer(index, np.int64, d, offset + 12 * n)
        if d == 0 or self.document_indices[0] != 0 or self.document_indices[-1] != n:
            raise InputError(f"{idx_path}: document boundaries must run from 0 to {n} sequences")
        size = os.path.getsize(bin_path)
        end = int(self.sequence_pointers[-1]) + int(self.sequence_lengths[-1]) * self.dtype.itemsize if n else 0
        if size != end:
            raise InputError(f"{bin_path}: {size} bytes, but its index describes {end}: truncated or mismatched")
        self.tokens = np.memmap(bin_path, dtype=self.dtype, mode="r") if size else np.empty(0, self.dtype)

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    def fingerprint(self) -> dict:
        """What an index built over this dataset depends on, to key caches: the `.idx`'s sha256 and
        size, the `.bin`'s size, and both modification times (ns)."""
        digest = hashlib.sha256()
        bin_path, idx_path = paths(self.prefix)
        with open(idx_path, "rb") as f:
            while block := f.read(1 << 24):
                digest.update(block)
        idx, data = os.stat(idx_path), os.stat(bin_path)
        return {"idx_sha256": digest.hexdigest(), "idx_bytes": idx.st_size, "bin_bytes": data.st_size,
                "idx_mtime_ns": idx.st_mtime_ns, "bin_mtime_ns": data.st_mtime_ns}

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens `offset : offset + length` of sequence i (a view)."""
        start = int(self.sequence_pointers[i]) // self.dtype.itemsize + offset
        size = int(self.sequence_lengths[i]) - offset if length is None else length
        return self.tokens[start:start + size]

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self.get(j) for j in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(f"sequence {i} out of range for {len(self)} sequences")
        return self.get(i % len(self))

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    def document_lengths(self) -> np.ndarray:
        """Tokens per document, [num_documents] int64."""
        cumulative = np.concatenate([[0], np.cumsum(self.sequence_lengths, dtype=np.int64)])
        return cumulative[self.document_indices[1:]] - cumulative[self.document_indices[:-1]]

    def document(self, k: int) -> np.ndarray:
        """All tokens of document k (a view when its sequences are contiguous, which writers guarantee)."""
        first, last = int(self.document_indices[k]), int(self.document_indices[k + 1])
        if first == last:
            return self.tokens[:0]
        start = int(self.sequence_pointers[first]) // self.dtype.itemsize
        return self.tokens[start:start + int(self.sequence_lengths[first:last].sum())]
