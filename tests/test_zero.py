"""The distributed optimizer (ZeRO-1) and bucketed gradient reduction: block arithmetic, buckets, one-rank
equivalence with the plain step, and TP x DP (with sequence parallelism too) on gloo processes against one
device."""

import functools
import math

import pytest
import torch
from torch.utils import _pytree as pytree

import mistral_fn as mf
import sharding as sh
from mistral_fn import optim, train, zero
from mistral_fn.errors import InputError
from mistral_fn.params import leaves_with_paths
from tests.multirank import run_workers

CFG = mf.MistralConfig(vocab_size=250, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64)
RULES = sh.mistral_rules(CFG, make_vocab_size_divisible_by=2)
OPT = optim.adamw(1e-2, b2=0.95, weight_decay=0.1, mask=optim.decay_mask)
BUCKET = 3000  # elements: several buckets for the tiny model


def make_batch(n, seq=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, CFG.vocab_size, (n, seq + 1), generator=g)
    mask = (torch.rand(n, seq, generator=g) > 0.2).long()
    return {"tokens": x[:, :-1], "labels": x[:, 1:], "loss_mask": mask, "factor": torch.ones(n)}


def loss_fn(params, micro_batch, tp=mf.SINGLE_DEVICE):
    """The masked loss times `factor` (NaN there poisons one rank's gradients)."""
    core = {k: micro_batch[k] for k in ("tokens", "labels", "loss_mask")}
    return mf.loss_fn(params, core, CFG, tp=tp) * micro_batch["factor"].mean()


# ---- blocks and buckets -----------------------------------------------------------------------------

@pytest.mark.parametrize("parts", [1, 2, 3, 4])
def test_blocks_tile_every_leaf_in_rank_order(parts):
    for numel in (1, 5, 10, 4096):
        bounds = [zero.block(numel, r, parts) for r in range(parts)]
        assert bounds[0][0] == 0 and bounds[-1][1] == numel
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        assert all(stop - start <= math.ceil(numel / parts) for start, stop in bounds)
    assert [zero.block(10, r, 4) for r in range(4)] == [(0, 3), (3, 6), (6, 9), (9, 10)]


def test_bucket_layout_reverse_order_and_regions():
    numels = [100, 7, 50, 3000, 40]
    layout = zero.BucketLayout(numels, parts=3, bucket_size=150)
    # reverse tree order; a bucket closes once it holds >= 150 elements (blocks padded to 3 equal parts)
    assert layout.buckets == [[4, 3], [2, 1, 0]]
    buffer = torch.arange(sum(layout.region) * 3, dtype=torch.float32)
    buffers = list(buffer.split([r * 3 for r in layout.region]))
    seen = []
    for i, n in enumerate(numels):
        views = layout.views(buffers[layout.bucket_of[i]], i)
        assert [v.numel() for v in views] == [stop - start for start, stop in (zero.block(n, r, 3) for r in range(3))]
        seen += [int(x) for v in views for x in v]
    assert len(seen) == len(set(seen)) == sum(numels)  # the leaves' blocks never overlap


@pytest.mark.parametrize("scatter", [False, True])
@pytest.mark.parametrize("use_hook", [False, True])
def test_grad_reducer_sums_micro_batches_exactly(scatter, use_hook):
    g = torch.Generator().manual_seed(0)
    params = [torch.zeros(5, 3), torch.zeros(7), torch.zeros(2, 2)]
    micro = [[torch.randn(x.shape, generator=g) for x in params] for _ in range(3)]
    reducer = zero.GradReducer(params, mf.SINGLE_DEVICE, scatter, bucket_size=10)
    assert len(reducer.layout.buckets) == 2
    reducer.add(micro[0])
    reducer.add(micro[1])
    if use_hook:
        for i in (2, 0):  # leaf 1 never reaches the hook: finish adds it from the returned gradients
            reducer.hook(i, micro[2][i])
        out = reducer.finish(micro[2])
    else:
        reducer.add(micro[2])
        out = reducer.finish()
    expected = [a + b + c for a, b, c in zip(*micro)]
    for got, want in zip(out, expected, strict=True):
        assert torch.equal(got.view(want.shape), want)


