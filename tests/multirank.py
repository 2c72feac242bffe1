"""Run a test function on several gloo processes (forked: the children inherit the imported torch and
mistral_fn; spawn would re-import them, ~5 s each). Each worker writes its results under a directory."""

from __future__ import annotations

import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, worker, args):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    worker(rank, *args)
    if dist.is_initialized():
        dist.destroy_process_group()


def run_workers(worker, world: int, *args, timeout_s: float = 120.0) -> None:
    """`worker(rank, *args)` on `world` processes with torchrun's environment (RANK, WORLD_SIZE, ...) set;
    fail (never hang) if they take longer than `timeout_s` or one of them fails."""
    ctx = mp.start_processes(_entry, args=(world, free_port(), worker, args), nprocs=world, join=False,
                             start_method="fork")
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=max(deadline - time.monotonic(), 0.0)):
        if time.monotonic() >= deadline:
            for process in ctx.processes:
                process.kill()
            pytest.fail(f"{world} workers did not finish within {timeout_s:.0f} s")
