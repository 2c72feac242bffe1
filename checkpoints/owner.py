"""Who may write a training run's `--save` directory: `claim_save_dir`, called once before any work.

A save directory is either new (absent or empty) or a native checkpoint directory of this project.
A run resumes an existing one only when its `--load` names it; anything else there (an HF model, a
Megatron checkpoint, unrelated files, or checkpoints of an earlier run that `--load` does not name) is
refused with one line saying what to do, so no run writes over, prunes or re-points what it does not own.
The claim gives the run a fresh run id in `<save>/owner.msgpack`; every rank file it saves carries that
id, and `keep_last` pruning deletes only iterations with it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Callable

from checkpoints import native
from checkpoints.megatron import TRACKER
from mistral_fn.errors import CheckpointError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SaveClaim:
    """A claimed save directory: `run_id` (pass it to `save_native`) and `resume_step`, the iteration
    to resume when `load` named this directory (None: nothing to resume, start from `load` or scratch)."""

    root: Path
    run_id: str
    resume_step: int | None


def claim_save_dir(save: str | os.PathLike, load: str | os.PathLike | None = None, *, finetune: bool = False,
                   rank: int = 0, barrier: Callable[[], None] | None = None) -> SaveClaim:
    """Claim `save` for this run, or raise `CheckpointError` (the same on every rank) saying why not.

    Allowed: an absent or empty directory (a new run); a native checkpoint directory that `load` names
    (the root or one of its `iter_*` directories: a resume, unless `finetune`, which starts a new run
    and so needs its own directory); a native directory that holds no iteration yet (an earlier run
    that stopped before its first save). Multi-rank: every rank calls this with its `rank` and the same
    `barrier`; all ranks inspect the directory before rank 0 writes the owner file.
    """
    save, barrier = Path(save), barrier or (lambda: None)
    resume_step = _inspect(save, Path(load) if load else None, finetune)
    barrier()
    if rank == 0:
        save.mkdir(parents=True, exist_ok=True)
        native.write_owner(save, native.new_run_id())
    barrier()
    return SaveClaim(save, native.read_owner(save), resume_step)


def _inspect(save: Path, load: Path | None, finetune: bool) -> int | None:
    """The step to resume (None: none), or raise when `save` may not be written by this run."""
    if save.exists() and not save.is_dir():
        raise CheckpointError(f"{save}: is a file; --save must be a directory")
    entries = sorted(p.name for p in save.iterdir()) if save.is_dir() else []
    if not entries:
        return None
    if native.is_native(save):
        steps = native.list_steps(save)
        latest = native.latest_step(save)
        if load is not None and _names(load, save):
            if finetune:
                raise CheckpointError(f"{save}: --finetune starts a new run from the checkpoint in this directory; "
                                      "give it an empty --save directory of its own")
            return native.step_of(load) if native.step_of(load) is not None else latest
        if steps or latest is not None:
            shown = native.iter_name(latest if latest is not None else steps[-1])
            raise CheckpointError(f"{save}: holds the checkpoints of an earlier run (latest {shown}); pass "
                                  f"--load={save} to resume it, or choose an empty --save directory")
        log.info("%s: claiming a checkpoint directory with no iteration yet", save)
        return None
    if (save / "config.json").is_file():
        kind = "an HF model directory"
    elif (save / TRACKER).is_file():
        kind = "a Megatron checkpoint directory"
    else:
        kind = f"not empty ({entries[0]!r}{', ...' if len(entries) > 1 else ''}) and holds no native checkpoint"
    raise CheckpointError(f"{save}: is {kind}; --save must be an empty directory or a native checkpoint "
                          "directory of this project")


def _names(load: Path, save: Path) -> bool:
    """True when `load` is `save` itself or one of its `iter_*` directories."""
    load, save = load.resolve(), save.resolve()
    return load == save or (load.parent == save and native.step_of(load) is not None)
