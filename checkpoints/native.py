"""Native training checkpoints: any pytree of tensors (params, optimizer state, step, consumed samples,
RNG states), one safetensors file plus one msgpack metadata file per rank.

    <root>/owner.msgpack                       {format, version, run_id}: the run that owns root
    <root>/latest                              "iter_0000100\\n", replaced atomically, written last
    <root>/iter_0000100/rank_000.safetensors   tensors named by pytree path (`train/params/layers/0/attn/wq`)
    <root>/iter_0000100/rank_000.msgpack       {format, version, run_id, step, rank, world_size, extra,
                                                sha256, bytes, tensors}

A save builds `.iter_0000100.partial/` (every rank writes its own pair), then rank 0 renames it,
replaces `latest` and, with `keep`, deletes older iterations that the same run wrote. A killed save
leaves only a `.partial` directory, which the next save to `root` removes with a log line; `latest`
only ever names complete iterations.

Every rank file carries the owning run's id, the step, the world size and `extra` (the run's
arguments/config), so a load checks from the metadata alone that all ranks of an iteration belong
together: every process of a multi-rank load reads the same files and raises the same one-line error,
without waiting for a peer. Loading fills a template tree (same structure, e.g. a freshly initialised
state) by path, checking every name, shape, dtype and the file's sha256, so a resumed run continues
bit for bit.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable

import msgpack
import torch
from safetensors import SafetensorError, safe_open

from checkpoints.lazy import write_safetensors
from mistral_fn import atomic
from mistral_fn.errors import CheckpointError
from mistral_fn.params import leaves_with_paths, map_with_path

log = logging.getLogger(__name__)

FORMAT, VERSION = "mistral_fn-native", 2
LATEST = "latest"
OWNER = "owner.msgpack"
_ITER_RE = re.compile(r"^iter_(\d{7,})$")
_LEFTOVER_RE = re.compile(r"^\.(iter_\d{7,})\.(partial|old)$")
# Metadata every rank of one iteration shares.
_SHARED = ("run_id", "step", "world_size", "extra")


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


# ---- ownership -------------------------------------------------------------------------------------

def new_run_id() -> str:
    return uuid.uuid4().hex


def read_owner(root: str | os.PathLike) -> str | None:
    """The run id in `<root>/owner.msgpack`, or None when root has no owner file."""
    file = Path(root) / OWNER
    if not file.exists():
        return None
    meta = _unpack(file)
    if not isinstance(meta.get("run_id"), str):
        raise CheckpointError(f"{file}: owner file without a run id")
    return meta["run_id"]


def write_owner(root: str | os.PathLike, run_id: str) -> None:
    """Make `run_id` the owner of `root` (created if needed), atomically."""
    with atomic.atomic_file(Path(root) / OWNER) as f:
        f.write(msgpack.packb({"format": FORMAT, "version": VERSION, "run_id": run_id}, use_bin_type=True))


# ---- saving ----------------------------------------------------------------------------------------

def save_native(root: str | os.PathLike, step: int, tree, *, extra: dict | None = None, run_id: str | None = None,
                rank: int = 0, world_size: int = 1, keep: int | None = None,
                barrier: Callable[[], None] | None = None) -> Path:
    """Write this rank's part of iteration `step` under `root`; returns the iteration directory.

    `extra`: msgpack-able run metadata (ints, floats, str, bytes, lists, dicts), the same on every rank
    (loads verify that). `run_id`: the id `claim_save_dir` returned; a root owned by another run is
    refused. Without it the root's current owner is used (a root without one gets a new run).
    Multi-rank: every rank calls this with its own `rank` and the same `barrier` (e.g.
    `torch.distributed.barrier`). `keep`: after the save, keep only the newest `keep` iterations among
    those this run wrote (None keeps all); iterations of other runs and the one `latest` names stay.
    """
    if keep is not None and keep < 1:
        raise CheckpointError(f"keep={keep} must be >= 1 (or None to keep every checkpoint)")
    root, barrier = Path(root), barrier or (lambda: None)
    final = root / iter_name(step)
    tmp = atomic.partial_path(final)
    owner = read_owner(root)  # every rank reads before rank 0 may write, so all decide alike
    if run_id is not None and owner not in (None, run_id):
        raise CheckpointError(f"{root}: owned by run {owner}, not by this run ({run_id}); another run has claimed "
                              "this directory")
    barrier()
    if rank == 0:
        if owner is None:
            write_owner(root, run_id or new_run_id())
        _sweep_leftovers(root)
        tmp.mkdir()
    barrier()
    run_id = read_owner(root)
    tensors_file, meta_file = _rank_files(tmp, rank)
    try:
        tensors = _named_tensors(tree)
        with atomic.naming(final):
            write_safetensors(tensors, tensors_file)
        meta = {"format": FORMAT, "version": VERSION, "run_id": run_id, "step": int(step), "rank": rank,
                "world_size": world_size, "extra": extra or {}, "sha256": _sha256(tensors_file),
                "bytes": tensors_file.stat().st_size,
                "tensors": {p: [str(t.dtype).removeprefix("torch."), list(t.shape)] for p, t in tensors.items()}}
        with atomic.naming(final), atomic.atomic_file(meta_file) as f:
            f.write(msgpack.packb(meta, use_bin_type=True))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    barrier()
    if rank == 0:
        atomic.publish_dir(final)
        with atomic.atomic_file(root / LATEST, "w") as f:
            f.write(iter_name(step) + "\n")
        if keep is not None:
            _prune(root, keep, run_id, step)
    barrier()
    return final


def _sweep_leftovers(root: Path) -> None:
    """Remove every `.iter_*.partial` / `.old` a killed save left in `root` (one writer per root: its owner);
    an `.old` whose iteration is missing (a replace killed between its renames) is restored instead."""
    for path in sorted(root.iterdir()):
        m = _LEFTOVER_RE.match(path.name)
        if m:
            atomic.recover(root / m.group(1))
            atomic.sweep(root / m.group(1))


def _prune(root: Path, keep: int, run_id: str, current: int) -> None:
    """Delete this run's iterations older than its newest `keep` (`current` is the newest and stays)."""
    mine = [s for s in list_steps(root) if s != current and _written_by(root / iter_name(s), run_id)]
    for step in mine[:max(len(mine) - (keep - 1), 0)]:
        shutil.rmtree(root / iter_name(step), ignore_errors=True)
        log.info("keep_last=%d: removed %s", keep, root / iter_name(step))


