"""Native training checkpoints: any pytree of tensors (params, optimizer state, step, consumed samples,
RNG states), one safetensors file plus one msgpack metadata file per rank.

    <root>/latest                        "iter_0000100\\n", replaced atomically, written last
    <root>/iter_0000100/rank_000.safetensors   tensors named by pytree path (`params/layers/0/attn/wq`)
    <root>/iter_0000100/rank_000.msgpack       {format, version, step, rank, world_size, sha256, tensors, extra}

A save builds `.iter_0000100.tmp/` (every rank writes its own pair), then rank 0 renames it, replaces
`latest` and deletes all but the newest `keep` iterations. A crash leaves at most a `.tmp` directory
that the next save of that step removes; `latest` only ever names complete iterations. Loading fills
a template tree (same structure, e.g. a freshly initialised state) by path, checking every name,
shape, dtype and the file's sha256, so a resumed run continues bit for bit.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import msgpack
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from mistral_fn.atomic import atomic_file
from mistral_fn.errors import CheckpointError
from mistral_fn.params import leaves_with_paths, map_with_path

FORMAT, VERSION = "mistral_fn-native", 1
LATEST = "latest"
_ITER_RE = re.compile(r"^iter_(\d{7,})$")


def iter_name(step: int) -> str:
    return f"iter_{step:07d}"


def _rank_files(directory: Path, rank: int) -> tuple[Path, Path]:
    return directory / f"rank_{rank:03d}.safetensors", directory / f"rank_{rank:03d}.msgpack"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def _named_tensors(tree) -> dict[str, torch.Tensor]:
    """`{path: contiguous CPU tensor}`; leaves sharing storage are copied (safetensors refuses aliases)."""
    out, seen = {}, set()
    for path, leaf in leaves_with_paths(tree):
        if not isinstance(leaf, torch.Tensor):
            raise CheckpointError(f"leaf {path!r} is a {type(leaf).__name__}, not a tensor; put it in `extra`")
        t = leaf.detach().to("cpu").contiguous()
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        out[path] = t.clone() if key in seen and t.numel() else t
        seen.add(key)
    return out


def save_native(root: str | os.PathLike, step: int, tree, *, extra: dict | None = None, rank: int = 0,
                world_size: int = 1, keep: int | None = None, barrier: Callable[[], None] | None = None) -> Path:
    """Write this rank's part of iteration `step` under `root`; returns the iteration directory.

    `extra`: msgpack-able metadata (ints, floats, str, bytes, lists, dicts). Multi-rank: every rank
    calls this with its own `rank` and the same `barrier` (e.g. `torch.distributed.barrier`).
    `keep`: keep only the newest `keep` iterations (None keeps all).
    """
    if keep is not None and keep < 1:
        raise CheckpointError(f"keep={keep} must be >= 1 (or None to keep every checkpoint)")
    root, barrier = Path(root), barrier or (lambda: None)
    final, tmp = root / iter_name(step), root / f".{iter_name(step)}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    tensors_file, meta_file = _rank_files(tmp, rank)
    try:
        tensors = _named_tensors(tree)
        save_file(tensors, str(tensors_file))
        meta = {"format": FORMAT, "version": VERSION, "step": int(step), "rank": rank, "world_size": world_size,
                "sha256": _sha256(tensors_file), "extra": extra or {},
                "tensors": {p: [str(t.dtype).removeprefix("torch."), list(t.shape)] for p, t in tensors.items()}}
        with atomic_file(meta_file) as f:
            f.write(msgpack.packb(meta, use_bin_type=True))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    barrier()
    if rank == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        with atomic_file(root / LATEST, "w") as f:
            f.write(iter_name(step) + "\n")
        if keep is not None:
            for old in list_steps(root)[:-keep]:
                shutil.rmtree(root / iter_name(old), ignore_errors=True)
    barrier()
    return final


def list_steps(root: str | os.PathLike) -> list[int]:
    """The complete iterations under `root`, ascending."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(int(m.group(1)) for p in root.iterdir() if (m := _ITER_RE.match(p.name)) and p.is_dir())


