"""LoRA under tensor parallelism on 2 gloo processes, with and without sequence parallelism, equals one device:
loss, adapter gradients, and a whole train step (TP-aware gradient norm and clipping) on the sharded adapters."""

import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp
from torch.utils import _pytree as pytree

import mistral_fn as mf
import sharding as sh
from mistral_fn.params import leaves_with_paths, tree_map

CFG = mf.MistralConfig(vocab_size=1001, dim=32, n_layers=2, n_heads=8, n_kv_heads=4, ffn_dim=48, sliding_window=5,
                       max_seq_len=64)
RULES = sh.with_lora_rules(sh.mistral_rules(CFG, make_vocab_size_divisible_by=8))
TP = 2
TOLERANCE = 1e-5


def _setup():
    """Base params, adapters on every ModelLink target with B != 0 (as after training), a batch."""
    params = mf.init_params(CFG, seed=0)
    tree = mf.lora.init(params, CFG, rank=4, alpha=8, targets=mf.lora.MODELLINK_TARGETS, seed=0)
    g = torch.Generator().manual_seed(1)
    tree = tree_map(lambda x: x + 0.05 * torch.randn(x.shape, generator=g), tree)
    x = torch.randint(0, CFG.vocab_size, (2, 13), generator=g)  # 12 positions: divisible by tp (SP)
    mask = torch.ones(2, 12, dtype=torch.int64)
    mask[0, -3:] = 0
    return params, tree, {"tokens": x[:, :-1], "labels": x[:, 1:], "loss_mask": mask}


def _run(params, tree, batch, tp=mf.SINGLE_DEVICE):
    """(loss, adapter grads, train-step metrics, adapters after one clipped SGD step) on this rank's shards."""
    specs = sh.match(tree, RULES)
    sharded = {path for path, spec in leaves_with_paths(specs, is_leaf=lambda s: isinstance(s, sh.PartitionSpec))
               if "tp" in spec.axes}

    def loss(adapters, micro_batch):
        return mf.loss_fn(mf.lora.apply(params, adapters, tp), micro_batch, CFG, tp=tp)

    grads, value = torch.func.grad_and_value(loss)(tree, batch)
    optimizer = mf.optim.sgd(0.5)
    step = mf.make_train_step(loss, optimizer, micro_batch_size=1, tp=tp, sharded_paths=sharded, max_grad_norm=0.1)
    state, metrics = step(mf.init_train_state(tree, optimizer), batch)
    return value, grads, metrics, state.params


def _worker(rank: int, port: int, out_dir: str, sequence_parallel: bool):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(TP), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    mesh = sh.Mesh({"tp": TP}, device_type="cpu", sequence_parallel=sequence_parallel)
    params, tree, batch = _setup()
    local = sh.shard(params, sh.match(params, RULES), mesh.shape, mesh.coords)
    local_tree = sh.shard(tree, sh.match(tree, RULES), mesh.shape, mesh.coords)
    loss, grads, metrics, stepped = _run(local, local_tree, batch, mesh.tp)
    torch.save({"loss": loss, "grads": pytree.tree_leaves(grads), "grad_norm": metrics["grad_norm"],
                "stepped": pytree.tree_leaves(stepped)}, f"{out_dir}/rank{rank}.pt")
    mesh.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@pytest.mark.slow
@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp2", "tp2_sp"])
def test_tp2_lora_loss_grads_and_step_equal_one_device(sequence_parallel, tmp_path):
    ctx = mp.start_processes(_worker, args=(_free_port(), str(tmp_path), sequence_parallel), nprocs=TP, join=False,
                             start_method="fork")
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=max(deadline - time.monotonic(), 0.0)):
        if time.monotonic() >= deadline:
            for process in ctx.processes:
                process.kill()
            pytest.fail("TP workers did not finish within 120 s")
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(TP)]

    params, tree, batch = _setup()
    loss, grads, metrics, stepped = _run(params, tree, batch)
    treedef, specs = pytree.tree_structure(tree), sh.match(tree, RULES)
    errors = {f"loss rank {r}": _rel(res["loss"], loss) for r, res in enumerate(results)}
    errors.update({f"grad_norm rank {r}": abs(res["grad_norm"] / metrics["grad_norm"] - 1) for r, res in
                   enumerate(results)})
    for name, reference in (("grads", grads), ("stepped", stepped)):
        pieces = [pytree.tree_unflatten(res[name], treedef) for res in results]
        full = sh.unshard(pieces, specs, {"tp": TP})
        errors.update({f"{name} {path}": _rel(x, ref) for (path, x), (_, ref) in
                       zip(leaves_with_paths(full), leaves_with_paths(reference), strict=True)})
    assert metrics["grad_norm"] > 0.1  # the step clipped: the norm over the sharded adapters mattered
    print(f"max relative error {max(errors.values()):.2e} ({max(errors, key=errors.get)})")
    assert max(errors.values()) < TOLERANCE, {k: v for k, v in errors.items() if v >= TOLERANCE}
