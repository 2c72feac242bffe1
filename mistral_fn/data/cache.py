"""Index caches of the training datasets, keyed by the content they index.

An entry is a directory `<cache dir>/<md5>-<kind>/` with one `.npy` per array and `description.json`.
The md5 is over a description of everything the arrays depend on, the dataset files included
(`IndexedDataset.fingerprint`: sha256 and size of the `.idx`, size of the `.bin`, both mtimes), so
re-preprocessing at the same prefix leads to a new entry and a stale one is never read.

Where (`cache_dirs`): `<prefix>/cache/<kind>_indices` beside the dataset (Megatron's place) when that
directory can be written, else `$XDG_CACHE_HOME/mistral_fn/<kind>_indices` (`~/.cache/mistral_fn/...`
without XDG_CACHE_HOME); an explicit cache directory replaces both. A complete entry is read from
whichever of them holds it.

Concurrent builders (every data-parallel rank constructing the same dataset at once) take turns under
an exclusive POSIX lock on `<cache dir>/.lock` (`fcntl.lockf`; the kernel releases it when its holder
dies, kill -9 included). The first builds the entry under the deterministic name `.<entry>.partial`
and renames it into place (`mistral_fn.atomic.atomic_dir`, which also sweeps a partial entry left by
a killed builder); the others, once they hold the lock, find the entry complete and only read it.
The `.lock` file stays, empty. Where the filesystem does not lock across nodes (some NFS/Lustre
mounts), construct the dataset on one rank first, barrier, then on the others.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Callable

import numpy as np

from mistral_fn.atomic import atomic_dir, writable
from mistral_fn.errors import InputError

log = logging.getLogger(__name__)

DESCRIPTION = "description.json"


def user_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/mistral_fn`, or `~/.cache/mistral_fn`."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mistral_fn"


def cache_dirs(prefix: str | os.PathLike, kind: str, cache_dir: str | os.PathLike | None = None) -> list[Path]:
    """Where `kind`'s index caches for the dataset `prefix` may live, in lookup order."""
    if cache_dir is not None:
        return [Path(cache_dir)]
    return [Path(prefix) / "cache" / f"{kind}_indices", user_cache_dir() / f"{kind}_indices"]


def cached(dirs: list[Path], description: dict, build: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The arrays of the entry for `description` (it has a `kind`), memory-mapped read-only: read from
    the first of `dirs` that holds it, else built once by `build` into the first writable one."""
    name = f"{hashlib.md5(json.dumps(description, sort_keys=True).encode()).hexdigest()}-{description['kind']}"
    for directory in dirs:
        if (directory / name / DESCRIPTION).is_file():
            return _load(directory / name)
    directory = next((d for d in dirs if writable(d)), None)
    if directory is None:
        raise InputError(f"no writable place for the {description['kind']} index cache (tried "
                         f"{', '.join(map(str, dirs))}); pass a writable cache directory")
    directory.mkdir(parents=True, exist_ok=True)
    with _exclusive(directory / ".lock"):
        if not (directory / name / DESCRIPTION).is_file():  # not built by another process meanwhile
            log.info("building %s index cache %s", description["kind"], directory / name)
            arrays = build()
            with atomic_dir(directory / name) as tmp:
                for key, array in arrays.items():
                    np.save(tmp / f"{key}.npy", array)
                (tmp / DESCRIPTION).write_text(json.dumps({**description, "arrays": sorted(arrays)}, indent=1))
    return _load(directory / name)


def _load(entry: Path) -> dict[str, np.ndarray]:
    names = json.loads((entry / DESCRIPTION).read_text())["arrays"]
    return {key: np.load(entry / f"{key}.npy", mmap_mode="r") for key in names}


@contextlib.contextmanager
def _exclusive(lock_path: Path):
    """Hold an exclusive POSIX lock on `lock_path` (created if missing); blocks while another process holds it."""
    with open(lock_path, "a") as f:
        fcntl.lockf(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.lockf(f, fcntl.LOCK_UN)