def _written_by(directory: Path, run_id: str) -> bool:
    try:
        return _read_meta(directory, 0)["run_id"] == run_id
    except CheckpointError:
        return False


# ---- inspecting ------------------------------------------------------------------------------------

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
    m = _ITER_RE.match(pointer.read_text(encoding="utf-8", errors="replace").strip())
    if not m:
        raise CheckpointError(f"{pointer}: expected 'iter_NNNNNNN', got {pointer.read_text(errors='replace')[:40]!r}")
    return int(m.group(1))


def is_native(path: str | os.PathLike) -> bool:
    """True for a native root (has `latest` or an owner file) or one iteration directory."""
    path = Path(path)
    return ((path / LATEST).exists() or (path / OWNER).exists()
            or bool(_ITER_RE.match(path.name) and _rank_files(path, 0)[1].exists()))


def step_of(path: str | os.PathLike) -> int | None:
    """The iteration an `iter_*` directory holds, or None for any other path."""
    m = _ITER_RE.match(Path(path).name)
    return int(m.group(1)) if m else None


def iteration_dir(root: str | os.PathLike, step: int | None = None) -> Path:
    """The directory of iteration `step` (default: the one `latest` names); `root` may be an `iter_*` directory."""
    root = Path(root)
    if step_of(root) is not None and step is None:
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


def read_metadata(root: str | os.PathLike, step: int | None = None, rank: int = 0) -> dict[str, Any]:
    """This rank's metadata dict of iteration `step` (default: `latest`)."""
    return _read_meta(iteration_dir(root, step), rank)


def verify_ranks(directory: str | os.PathLike) -> list[dict[str, Any]]:
    """Every rank's metadata of one iteration directory, checked to belong together: one file pair per
    rank of rank 0's `world_size`, and the same run id, step (also the directory's), world size and
    `extra` in each, tensor files of the recorded size. Reads metadata only (no tensor data)."""
    directory = Path(directory)
    first = _read_meta(directory, 0)
    world = first["world_size"]
    named = step_of(directory)
    if named is not None and first["step"] != named:
        raise CheckpointError(f"{_rank_files(directory, 0)[1]}: holds step {first['step']}, not {named}")
    found = sorted(p.name for p in directory.glob("rank_*.msgpack"))
    expected = [_rank_files(directory, r)[1].name for r in range(world)]
    if found != expected:
        odd = sorted(set(found) ^ set(expected))[0]
        raise CheckpointError(f"{directory / odd}: {'unexpected' if odd in found else 'missing'} rank metadata; "
                              f"rank 0 says world_size={world}")
    metas = [first] + [_read_meta(directory, r) for r in range(1, world)]
    for r, meta in enumerate(metas):
        tensors_file, meta_file = _rank_files(directory, r)
        for key in _SHARED:
            if meta[key] != first[key]:
                ours, theirs = ("", "") if key == "extra" else (f" {meta[key]!r}", f" {first[key]!r}")
                raise CheckpointError(f"{meta_file}: {key}{ours} differs from rank 0's{theirs}; the rank files come "
                                      "from different checkpoints")
        if meta["rank"] != r:
            raise CheckpointError(f"{meta_file}: holds rank {meta['rank']}'s metadata")
        if not tensors_file.exists() or tensors_file.stat().st_size != meta["bytes"]:
            size = tensors_file.stat().st_size if tensors_file.exists() else "missing"
            raise CheckpointError(f"{tensors_file}: {size} bytes, its metadata records {meta['bytes']}")
    return metas


