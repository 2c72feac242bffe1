"""Tensor-parallel forward check: greedy next tokens of a TP model on local shards equal one device's.

Every rank builds the same random model, keeps its Megatron shard (`sharding.mistral_rules`), and
decodes greedily with the vocab-parallel argmax; rank 0 then decodes with the full model (TP=1) and
compares. Exits 1 when the tokens differ.

    torchrun --nproc_per_node=2 -m experiments.tp_forward                       # TP=2 on CPU (gloo)
    torchrun --nproc_per_node=8 -m experiments.tp_forward \\
        --preset=mistral-7b-instruct-v0.2 --dtype=bfloat16                        # TP=8 on 8 NPUs (hccl)
"""

from __future__ import annotations

import os

import torch
from absl import flags

import mistral_fn as mf
import sharding as sh
from experiments import cli
from experiments.cli import main_guard
from mistral_fn.vocab_parallel import vocab_parallel_argmax

_PRESET = flags.DEFINE_string("preset", "tiny", f"model preset: {', '.join(sorted(mf.PRESETS))}")
_TP = flags.DEFINE_integer("tp", None, "tensor-parallel size (default: WORLD_SIZE; the mesh is {'tp': tp})")
_DIVISIBLE_BY = flags.DEFINE_integer("make_vocab_size_divisible_by", 1, "Megatron vocab padding divisor")
_DEVICE = flags.DEFINE_string("device", None, "npu, cuda or cpu (default: the best available)")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"], "parameter dtype")
_SEED = flags.DEFINE_integer("seed", 0, "parameter and prompt seed")
_BATCH = flags.DEFINE_integer("batch_size", 2, "prompts")
_PROMPT = flags.DEFINE_integer("prompt_len", 16, "random prompt tokens")
_NEW = flags.DEFINE_integer("new_tokens", 8, "greedy tokens to decode")


def greedy(params, prompt: torch.Tensor, config: mf.MistralConfig, n: int, tp=mf.SINGLE_DEVICE) -> torch.Tensor:
    """`n` greedy tokens `[B, n]` after `prompt` `[B, T]`, recomputing the whole forward each step."""
    tokens = prompt
    for _ in range(n):
        logits = mf.forward(params, tokens, config, tp=tp)[:, -1]
        tokens = torch.cat([tokens, vocab_parallel_argmax(logits, tp)[:, None]], dim=1)
    return tokens[:, prompt.shape[1]:]


@main_guard
def main(argv):
    del argv
    cfg = mf.MistralConfig.preset(_PRESET.value)
    tp = _TP.value or int(os.environ.get("WORLD_SIZE", "1"))
    sh.validate_tp(cfg, tp, _DIVISIBLE_BY.value)
    mesh = sh.Mesh({"tp": tp}, device_type=_DEVICE.value)
    dtype = getattr(torch, _DTYPE.value)

    full = mf.init_params(cfg, seed=_SEED.value, dtype=dtype)
    specs = sh.match(full, sh.mistral_rules(cfg, _DIVISIBLE_BY.value))
    local = mf.params.tree_map(lambda x: x.to(mesh.device), sh.shard(full, specs, mesh.shape, mesh.coords))
    g = torch.Generator().manual_seed(_SEED.value)
    prompt = torch.randint(0, cfg.vocab_size, (_BATCH.value, _PROMPT.value), generator=g).to(mesh.device)
    with torch.no_grad():
        tp_tokens = greedy(local, prompt, cfg, _NEW.value, mesh.tp)
        mesh.close()
        if mesh.rank != 0:
            return
        full = mf.params.tree_map(lambda x: x.to(mesh.device), full)
        one_tokens = greedy(full, prompt, cfg, _NEW.value)
    print(f"mesh {mesh.shape} on {mesh.device.type}; preset {_PRESET.value}, {_DTYPE.value}; "
          f"{_BATCH.value} prompts of {_PROMPT.value} random tokens")
    print(f"TP={tp} greedy next tokens: {tp_tokens.tolist()}")
    print(f"TP=1 greedy next tokens: {one_tokens.tolist()}")
    if not torch.equal(tp_tokens, one_tokens):
        raise SystemExit(f"TP={tp} greedy tokens differ from TP=1")
    print(f"TP={tp} matches TP=1")


if __name__ == "__main__":
    cli.run(main)
