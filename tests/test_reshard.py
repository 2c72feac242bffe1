"""Rule tables over the whole train state and resharding between (tp, dp, ZeRO-1) layouts: exact round trips on
the host, and a run saved at tp2 that resumes at dp2 with ZeRO-1 (and at tp2) on gloo processes."""

import types

import pytest
import torch
from safetensors.torch import load_file
from torch.utils import _pytree as pytree

import mistral_fn as mf
import sharding as sh
from checkpoints import native
from mistral_fn import optim, train
from mistral_fn.errors import ConfigError
from mistral_fn.params import leaves_with_paths
from sharding.train_state import nest
from tests.multirank import run_workers

CFG = mf.MistralConfig(vocab_size=250, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64)
RULES = sh.mistral_rules(CFG, make_vocab_size_divisible_by=2)
OPT = optim.adamw(1e-2, b2=0.95, weight_decay=0.1, mask=optim.decay_mask)


def make_batch(n, seq=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, CFG.vocab_size, (n, seq + 1), generator=g)
    return {"tokens": x[:, :-1], "labels": x[:, 1:], "loss_mask": torch.ones(n, seq, dtype=torch.long)}


def loss_fn(params, micro_batch, tp=mf.SINGLE_DEVICE):
    return mf.loss_fn(params, micro_batch, CFG, tp=tp)


@pytest.fixture(scope="module")
def trained():
    """A one-device state after two AdamW steps (non-zero moments, counters), as `{path: tensor}`."""
    step = train.make_train_step(loss_fn, OPT, micro_batch_size=1, max_grad_norm=1.0)
    state = train.init_train_state(mf.init_params(CFG, seed=0), OPT)
    for k in range(2):
        state, _ = step(state, make_batch(2, seed=k))
    return dict(leaves_with_paths(state))


def test_state_specs_follow_params_by_suffix():
    state = train.init_train_state(mf.init_params(CFG, device="meta"), optim.chain(optim.clip_by_global_norm(1.0), OPT))
    specs = dict(leaves_with_paths(sh.state_specs(state, RULES), is_leaf=lambda x: isinstance(x, sh.PartitionSpec)))
    wq = sh.P("tp", None, head_dim=CFG.head_dim)
    assert specs["params/layers/1/attn/wq"] == specs["opt_state/1/mu/layers/1/attn/wq"] == wq
    assert specs["opt_state/1/nu/layers/0/attn_norm"] == sh.P(None)  # not the `norm` rule: suffixes cut at '/'
    assert specs["opt_state/1/nu/embed"] == sh.followed_param("opt_state/1/nu/embed", RULES)[1]
    assert specs["opt_state/1/count"] == specs["step"] == sh.P()  # counters are replicated
    assert sh.followed_param("opt_state/1/count", RULES) is None
    rules = [(r"w", sh.P("tp")), (r"layers/\d+/w", sh.P(None))]  # the longest matching suffix wins
    assert sh.followed_param("opt_state/mu/layers/3/w", rules) == ("layers/3/w", sh.P(None))
    assert sh.followed_param("opt_state/mu/w", rules) == ("w", sh.P("tp"))
    blocks = train.init_train_state(mf.init_params(CFG), OPT, distributed_optimizer=True)
    with pytest.raises(ConfigError, match=r"^opt_state/mu/embed: rule 'embed' gives P\('tp', None.* for 2 dims but the "
                                          r"leaf has 1$"):
        sh.state_specs(blocks, RULES)  # ZeRO blocks are 1-D: sharding.train_state handles them


LAYOUTS = {
    "tp2": sh.StateLayout({"tp": 2}),
    "dp2xtp2": sh.StateLayout({"dp": 2, "tp": 2}),
    "zero_dp2": sh.StateLayout({"dp": 2}, distributed_optimizer=True),
    "zero_dp3xtp2_bf16": sh.StateLayout({"tp": 2, "dp": 3}, distributed_optimizer=True, compute_dtype=torch.bfloat16),
}


@pytest.mark.parametrize("name", LAYOUTS)
def test_scatter_then_gather_is_bit_exact(name, trained):
    layout = LAYOUTS[name]
    ranks = [sh.scatter_state(trained, layout, c, RULES) for c in layout.all_coords()]
    assert all(len(r) == len(ranks[0]) for r in ranks)
    back = sh.gather_state(nest(ranks, list(layout.mesh_shape.values())), layout, RULES)
    assert back.keys() == trained.keys()
    for path, x in trained.items():
        assert x.dtype == back[path].dtype and torch.equal(x, back[path]), path


