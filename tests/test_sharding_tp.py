"""Tensor-parallel forward, loss and gradients (with and without sequence parallelism) on 2 and 4 gloo processes
equal one device; Mesh checks."""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import mistral_fn as mf
import sharding as sh
from mistral_fn.errors import ConfigError
from mistral_fn.params import leaves_with_paths
from tests.multirank import run_workers

# Odd layer count, a window shorter than the sequence, a vocab that needs padding (1001 -> 1008 / 1024).
CFG = mf.MistralConfig(vocab_size=1001, dim=32, n_layers=3, n_heads=8, n_kv_heads=4, ffn_dim=48,
                       sliding_window=5, max_seq_len=64)
DIVISIBLE_BY = 8
RULES = sh.mistral_rules(CFG, make_vocab_size_divisible_by=DIVISIBLE_BY)
LOGITS_SPEC = sh.P(None, None, "tp", unpadded=CFG.vocab_size, divisible_by=DIVISIBLE_BY)
TOLERANCE = 1e-5


def _batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, CFG.vocab_size, (2, 13), generator=g)
    x[0, :6] = torch.tensor([0, 503, 504, 1000, 255, 256])  # ids at the rank boundaries and the last real id
    labels = x[:, 1:].clone()
    labels[1, 3] = -100
    mask = torch.ones_like(labels)
    mask[0, -2:] = 0
    return {"tokens": x[:, :-1], "labels": labels, "loss_mask": mask}


def _worker(rank: int, mesh_shape: dict, out_dir: str):
    sh.validate_tp(CFG, mesh_shape["tp"], DIVISIBLE_BY)
    mesh = sh.Mesh(mesh_shape, device_type="cpu")
    sp = sh.GroupTP(mesh.group("tp"), sequence_parallel=True)
    params = mf.init_params(CFG, seed=0)
    local = sh.shard(params, sh.match(params, RULES), mesh.shape, mesh.coords)
    batch = _batch()
    out = {"coords": mesh.coords}
    for name, tp, kw in (("tp", mesh.tp, {}), ("sp", sp, {}), ("sp_chunked", sp, dict(recompute=True, chunk_size=5))):
        out[name] = {"logits": mf.forward(local, batch["tokens"], CFG, tp=tp)}
        out[name]["grads"], out[name]["loss"] = torch.func.grad_and_value(mf.loss_fn)(local, batch, CFG, tp=tp, **kw)
    try:
        mf.forward(local, torch.zeros(1, 13, dtype=torch.long), CFG, tp=sp)
    except mf.InputError as e:
        out["sp_error"] = str(e)
    torch.save(out, f"{out_dir}/rank{rank}.pt")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to max |b| (the scale of the leaf)."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@pytest.fixture(scope="module")
def single_device():
    params = mf.init_params(CFG, seed=0)
    batch = _batch()
    grads, loss = torch.func.grad_and_value(mf.loss_fn)(params, batch, CFG)
    return params, mf.forward(params, batch["tokens"], CFG), loss, grads


def _nest(flat: list, sizes: list[int]) -> list:
    """Row-major list -> nested lists, one level per mesh axis (the `pieces` layout of `unshard`)."""
    if len(sizes) == 1:
        return flat
    step = len(flat) // sizes[0]
    return [_nest(flat[i * step:(i + 1) * step], sizes[1:]) for i in range(sizes[0])]


