"""The memory plan: its per-layer activation count equals what autograd really saves, its parameter and
optimizer arithmetic, the command line, and one measured step against the prediction."""

import dataclasses

import pytest
import torch

import mistral_fn as mf
import sharding as sh
from benchmarks import memory_plan as mp
from mistral_fn import model

CFG = mf.MistralConfig(vocab_size=1000, dim=64, n_layers=1, n_heads=8, n_kv_heads=4, ffn_dim=192, max_seq_len=512)


class LoopbackTP(sh.GroupTP):
    """A tp group of 2 in one process whose other rank holds this rank's values: the real autograd Functions
    of `GroupTP`, with collectives that only copy (enough to count saved activations)."""

    def __init__(self, sequence_parallel: bool):
        self.size, self.rank, self.sequence_parallel = 2, 0, sequence_parallel

    def all_reduce(self, x, op="sum"):
        return x.detach() * 2

    def gather_sequence(self, x):
        return torch.cat([x.detach()] * 2, dim=1)

    def scatter_sequence(self, x):
        return x.detach()[:, :x.shape[1] // 2] * 2


def saved_activation_bytes(layer, h, tp, dtype) -> int:
    """Bytes of the distinct storages autograd saves for `model.block`, leaving out the weights and the rotary
    tables (shared by all layers)."""
    cos, sin, mask = model.attention_inputs(None, h.shape[0], 128, CFG, "cpu", dtype)
    exclude = {x.untyped_storage().data_ptr() for x in (*torch.utils._pytree.tree_leaves(layer), cos, sin)}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in exclude:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.block(layer, h, cos, sin, mask, CFG, tp)
    return sum(seen.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tp_size, sequence_parallel", [(1, False), (2, False), (2, True)], ids=["tp1", "tp2", "sp2"])
def test_layer_activations_are_what_autograd_saves(dtype, tp_size, sequence_parallel):
    params = mf.params.cast(mf.init_params(CFG, seed=0), dtype)
    local = sh.shard(params, sh.match(params, sh.mistral_rules(CFG)), {"tp": tp_size}, {"tp": 0})
    layer = mf.params.tree_map(lambda x: x.requires_grad_(), local["layers"][0])
    tp = LoopbackTP(sequence_parallel) if tp_size > 1 else mf.SINGLE_DEVICE
    seq = 128 // tp_size if sequence_parallel else 128
    h = torch.randn(2, seq, CFG.dim, dtype=dtype, requires_grad=True)
    setup = mp.Setup(CFG, 128, micro_batch_size=2, tp=tp_size, sequence_parallel=sequence_parallel,
                     compute_dtype=dtype)
    assert mp.layer_activations(setup) == saved_activation_bytes(layer, h, tp, dtype)


def test_params_and_optimizer_per_rank():
    cfg = mf.MistralConfig.mistral_7b_instruct_v0_2()
    base = mp.Setup(cfg, 32768, tp=8, compute_dtype=torch.bfloat16)
    n = mp.local_param_counts(base)["total"]
    assert n * 2 == 1_810_898_944  # `sharding.describe`'s bf16 bytes per rank at tp=8
    plain, zero = mp.plan(base), mp.plan(dataclasses.replace(base, dp=4, distributed_optimizer=True))
    assert plain["params"] == 6 * n and plain["optimizer"] == 8 * n  # float32 masters + bf16 copy; AdamW moments
    assert zero["params"] == 2 * n + 4 * n // 4 and zero["optimizer"] == 8 * n // 4  # ZeRO-1: blocks over dp
    assert mp.plan(dataclasses.replace(base, sequence_parallel=True))["activations"] < plain["activations"]
    assert all(plan["peak"] == sum(plan[k] for k in ("params", "gradients", "optimizer", "activations"))
               for plan in (plain, zero))


def test_command_line_prints_the_plan_and_the_verdict(capsys):
    mp.main(["--model=mistral-7b", "--seq_length=32768", "--tp=8", "--dp=1", "--sequence_parallel",
             "--distributed_optimizer", "--recompute_granularity=full", "--bf16"])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("7.24B params, 32 layers; micro-batch 1 x 32768 tokens; tp=8 dp=1; bfloat16 compute")
    assert [line.split()[0] for line in out[1:]] == ["params", "gradients", "optimizer", "activations", "peak"]
    assert out[-1].endswith("fits a 64 GB device")


@pytest.mark.slow
def test_measured_peak_of_a_real_step_is_within_15_percent():
    setup = dataclasses.replace(mp.LAYER_BOUND, seq_length=1024, recompute=True)
    measured, predicted = mp.run_measure(setup)["peaks"][0], mp.plan(setup)["peak"]
    assert abs(measured / predicted - 1) < 0.15, (measured, predicted)
