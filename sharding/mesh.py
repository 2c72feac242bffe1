"""`Mesh`: named process axes (`pp`, `dp`, `tp`) over `torch.distributed.init_device_mesh`.

Processes come from `torchrun` (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`; across
nodes `--nnodes/--node_rank` as ModelLink's `NNODES`/`NODE_RANK`). Axes are laid out row-major in the
order pp, dp, tp, so the ranks of one TP group are adjacent (on one node), as in Megatron. A mesh of one
process never touches torch.distributed.
"""

from __future__ import annotations

import datetime
import math
import os
from typing import Mapping

import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from mistral_fn import device as _device
from mistral_fn.errors import ConfigError
from mistral_fn.parallel import SINGLE_DEVICE, DataParallel, TensorParallel
from sharding.collectives import GroupDP, GroupTP
from sharding.shard import check_mesh

AXES = ("pp", "dp", "tp")
_TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class Mesh:
    """This process's place on a mesh of `shape` (e.g. `{"tp": 8}` or `{"dp": 2, "tp": 4}`).

    `shape` and `coords` are dicts in axis order; `device` is this process's device; `tp` is the
    `TensorParallel` the model takes (`SINGLE_DEVICE` when the tp axis has size 1: no collective), with
    Megatron's sequence parallelism when `sequence_parallel` (and tp > 1); `dp` is the train step's
    `DataParallel` (`SINGLE_DEVICE` when the dp axis has size 1). `timeout` bounds the rendezvous and every
    collective's wait for a peer (Megatron's `--distributed-timeout-minutes`; None: torch's default).
    As a context manager (`with mesh:`) it is left when the block ends: `close`d, or `abort`ed after an error.
    """

    def __init__(self, shape: Mapping[str, int], device_type: str | None = None, *,
                 sequence_parallel: bool = False, timeout: datetime.timedelta | None = None):
        unknown = [axis for axis in shape if axis not in AXES]
        if unknown:
            raise ConfigError(f"unknown mesh axis {unknown[0]!r}; known axes: {', '.join(AXES)}")
        check_mesh(shape)
        self.shape = {axis: shape[axis] for axis in AXES if axis in shape}
        self.size = math.prod(self.shape.values())
        world = _world_size()
        if self.size != world:
            raise ConfigError(f"mesh {self.shape} has {self.size} ranks but WORLD_SIZE={world}")
        self.device_type = _device.device_type(device_type)
        self.device = _device.local_device(self.device_type)
        self._mesh = None if world == 1 else _device_mesh(self.device_type, self.shape, timeout)
        self.coords = dict(zip(self.shape, self._mesh.get_coordinate() if self._mesh else [0] * len(self.shape)))
        self.rank = dist.get_rank() if self._mesh else 0
        self.tp: TensorParallel = (SINGLE_DEVICE if self.shape.get("tp", 1) == 1
                                   else GroupTP(self.group("tp"), sequence_parallel))
        self.dp: DataParallel = SINGLE_DEVICE if self.shape.get("dp", 1) == 1 else GroupDP(self.group("dp"))

    def group(self, axis: str) -> dist.ProcessGroup:
        """The process group of this rank's peers along `axis` (needs a multi-process mesh)."""
        if self._mesh is None:
            raise ConfigError(f"a single-process mesh has no process group for axis {axis!r}")
        return self._mesh.get_group(axis)

    def close(self) -> None:
        """Leave the mesh once its collectives are done: a barrier, then the process group is destroyed, so
        no rank exits while a peer still talks to it (a no-op on one process)."""
        if self._mesh is not None and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
        self._mesh = None

    def abort(self) -> None:
        """Leave the mesh after a failure: destroy the process group without the barrier, which would wait
        (until the timeout) for a peer that may be the one that failed or stalled."""
        if self._mesh is not None and dist.is_initialized():
            dist.destroy_process_group()
        self._mesh = None

    def __enter__(self) -> "Mesh":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """`close` after the block, `abort` when it raised (any exception, an exit or an interrupt included)."""
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def __repr__(self):
        return f"Mesh({self.shape}, coords={self.coords}, device={self.device})"


def _world_size() -> int:
    value = os.environ.get("WORLD_SIZE", "1")
    if not value.isdigit() or int(value) < 1:
        raise ConfigError(f"WORLD_SIZE={value!r} is not a positive integer")
    return int(value)


def _device_mesh(device_type: str, shape: dict[str, int], timeout: datetime.timedelta | None):
    if not dist.is_initialized():
        missing = [name for name in _TORCHRUN_VARS if name not in os.environ]
        if missing:
            world = os.environ["WORLD_SIZE"]
            raise ConfigError(f"WORLD_SIZE={world} but {', '.join(missing)} not set; launch with torchrun")
        dist.init_process_group(backend=_device.dist_backend(device_type), timeout=timeout)
    return init_device_mesh(device_type, tuple(shape.values()), mesh_dim_names=tuple(shape))