def test_reshard_between_layouts_round_trips_exactly(trained):
    """As a native checkpoint holds it: the train state under `train/`, beside the data generator's state."""
    a, b = LAYOUTS["tp2"], LAYOUTS["zero_dp3xtp2_bf16"]
    saved = {**{f"train/{path}": x for path, x in trained.items()}, "rng": torch.Generator().get_state()}
    pieces = nest([sh.scatter_state(saved, a, c, RULES) for c in a.all_coords()], [1, 2])
    there = sh.reshard_state(pieces, a, b, RULES)
    assert len(there) == 3 and len(there[0]) == 2
    rank = there[2][1]  # dp 2 of 3, tp 1: the last block of each 8 x 32 shard of wk (blocks of 86, 86, 84)
    wk = rank["train/params/layers/0/attn/wk"]
    assert wk.dtype == torch.bfloat16 and wk.shape == (8, 32) and torch.equal(rank["rng"], saved["rng"])
    assert rank["train/master/layers/0/attn/wk"].shape == rank["train/opt_state/mu/layers/0/attn/wk"].shape == (84,)
    back = sh.reshard_state(there, b, a, RULES)
    for piece, ref in zip(back[0], pieces[0], strict=True):
        assert piece.keys() == ref.keys() and all(torch.equal(piece[p], ref[p]) for p in ref)


@pytest.mark.parametrize("compute_dtype", [None, torch.bfloat16])
def test_scatter_builds_what_init_train_state_builds(compute_dtype):
    """A fresh canonical state, scattered to a ZeRO-1 rank, is that rank's `init_train_state` bit for bit."""
    params = mf.init_params(CFG, seed=0)
    layout = sh.StateLayout({"dp": 3, "tp": 2}, distributed_optimizer=True, compute_dtype=compute_dtype)
    canonical = dict(leaves_with_paths(train.init_train_state(params, OPT)))
    for coords in layout.all_coords():
        local = sh.shard(params, sh.match(params, RULES), layout.mesh_shape, coords)
        dp = types.SimpleNamespace(size=3, rank=coords["dp"])
        template = train.init_train_state(local, OPT, dp=dp, distributed_optimizer=True, compute_dtype=compute_dtype)
        state = sh.as_tree(sh.scatter_state(canonical, layout, coords, RULES), template)
        for a, b in zip(pytree.tree_leaves(state), pytree.tree_leaves(template), strict=True):
            assert a.dtype == b.dtype and torch.equal(a, b)


def test_gather_and_as_tree_name_the_culprit(trained):
    layout = LAYOUTS["tp2"]
    ranks = [sh.scatter_state(trained, layout, c, RULES) for c in layout.all_coords()]
    ranks[1]["step"] = ranks[1]["step"] + 1
    with pytest.raises(ConfigError, match=r"^step: differs between ranks \{'dp': 0, 'tp': 0\} and "
                                          r"\{'dp': 0, 'tp': 1\}"):
        sh.gather_state([ranks], layout, RULES)
    with pytest.raises(ConfigError, match="expected a list of 2 pieces along a mesh axis, got 1"):
        sh.gather_state([ranks[:1]], layout, RULES)
    template = train.init_train_state(mf.init_params(CFG), OPT)
    with pytest.raises(ConfigError, match=r"^params/embed: resharded to torch.float32 \(126, 32\), but this run "
                                          r"expects torch.float32 \(250, 32\)$"):
        sh.as_tree(ranks[0], template)
    with pytest.raises(ConfigError, match=r"^params/norm: missing from the resharded state$"):
        sh.as_tree({k: v for k, v in trained.items() if k != "params/norm"}, template)
    with pytest.raises(ConfigError, match=r"^extra: in the resharded state but not in this run's state$"):
        sh.as_tree({**trained, "extra": torch.zeros(())}, template)
    with pytest.raises(ConfigError, match="compute dtype only with the distributed optimizer"):
        sh.StateLayout({"tp": 2}, compute_dtype=torch.bfloat16)


# ---- resume on another layout (gloo processes) ------------------------------------------------------

STEPS, SAVE_AT = 4, 2


def global_batch(step: int) -> dict:
    return make_batch(2, seed=200 + step)