# ---- one rank: the ZeRO path equals the plain step bit for bit -----------------------------------------

@pytest.mark.parametrize("compute_dtype", [None, torch.bfloat16])
def test_distributed_optimizer_on_one_rank_equals_plain_step(compute_dtype):
    params = mf.init_params(CFG, seed=0)
    kw = dict(micro_batch_size=1, max_grad_norm=0.5, compute_dtype=compute_dtype)
    plain = train.make_train_step(loss_fn, OPT, **kw)
    zero_step = train.make_train_step(loss_fn, OPT, distributed_optimizer=True, overlap_grad_reduce=True,
                                      bucket_size=BUCKET, donate=True, **kw)
    ref = train.init_train_state(params, OPT)
    state = train.init_train_state(params, OPT, distributed_optimizer=True, compute_dtype=compute_dtype)
    assert bool(pytree.tree_leaves(state.master)) == (compute_dtype is not None)
    for k in range(3):
        batch = make_batch(2, seed=k)
        ref, m_ref = plain(ref, batch)
        state, m = zero_step(state, batch)
        assert m == m_ref
    masters = state.master if compute_dtype else state.params
    for (path, a), (_, b) in zip(leaves_with_paths(ref.params), leaves_with_paths(masters), strict=True):
        assert torch.equal(a.reshape(-1), b.reshape(-1)), path
    assert {x.dtype for x in pytree.tree_leaves(state.params)} == {compute_dtype or torch.float32}
    for a, b in zip(pytree.tree_leaves(ref.opt_state), pytree.tree_leaves(state.opt_state), strict=True):
        assert torch.equal(a.reshape(-1), b.reshape(-1))


def test_compute_dtype_needs_the_distributed_optimizer():
    with pytest.raises(InputError, match="compute_dtype only applies with distributed_optimizer=True"):
        train.init_train_state(mf.init_params(CFG), OPT, compute_dtype=torch.bfloat16)


# ---- TP x DP on gloo processes ------------------------------------------------------------------------

STEPS, MICRO = 3, 2  # per dp rank and step: MICRO micro-batches of one sequence


def global_batch(step: int, dp: int) -> dict:
    return make_batch(MICRO * dp, seed=100 + step)


def rank_batch(step: int, dp: int, dp_rank: int) -> dict:
    return {k: v[dp_rank * MICRO:(dp_rank + 1) * MICRO] for k, v in global_batch(step, dp).items()}


def _state_bytes(tree) -> int:
    return sum(x.numel() * x.element_size() for x in pytree.tree_leaves(tree))


def _zero_worker(rank: int, mesh_shape: dict, out_dir: str):
    mesh = sh.Mesh(mesh_shape, device_type="cpu")
    dp = mesh.shape["dp"]
    params = mf.init_params(CFG, seed=0)
    specs = sh.match(params, RULES)
    local = sh.shard(params, specs, mesh.shape, mesh.coords)
    sharded = {p for p, s in leaves_with_paths(specs, is_leaf=lambda x: isinstance(x, sh.PartitionSpec))
               if any(a is not None for a in s.axes)}
    kw = dict(micro_batch_size=1, dp=mesh.dp, tp=mesh.tp, sharded_paths=sharded, max_grad_norm=0.5,
              bucket_size=BUCKET)
    sp = sh.GroupTP(mesh.group("tp"), sequence_parallel=True) if mesh.shape["tp"] > 1 else mesh.tp
    out = {"coords": mesh.coords}
    for mode, zkw in (("plain", {}), ("zero", dict(distributed_optimizer=True)),
                      ("zero_overlap", dict(distributed_optimizer=True, overlap_grad_reduce=True)),
                      ("zero_overlap_sp", dict(distributed_optimizer=True, overlap_grad_reduce=True))):
        tp = sp if mode.endswith("_sp") else mesh.tp
        step = train.make_train_step(functools.partial(loss_fn, tp=tp), OPT, **{**kw, "tp": tp}, **zkw)
        state = train.init_train_state(local, OPT, dp=mesh.dp, distributed_optimizer=bool(zkw))
        metrics = []
        for k in range(STEPS):
            state, m = step(state, rank_batch(k, dp, mesh.coords["dp"]))
            metrics.append(m)
        poisoned = rank_batch(STEPS, dp, mesh.coords["dp"])
        if mesh.coords["dp"] == dp - 1:
            poisoned["factor"][-1] = float("nan")  # one sample on the last dp rank only
        after, m = step(state, poisoned)
        metrics.append(m)
        unchanged = all(torch.equal(a, b) for a, b in zip(pytree.tree_leaves((after.params, after.opt_state)),
                                                          pytree.tree_leaves((state.params, state.opt_state))))
        out[mode] = {"state": dict(leaves_with_paths(state)), "metrics": metrics, "unchanged_after_nan": unchanged,
                     "optimizer_bytes": _state_bytes((state.opt_state, state.master))}
    torch.save(out, f"{out_dir}/rank{rank}.pt")


