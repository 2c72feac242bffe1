"""Ranks of a torchrun job, simulated in one process for checkpoint tests: one thread per rank, sharing a
barrier as the ranks share `torch.distributed.barrier`."""

from __future__ import annotations

import threading

import checkpoints
import sharding


def on_ranks(world: int, fn) -> None:
    """Run `fn(rank, barrier)` for every rank at once, `barrier` a callable shared by all; a rank's error
    breaks the barrier (so no rank waits forever) and is raised once every rank has stopped."""
    barrier, errors = threading.Barrier(world), []

    def run(rank):
        try:
            fn(rank, barrier.wait)
        except BaseException as e:  # noqa: BLE001 - raised below
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def save_tp_ranks(root, step: int, params, config, *, tp: int = 2, divisible_by: int = 1,
                  state=lambda local: {"params": local}):
    """Each of `tp` ranks saves `{"train": state(its shard of params)}` as iteration `step` of `root`, with the
    `extra` a training run writes (`tp`, `dp`, the HF config), as `experiments.pretrain` lays out a model."""
    specs = sharding.match(params, sharding.mistral_rules(config, divisible_by))

    def save(rank, barrier):
        local = sharding.shard(params, specs, {"tp": tp}, {"tp": rank})
        checkpoints.save_native(root, step, {"train": state(local)}, extra={"tp": tp, "dp": 1, "config": config.to_hf()},
                                rank=rank, world_size=tp, barrier=barrier)

    on_ranks(tp, save)
    return root