def latest_step(root: str | os.PathLike) -> int | None:
    """The iteration named by `<root>/latest`, or None when there is no pointer."""
    pointer = Path(root) / LATEST
    if not pointer.exists():
        return None
    m = _ITER_RE.match(pointer.read_text(encoding="utf-8").strip())
    if not m:
        raise CheckpointError(f"{pointer}: expected 'iter_NNNNNNN', got {pointer.read_text()[:40]!r}")
    return int(m.group(1))


def is_native(path: str | os.PathLike) -> bool:
    """True for a native root (has `latest`) or one iteration directory."""
    path = Path(path)
    return (path / LATEST).exists() or bool(_ITER_RE.match(path.name) and _rank_files(path, 0)[1].exists())


def read_metadata(root: str | os.PathLike, step: int | None = None, rank: int = 0) -> dict[str, Any]:
    """This rank's metadata dict of iteration `step` (default: `latest`)."""
    return _read_meta(_resolve(Path(root), step), rank)


def load_native(root: str | os.PathLike, template, *, step: int | None = None, rank: int = 0,
                verify: bool = True):
    """`(tree, metadata)`: `template` with every tensor replaced by the saved one at its path.

    `root` is a checkpoint root (uses `latest` unless `step` is given) or one `iter_*` directory.
    Raises `CheckpointError` naming the file or tensor path when anything is missing, corrupt or
    does not match the template's shapes and dtypes.
    """
    directory = _resolve(Path(root), step)
    meta = _read_meta(directory, rank)
    tensors_file, _ = _rank_files(directory, rank)
    if not tensors_file.exists():
        raise CheckpointError(f"{tensors_file}: missing tensor file")
    if verify and _sha256(tensors_file) != meta["sha256"]:
        raise CheckpointError(f"{tensors_file}: sha256 does not match its metadata (corrupted or replaced)")
    expected = dict(leaves_with_paths(template))
    extra = sorted(set(meta["tensors"]) - set(expected))
    if extra:
        raise CheckpointError(f"{tensors_file}: tensor {extra[0]!r} is not in the state being restored")
    try:
        with safe_open(str(tensors_file), framework="pt", device="cpu") as f:
            return map_with_path(lambda path, ref: _take(f, tensors_file, path, ref), template), meta
    except SafetensorError as e:
        raise CheckpointError(f"{tensors_file}: unreadable safetensors file ({e})") from None


def _take(f, file: Path, path: str, ref: torch.Tensor) -> torch.Tensor:
    if path not in f.keys():
        raise CheckpointError(f"{file}: missing tensor {path!r}")
    t = f.get_tensor(path)
    if t.shape != ref.shape or t.dtype != ref.dtype:
        raise CheckpointError(f"{file}: tensor {path!r} is {t.dtype} {tuple(t.shape)}, expected "
                              f"{ref.dtype} {tuple(ref.shape)}")
    return t.to(ref.device)


def _resolve(root: Path, step: int | None) -> Path:
    if _ITER_RE.match(root.name) and step is None:
        directory = root
    else:
        if step is None:
            step = latest_step(root)
            if step is None:
                raise CheckpointError(f"{root}: no '{LATEST}' pointer; not a native checkpoint directory")
        directory = root / iter_name(step)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such checkpoint iteration")
    return directory


def _read_meta(directory: Path, rank: int) -> dict[str, Any]:
    _, meta_file = _rank_files(directory, rank)
    if not meta_file.exists():
        raise CheckpointError(f"{meta_file}: missing metadata file (rank {rank})")
    try:
        meta = msgpack.unpackb(meta_file.read_bytes(), raw=False)
    except (msgpack.exceptions.ExtraData, msgpack.exceptions.UnpackException, ValueError) as e:
        raise CheckpointError(f"{meta_file}: unreadable metadata ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_file}: not a {FORMAT} metadata file")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{meta_file}: format version {meta.get('version')} is not supported ({VERSION})")
    return meta