@pytest.mark.slow
@pytest.mark.parametrize("mesh", [{"tp": 2}, {"tp": 4}, {"dp": 2, "tp": 2}], ids=["tp2", "tp4", "dp2xtp2"])
def test_tp_and_sp_logits_loss_and_grads_equal_one_device(mesh, tmp_path, single_device):
    """TP, TP with sequence parallelism, and SP with recomputation and a chunked loss, against one device."""
    params, logits, loss, grads = single_device
    world, tp = math.prod(mesh.values()), mesh["tp"]
    run_workers(_worker, world, mesh, str(tmp_path))
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]
    # Megatron's rank order: tp is the innermost axis, so a TP group is adjacent ranks
    assert [r["coords"] for r in results] == [dict(zip(mesh, divmod(r, tp)[-len(mesh):])) for r in range(world)]
    padded = sh.padded_vocab_size(CFG.vocab_size, tp, DIVISIBLE_BY)
    assert all(r["tp"]["logits"].shape == (2, 12, padded // tp) for r in results)
    assert torch.isinf(results[-1]["tp"]["logits"][..., CFG.vocab_size - padded:]).all()  # padded columns are -inf
    for r in results[tp:]:  # data-parallel replicas compute the same thing, bit for bit
        assert torch.equal(r["tp"]["logits"], results[r["coords"]["tp"]]["tp"]["logits"])

    sizes, specs = list(mesh.values()), sh.match(params, RULES)
    errors = {}
    for mode in ("tp", "sp", "sp_chunked"):
        full_logits = sh.unshard(_nest([r[mode]["logits"] for r in results], sizes), LOGITS_SPEC, mesh)
        errors[f"{mode} logits"] = _rel(full_logits, logits)
        errors.update({f"{mode} loss rank {i}": _rel(r[mode]["loss"], loss) for i, r in enumerate(results)})
        full_grads = sh.unshard(_nest([r[mode]["grads"] for r in results], sizes), specs, mesh)
        errors.update({f"{mode} {path}": _rel(g, ref) for (path, g), (_, ref)
                       in zip(leaves_with_paths(full_grads), leaves_with_paths(grads), strict=True)})
        for name in ("embed", "output"):  # the padded vocab rows get no gradient
            assert not torch.cat([r[mode]["grads"][name] for r in results[:tp]])[CFG.vocab_size:].any(), name
        for r in results:  # replicated leaves (the norms) get the whole gradient on every rank, SP included
            assert torch.equal(r[mode]["grads"]["norm"], results[0][mode]["grads"]["norm"]), mode
    print(f"{mesh}: max relative error {max(errors.values()):.2e} ({max(errors, key=errors.get)})")
    assert max(errors.values()) < TOLERANCE, {k: v for k, v in errors.items() if v >= TOLERANCE}
    assert results[0]["sp_error"] == (f"sequence length 13 is not divisible by the tensor-parallel size {tp} "
                                      "(sequence parallelism splits the sequence over the tp ranks)")


def test_tp1_mesh_issues_no_collective(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a collective was issued at tp=1")

    for name in ("all_reduce", "init_process_group", "new_group"):
        monkeypatch.setattr(dist, name, forbidden)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    mesh = sh.Mesh({"dp": 1, "tp": 1}, device_type="cpu", sequence_parallel=True)
    assert mesh.tp is mf.SINGLE_DEVICE and mesh.dp is mf.SINGLE_DEVICE
    assert mesh.coords == {"dp": 0, "tp": 0} and mesh.rank == 0
    params = mf.init_params(CFG, seed=0)
    local = sh.shard(params, sh.match(params, RULES), mesh.shape, mesh.coords)
    torch.func.grad_and_value(mf.loss_fn)(local, _batch(), CFG, tp=mesh.tp)
    assert not dist.is_initialized()
    with pytest.raises(ConfigError, match="single-process mesh has no process group"):
        mesh.group("tp")


def test_mesh_errors_before_any_process_group(monkeypatch):
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: pytest.fail("process group started"))
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ConfigError, match=r"^mesh \{'tp': 2\} has 2 ranks but WORLD_SIZE=4$"):
        sh.Mesh({"tp": 2}, device_type="cpu")
    with pytest.raises(ConfigError, match=r"^mesh \{'dp': 2, 'tp': 4\} has 8 ranks but WORLD_SIZE=4$"):
        sh.Mesh({"tp": 4, "dp": 2}, device_type="cpu")
    for name in ("RANK", "MASTER_ADDR"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError, match=r"WORLD_SIZE=4 but RANK, .*MASTER_ADDR.* not set; launch with torchrun"):
        sh.Mesh({"dp": 2, "tp": 2}, device_type="cpu")
    with pytest.raises(ConfigError, match=r"unknown mesh axis 'ep'"):
        sh.Mesh({"ep": 4}, device_type="cpu")
    with pytest.raises(ConfigError, match=r"mesh axis 'tp' must have a positive integer size, got 0"):
        sh.Mesh({"tp": 0}, device_type="cpu")


def _experiment(*args: str) -> subprocess.CompletedProcess:
    root = Path(__file__).parent.parent
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    return subprocess.run([sys.executable, *args], cwd=root, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_torchrun_tp2_forward_greedy_tokens_match_tp1():
    run = _experiment("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                      "-m", "experiments.tp_forward", "--new_tokens=4")
    assert run.returncode == 0, run.stderr[-3000:]
    tp2 = re.search(r"^TP=2 greedy next tokens: (.*)$", run.stdout, re.M)
    tp1 = re.search(r"^TP=1 greedy next tokens: (.*)$", run.stdout, re.M)
    assert tp2 and tp1 and tp2.group(1) == tp1.group(1) and "TP=2 matches TP=1" in run.stdout, run.stdout


@pytest.mark.slow
def test_tp_forward_reports_a_bad_mesh_in_one_line():
    run = _experiment("-m", "experiments.tp_forward", "--tp=2")
    assert run.returncode == 1
    assert run.stderr.strip().splitlines()[-1] == "error: mesh {'tp': 2} has 2 ranks but WORLD_SIZE=1"
