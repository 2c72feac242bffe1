"""Device and distributed-backend selection: npu (Ascend, via torch_npu) > cuda > cpu.

torch_npu is imported lazily and only here. Without CANN its import raises a RuntimeError (not an
ImportError), so every failure to import it means "no NPU". `mistral_fn/__init__` sets
`TORCH_DEVICE_BACKEND_AUTOLOAD=0` (unless the user set it) so `import torch` never autoloads it.
"""

from __future__ import annotations

import functools
import importlib
import os

import torch

from mistral_fn.errors import ConfigError, DeviceError

BACKENDS = {"npu": "hccl", "cuda": "nccl", "cpu": "gloo"}


@functools.lru_cache(maxsize=None)
def torch_npu():
    """The `torch_npu` module, or None when it is not installed or cannot load (no CANN)."""
    if importlib.util.find_spec("torch_npu") is None:
        return None
    try:
        return importlib.import_module("torch_npu")
    except Exception:  # noqa: BLE001 - a broken CANN install raises RuntimeError/OSError, not ImportError
        return None


def npu_available() -> bool:
    module = torch_npu()
    return module is not None and hasattr(torch, "npu") and torch.npu.is_available()


def device_type(preferred: str | None = None) -> str:
    """`preferred` if given (validated: `ConfigError` unless it is npu, cuda or cpu, `DeviceError` when it is
    not available), else the best available of npu, cuda, cpu."""
    if preferred:
        kind = preferred.split(":")[0]
        if kind not in BACKENDS:
            raise ConfigError(f"--device={preferred}: expected one of {', '.join(BACKENDS)}")
        if kind == "npu" and not npu_available():
            raise DeviceError("--device=npu: torch_npu or an Ascend device is not available here")
        if kind == "cuda" and not torch.cuda.is_available():
            raise DeviceError("--device=cuda: CUDA is not available here")
        return kind
    if npu_available():
        return "npu"
    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


def dist_backend(kind: str) -> str:
    """The torch.distributed backend for a device type: hccl, nccl or gloo."""
    try:
        return BACKENDS[kind]
    except KeyError:
        raise ValueError(f"no distributed backend known for device type {kind!r}") from None


def local_device(kind: str, local_rank: int | None = None) -> torch.device:
    """The device for this process (`LOCAL_RANK` under torchrun), made current for npu/cuda."""
    if kind == "cpu":
        return torch.device("cpu")
    index = int(os.environ.get("LOCAL_RANK", 0)) if local_rank is None else local_rank
    getattr(torch, kind).set_device(index)
    return torch.device(kind, index)


def is_npu(x: torch.Tensor) -> bool:
    return x.device.type == "npu"
