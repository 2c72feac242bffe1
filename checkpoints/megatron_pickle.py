"""Safe pickling of Megatron `model_optim_rng.pt` files.

Megatron pickles `args` (an `argparse.Namespace`) holding `megatron.core.enums.ModelType` and a
`torch.dtype`; training checkpoints add numpy RNG state. Reading uses `torch.load(weights_only=True)`
with exactly those globals allowed, so any other global is refused before it can run. Without
Megatron installed, a stub `ModelType` with the same module path stands in, both ways: files we write
unpickle in real Megatron, and real Megatron files unpickle here.
"""

from __future__ import annotations

import argparse
import contextlib
import enum
import os
import pickle
import sys
import types
from pathlib import Path

import numpy as np
import torch

from mistral_fn.errors import CheckpointError

ENUMS_MODULE = "megatron.core.enums"


class _StubModelType(enum.Enum):
    """Megatron-LM core_r0.6.0 `megatron.core.enums.ModelType`."""

    encoder_or_decoder = 1
    encoder_and_decoder = 2
    retro_encoder = 3
    retro_decoder = 4


_StubModelType.__module__ = ENUMS_MODULE
_StubModelType.__qualname__ = _StubModelType.__name__ = "ModelType"


def _model_type_class():
    try:
        from megatron.core.enums import ModelType
    except ImportError:
        return _StubModelType
    return ModelType


ModelType = _model_type_class()

_reconstruct = np._core.multiarray._reconstruct if hasattr(np, "_core") else np.core.multiarray._reconstruct

# Everything a Megatron legacy checkpoint's pickle references besides tensors and builtins
# (numpy arrays come from the RNG state of training checkpoints; numpy 1 and 2 spell the module differently).
SAFE_GLOBALS = [
    argparse.Namespace,
    ModelType,
    np.ndarray,
    np.dtype,
    type(np.dtype(np.uint32)),  # numpy's RNG key array
    (_reconstruct, "numpy.core.multiarray._reconstruct"),
    (_reconstruct, "numpy._core.multiarray._reconstruct"),
]


@contextlib.contextmanager
def _importable_enums():
    """Make `megatron.core.enums.ModelType` importable while pickling, if Megatron is not installed."""
    if ModelType is not _StubModelType or ENUMS_MODULE in sys.modules:
        yield
        return
    names = ("megatron", "megatron.core", ENUMS_MODULE)
    modules = {name: types.ModuleType(name) for name in names if name not in sys.modules}
    sys.modules.update(modules)
    sys.modules[ENUMS_MODULE].ModelType = ModelType
    try:
        yield
    finally:
        for name in modules:
            sys.modules.pop(name, None)


def save_pt(obj, path: str | os.PathLike) -> None:
    """`torch.save` (zip format) with `ModelType` pickled under its Megatron module path. A failed write
    (a full disk, a file size limit) is raised as the `OSError` it is, naming `path`: torch's own error
    for it is an opaque `RuntimeError` ("unexpected pos"), so the file is written through `_Recorder`."""
    with _importable_enums(), open(path, "wb") as f:
        recorder = _Recorder(f)
        try:
            torch.save(obj, recorder)
        except RuntimeError:
            if recorder.error is None:
                raise
            raise OSError(recorder.error.errno, recorder.error.strerror, os.fspath(path)) from None


class _Recorder:
    """A write-only file wrapper that keeps the `OSError` of a failed write (torch's writer replaces it)."""

    def __init__(self, file):
        self.file, self.error = file, None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.file.flush()


def load_pt(path: str | os.PathLike, mmap: bool = True):
    """`torch.load` a Megatron file with only `SAFE_GLOBALS` allowed; tensors stay memory-mapped.

    Raises `CheckpointError` naming the file for a missing, corrupt or non-allow-listed file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: missing checkpoint file")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        refused = _unsafe_globals(path) or _reason(e)
        raise CheckpointError(f"{path}: refused to unpickle {refused} (not in the Megatron allow-list)") from None
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        first = str(e).strip().splitlines()[0].split(". ")[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: corrupt or not a torch checkpoint ({first})") from None


def _unsafe_globals(path: Path) -> str:
    """The globals in `path` outside the allow-list, read from the pickle opcodes without running them."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # noqa: BLE001 - only used to word the error
        names = []
    allowed = {g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}" for g in SAFE_GLOBALS}
    names = [n for n in names if n not in allowed]
    return f"global {', '.join(names)}" if names else ""


def _reason(error: Exception) -> str:
    """The one informative line of a weights-only unpickling error."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    detail = next((line for line in lines if line.startswith(("Can only build", "Unsupported"))), "")
    return f"an object ({detail})" if detail else "an object"