def _run(mesh, state, steps, distributed_optimizer=False):
    """Run `steps` of the global batches on `mesh`; returns the state and the losses."""
    specs = sh.match(mf.init_params(CFG, device="meta"), RULES)
    sharded = {p for p, s in leaves_with_paths(specs, is_leaf=lambda x: isinstance(x, sh.PartitionSpec))
               if any(a is not None for a in s.axes)}
    step = train.make_train_step(lambda p, b: loss_fn(p, b, mesh.tp), OPT, micro_batch_size=1, dp=mesh.dp, tp=mesh.tp,
                                 sharded_paths=sharded, max_grad_norm=1.0, distributed_optimizer=distributed_optimizer)
    dp, d, losses = mesh.shape["dp"], mesh.coords["dp"], []
    for k in steps:
        batch = {key: v.view(dp, -1, *v.shape[1:])[d] for key, v in global_batch(k).items()}
        state, m = step(state, batch)
        losses.append(m["loss"])
    return state, losses


def _template(mesh, distributed_optimizer):
    params = mf.init_params(CFG, seed=0)
    local = sh.shard(params, sh.match(params, RULES), mesh.shape, mesh.coords)
    return train.init_train_state(local, OPT, dp=mesh.dp, distributed_optimizer=distributed_optimizer)


def _first_run(rank: int, out_dir: str):
    """tp2: steps 1-2, a native checkpoint, steps 3-4 (the uninterrupted run)."""
    mesh = sh.Mesh({"dp": 1, "tp": 2}, device_type="cpu")
    state, first = _run(mesh, _template(mesh, False), range(SAVE_AT))
    native.save_native(f"{out_dir}/ckpt", SAVE_AT, state, rank=rank, world_size=2, barrier=torch.distributed.barrier)
    state, rest = _run(mesh, state, range(SAVE_AT, STEPS))
    torch.save({"losses": first + rest, "state": dict(leaves_with_paths(state))}, f"{out_dir}/first{rank}.pt")


def _resumed_runs(rank: int, out_dir: str):
    """Steps 3-4 at dp2 with ZeRO-1 and at tp2, each from its resharded copy of the checkpoint."""
    out = {}
    for name, shape, zero in (("zero_dp2", {"dp": 2, "tp": 1}, True), ("tp2", {"dp": 1, "tp": 2}, False)):
        mesh = sh.Mesh(shape, device_type="cpu")
        flat = torch.load(f"{out_dir}/{name}_rank{rank}.pt", weights_only=True)
        state, losses = _run(mesh, sh.as_tree(flat, _template(mesh, zero)), range(SAVE_AT, STEPS), zero)
        out[name] = {"losses": losses, "state": dict(leaves_with_paths(state))}
    torch.save(out, f"{out_dir}/resumed{rank}.pt")


@pytest.mark.slow
def test_resume_at_another_layout_continues_the_loss_curve(tmp_path):
    run_workers(_first_run, 2, str(tmp_path))
    first = [torch.load(tmp_path / f"first{r}.pt", weights_only=True) for r in range(2)]
    iteration = tmp_path / "ckpt" / native.iter_name(SAVE_AT)
    saved = [[load_file(iteration / f"rank_{r:03d}.safetensors") for r in range(2)]]  # what --load reads, per rank
    src = sh.StateLayout({"tp": 2})
    for name, dst in (("zero_dp2", sh.StateLayout({"dp": 2}, distributed_optimizer=True)), ("tp2", src)):
        for coords, flat in zip(dst.all_coords(), sum(sh.reshard_state(saved, src, dst, RULES), [])):
            torch.save(flat, tmp_path / f"{name}_rank{coords['dp'] + coords['tp']}.pt")
    run_workers(_resumed_runs, 2, str(tmp_path))
    resumed = [torch.load(tmp_path / f"resumed{r}.pt", weights_only=True) for r in range(2)]

    uninterrupted = first[0]["losses"][SAVE_AT:]
    assert resumed[0]["tp2"]["losses"] == resumed[1]["tp2"]["losses"] == uninterrupted  # same layout: bit for bit
    for r in resumed:  # tp2 -> dp2 with ZeRO-1: other reduction orders, the same curve
        assert r["zero_dp2"]["losses"] == pytest.approx(uninterrupted, rel=1e-6, abs=0)
    # final states, compared in canonical form (vocab padding rows carry no information and are re-made)
    final = sh.gather_state([[f["state"] for f in first]], src, RULES)
    same_layout = sh.gather_state([[r["tp2"]["state"] for r in resumed]], src, RULES)
    zero_dp2 = sh.gather_state([[r["zero_dp2"]["state"]] for r in resumed], sh.StateLayout({"dp": 2}, True), RULES)
    assert final.keys() == same_layout.keys() == zero_dp2.keys()
    for path, x in final.items():
        assert torch.equal(x, same_layout[path]), path
        scale = x.abs().max().clamp_min(1e-30) if x.is_floating_point() else 1
        assert (zero_dp2[path] - x).abs().max() <= 1e-5 * scale, path