@pytest.fixture(scope="module")
def one_device():
    """`STEPS` steps on one device over each step's whole global batch (dp=2), the same micro-batches."""
    step = train.make_train_step(loss_fn, OPT, micro_batch_size=1, max_grad_norm=0.5)
    state, metrics = train.init_train_state(mf.init_params(CFG, seed=0), OPT), []
    for k in range(STEPS):
        state, m = step(state, global_batch(k, 2))
        metrics.append(m)
    return dict(leaves_with_paths(state)), metrics


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@pytest.mark.slow
@pytest.mark.parametrize("mesh", [{"dp": 2, "tp": 1}, {"dp": 2, "tp": 2}], ids=["dp2", "dp2xtp2"])
def test_zero1_over_tp_and_dp_equals_one_device(mesh, tmp_path, one_device):
    ref_state, ref_metrics = one_device
    world = math.prod(mesh.values())
    run_workers(_zero_worker, world, mesh, str(tmp_path))
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]
    errors, full = {}, {}
    for mode in ("plain", "zero", "zero_overlap", "zero_overlap_sp"):
        layout = sh.StateLayout(mesh, distributed_optimizer=mode != "plain")
        pieces = sh.train_state.nest([r[mode]["state"] for r in results], list(layout.mesh_shape.values()))
        full[mode] = sh.gather_state(pieces, layout, RULES)
        assert full[mode].keys() == ref_state.keys()
        errors.update({f"{mode} {path}": _rel(full[mode][path], ref) for path, ref in ref_state.items()
                       if ref.is_floating_point()})
        for r in results:
            for k, (m, m_ref) in enumerate(zip(r[mode]["metrics"], ref_metrics)):
                errors[f"{mode} loss {k}"] = abs(m["loss"] / m_ref["loss"] - 1)
                errors[f"{mode} grad_norm {k}"] = abs(m["grad_norm"] / m_ref["grad_norm"] - 1)
            # one NaN on one rank: every rank skips the step and keeps its state
            assert r[mode]["metrics"][-1]["skipped"] == 1 and r[mode]["unchanged_after_nan"], mode
    worst = max(errors, key=errors.get)
    print(f"{mesh}: max relative error {errors[worst]:.2e} ({worst})")
    # losses and gradient norms of every step to 1e-5; the state after 3 AdamW steps to 1e-5 over dp, 1e-4 with
    # tp (AdamW's m / sqrt(v) turns tp's ~1e-7 rounding of tiny gradient entries into larger relative steps)
    tolerance = {k: 1e-5 if " loss " in k or " grad_norm " in k or mesh["tp"] == 1 else 1e-4 for k in errors}
    assert all(errors[k] < tolerance[k] for k in errors), {k: v for k, v in errors.items() if v >= tolerance[k]}
    assert all(m["grad_norm"] > 0.5 for m in ref_metrics)  # clipping was active
    # ZeRO-1 (overlapped or not) holds the same values as the plain data-parallel step
    for mode in ("zero", "zero_overlap"):
        for path, x in full["plain"].items():
            assert torch.equal(x, full[mode][path]), (mode, path)
    plain, sharded = results[0]["plain"]["optimizer_bytes"], results[0]["zero"]["optimizer_bytes"]
    print(f"{mesh}: optimizer state per rank {plain:,} B plain, {sharded:,} B ZeRO-1 ({sharded / plain:.3f})")
    assert abs(sharded / plain - 0.5) < 0.01
