"""Atomic output, shared by checkpoints, datasets, caches, results and plots.

A target `dir/name` is built under the deterministic sibling `dir/.name.partial` and renamed onto
`dir/name` only when complete, so nothing that looks complete is ever half-written. Because the
temporary name is a function of the target, whatever a killed process (kill -9, power loss) left
behind is found and removed by the next write to the same target, with a log line:

    with atomic_dir("ckpt/iter_0000100") as tmp:     # tmp = ckpt/.iter_0000100.partial (swept first)
        write_everything_into(tmp)
    # ckpt/iter_0000100 now exists, complete; the .partial is gone

Replacing an existing directory moves it to `dir/.name.old` first, renames the new one into place,
then deletes the old one; a write killed between the two renames leaves no `target` and a complete
`.old`, which the next write renames back (`recover`) before it sweeps. One writer per target at a
time: concurrent writers of the same target must be serialised by the caller (e.g. rank 0 writes,
the others wait). A failed write (a full disk, a file size limit, a permission) raises an `OSError`
naming the path the caller asked for, never a temporary name.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from pathlib import Path

from mistral_fn.errors import CheckpointError

log = logging.getLogger(__name__)


def writable(path: str | os.PathLike) -> bool:
    """Whether `path` can be created or written: its nearest existing ancestor is a writable directory
    (for this process's effective ids, which are what a write is checked against)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    effective = os.access in os.supports_effective_ids
    return path.is_dir() and os.access(path, os.W_OK | os.X_OK, effective_ids=effective)


def check_file_target(target: str | os.PathLike) -> None:
    """Raise `CheckpointError` unless `atomic_file(target)` can write `target`: it is not a directory and
    its nearest existing ancestor is a writable directory. Apps call it on output paths before long work."""
    target = Path(target)
    if target.is_dir():
        raise CheckpointError(f"{target}: is a directory; expected a file path to write")
    _check_writable(target)


def _check_writable(target: Path) -> None:
    if not writable(target.parent):
        raise CheckpointError(f"{target}: cannot be written (no writable directory to create it in)")


@contextlib.contextmanager
def naming(target: str | os.PathLike):
    """Re-raise an `OSError` that names no file (a failed write: a full disk, a file size limit) or names
    `target`'s partial name (or a file inside it) as one naming `target` (or that file inside it)."""
    target = Path(target)
    try:
        yield
    except OSError as e:
        name = _public_name(e.filename, target)
        if e.errno is None or name is None:
            raise
        raise OSError(e.errno, e.strerror, name) from None


def _public_name(filename, target: Path) -> str | None:
    if filename is None:
        return str(target)
    path, tmp = Path(os.fsdecode(filename)), partial_path(target)
    if path == tmp or tmp in path.parents:
        return str(target / path.relative_to(tmp))
    return None


def partial_path(target: str | os.PathLike) -> Path:
    """The temporary name of `target` while it is being written: `dir/.name.partial`."""
    target = Path(target)
    return target.with_name(f".{target.name}.partial")


def _old_path(target: Path) -> Path:
    return target.with_name(f".{target.name}.old")


def recover(target: str | os.PathLike) -> bool:
    """Undo a directory replace (`publish_dir`) killed between its two renames: an `.old` directory
    without a `target` is the complete previous version, and becomes `target` again. Returns whether
    it did; call it before `sweep`, which would delete the `.old`."""
    target, old = Path(target), _old_path(Path(target))
    if not old.is_dir() or old.is_symlink() or target.exists() or target.is_symlink():
        return False
    os.replace(old, target)
    log.warning("restored %s from %s, left by an interrupted replace", target, old)
    return True


def sweep(target: str | os.PathLike) -> list[Path]:
    """Remove the leftovers of an interrupted write of `target` (its `.partial` and `.old`); return them."""
    target = Path(target)
    removed = []
    for leftover in (partial_path(target), _old_path(target)):
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover)
        elif leftover.exists() or leftover.is_symlink():
            leftover.unlink()
        else:
            continue
        log.warning("removed %s, left by an interrupted write", leftover)
        removed.append(leftover)
    return removed


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, overwrite: bool = False):
    """Yield an empty `dir/.name.partial` directory; on success it becomes `target`.

    An existing `target` is an error unless `overwrite`, and is then replaced only once the new
    directory is complete. On any exception the partial directory is removed and `target` is untouched.
    """
    target = Path(target)
    if target.exists() and not overwrite:
        raise CheckpointError(f"{target}: already exists; pass overwrite to replace it")
    _check_writable(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    restored = recover(target)
    sweep(target)
    if restored and not overwrite:
        raise CheckpointError(f"{target}: already exists (restored from an interrupted replace); pass overwrite "
                              "to replace it")
    tmp = partial_path(target)
    try:
        with naming(target):
            tmp.mkdir()
            yield tmp
            publish_dir(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def publish_dir(target: str | os.PathLike) -> None:
    """Rename the complete `dir/.name.partial` onto `target`; an existing `target` is moved to `dir/.name.old`
    first and deleted once the new one is in place. For writers that fill the partial directory themselves
    (e.g. several ranks, each writing its own files)."""
    target = Path(target)
    tmp = partial_path(target)
    if target.exists():
        old = _old_path(target)
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike, mode: str = "wb", **open_kwargs):
    """Yield a file object writing `dir/.name.partial`; on success it is synced and replaces `target`."""
    target = Path(target)
    check_file_target(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep(target)
    tmp = partial_path(target)
    try:
        with naming(target):
            with open(tmp, mode, **open_kwargs) as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