# ---- loading ---------------------------------------------------------------------------------------

def load_native(root: str | os.PathLike, template, *, step: int | None = None, rank: int = 0,
                verify: bool = True):
    """`(tree, metadata)`: `template` with every tensor replaced by the saved one at its path.

    `root` is a checkpoint root (uses `latest` unless `step` is given) or one `iter_*` directory.
    All ranks' metadata are checked to belong together first (`verify_ranks`); `verify` also checks
    this rank's file against its sha256. Raises `CheckpointError` naming the file or tensor path when
    anything is missing, corrupt or does not match the template's shapes and dtypes.
    """
    directory = iteration_dir(root, step)
    metas = verify_ranks(directory)
    if not 0 <= rank < len(metas):
        raise CheckpointError(f"{directory}: holds {len(metas)} rank(s); rank {rank} has no files")
    meta = metas[rank]
    tensors_file, _ = _rank_files(directory, rank)
    if verify:
        check_sha256(directory, meta)
    expected = dict(leaves_with_paths(template))
    extra = sorted(set(meta["tensors"]) - set(expected))
    if extra:
        raise CheckpointError(f"{tensors_file}: tensor {extra[0]!r} is not in the state being restored")
    try:
        with safe_open(str(tensors_file), framework="pt", device="cpu") as f:
            return map_with_path(lambda path, ref: _take(f, tensors_file, path, ref), template), meta
    except SafetensorError as e:
        raise CheckpointError(f"{tensors_file}: unreadable safetensors file ({e})") from None


def rank_file(directory: str | os.PathLike, rank: int) -> Path:
    """The safetensors file of `rank` in an iteration directory."""
    return _rank_files(Path(directory), rank)[0]


def check_sha256(directory: str | os.PathLike, meta: dict[str, Any]) -> None:
    """Raise unless the tensor file of `meta`'s rank hashes to the sha256 its metadata records."""
    tensors_file = rank_file(directory, meta["rank"])
    if _sha256(tensors_file) != meta["sha256"]:
        raise CheckpointError(f"{tensors_file}: sha256 does not match its metadata (corrupted or replaced)")


def _take(f, file: Path, path: str, ref: torch.Tensor) -> torch.Tensor:
    if path not in f.keys():
        raise CheckpointError(f"{file}: missing tensor {path!r}")
    t = f.get_tensor(path)
    if t.shape != ref.shape or t.dtype != ref.dtype:
        raise CheckpointError(f"{file}: tensor {path!r} is {t.dtype} {tuple(t.shape)}, expected "
                              f"{ref.dtype} {tuple(ref.shape)}")
    return t.to(ref.device)


def _unpack(file: Path) -> dict[str, Any]:
    """A msgpack file of this format, checked for format and version."""
    try:
        meta = msgpack.unpackb(file.read_bytes(), raw=False)
    except (msgpack.exceptions.ExtraData, msgpack.exceptions.UnpackException, ValueError) as e:
        raise CheckpointError(f"{file}: unreadable metadata ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{file}: not a {FORMAT} metadata file")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{file}: format version {meta.get('version')} is not supported ({VERSION})")
    return meta


def _read_meta(directory: Path, rank: int) -> dict[str, Any]:
    _, meta_file = _rank_files(directory, rank)
    if not meta_file.exists():
        raise CheckpointError(f"{meta_file}: missing metadata file (rank {rank})")
    meta = _unpack(meta_file)
    missing = [key for key in (*_SHARED, "rank", "sha256", "bytes", "tensors") if key not in meta]
    if missing:
        raise CheckpointError(f"{meta_file}: metadata lacks {missing[0]!r}")
    return meta
