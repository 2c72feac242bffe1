"""Input rows for preprocessing: parquet (pyarrow record batches), JSON lines, JSON arrays.

`iter_rows` yields `(where, raw)` pairs: `where` names the file and row for error messages; `raw` is a
dict (parquet, JSON array) or the undecoded bytes of one JSON line, parsed by `parse_row` — in the
worker processes, so decoding and JSON parsing run in parallel too.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Iterator, Sequence

import pyarrow.parquet as pq

from mistral_fn.errors import InputError

EXTENSIONS = (".parquet", ".jsonl", ".json")


def find_inputs(path: str) -> list[str]:
    """A file, a directory (its parquet/jsonl/json files, sorted) or a glob pattern → input files."""
    if os.path.isfile(path):
        files = [path]
    elif os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(EXTENSIONS))
    else:
        files = sorted(glob.glob(path))
    files = [f for f in files if os.path.isfile(f)]
    if not files:
        raise InputError(f"--input {path}: no {'/'.join(e[1:] for e in EXTENSIONS)} file matches")
    unsupported = [f for f in files if not f.endswith(EXTENSIONS)]
    if unsupported:
        raise InputError(f"{unsupported[0]}: unsupported input format; expected {', '.join(EXTENSIONS)}")
    return files


def _parquet_rows(path: str, columns: Sequence[str], batch_size: int) -> Iterator[tuple[str, dict]]:
    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise InputError(f"{path}: not a readable parquet file ({e})") from None
    present = [c for c in columns if c in parquet.schema_arrow.names]
    row = 0
    for batch in parquet.iter_batches(batch_size=batch_size, columns=present):
        for record in batch.to_pylist():
            yield f"{path} row {row}", {k: v for k, v in record.items() if v is not None}
            row += 1


def _json_rows(path: str) -> Iterator[tuple[str, dict | bytes]]:
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    if path.endswith(".json") and head.startswith(b"["):
        try:
            with open(path, encoding="utf-8") as f:
                records = json.load(f)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(f"{path}: not a valid UTF-8 JSON array ({e})") from None
        for row, record in enumerate(records):
            yield f"{path} row {row}", record
        return
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, 1):
            if line.strip():
                yield f"{path}:{line_no}", line


def iter_rows(files: Sequence[str], columns: Sequence[str], batch_size: int = 1024) -> Iterator[tuple[str, object]]:
    """Every row of every file, in order; parquet is read `batch_size` rows at a time, only `columns`."""
    for path in files:
        if path.endswith(".parquet"):
            yield from _parquet_rows(path, columns, batch_size)
        else:
            yield from _json_rows(path)


def parse_row(raw) -> dict:
    """A row as a dict; raw JSON-line bytes must be UTF-8 and hold a JSON object."""
    if isinstance(raw, bytes):
        try:
            raw = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise InputError(f"invalid UTF-8 at byte {e.start}") from None
        except json.JSONDecodeError as e:
            raise InputError(f"invalid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise InputError(f"expected a JSON object, got {type(raw).__name__}")
    return raw
