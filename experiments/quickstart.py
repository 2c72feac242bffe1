"""The main job. Today: the embedded default model end to end on one device — random weights,
forward, loss and gradient through `torch.func`, an HF checkpoint round trip. Later stages
(conversion, data, training, generation, evaluation) join as their issues land.

    python -m experiments.quickstart [--preset=tiny] [--workdir=workdir/quickstart]
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from absl import app, flags

import checkpoints
import mistral_fn as mf
from experiments.cli import main_guard

_PRESET = flags.DEFINE_string("preset", "tiny", f"model preset: {', '.join(sorted(mf.PRESETS))}")
_WORKDIR = flags.DEFINE_string("workdir", "workdir/quickstart", "where outputs go (git-ignored)")
_SEED = flags.DEFINE_integer("seed", 0, "parameter and data seed")
_SEQ = flags.DEFINE_integer("seq_len", 64, "tokens per sequence")
_BATCH = flags.DEFINE_integer("batch_size", 4, "sequences per batch")


def stage(title: str) -> None:
    print(f"\n== {title}")


@main_guard
def main(argv):
    del argv
    cfg = mf.MistralConfig.preset(_PRESET.value)
    workdir = Path(_WORKDIR.value)
    stage(f"model: preset {_PRESET.value!r}")
    params = mf.init_params(cfg, seed=_SEED.value)
    print(f"{mf.count_params(params):,} parameters; dim {cfg.dim}, layers {cfg.n_layers}, heads {cfg.n_heads}/"
          f"{cfg.n_kv_heads} kv, ffn {cfg.ffn_dim}, vocab {cfg.vocab_size}, rope theta {cfg.rope_theta:g}, "
          f"window {cfg.sliding_window}")

    stage("forward and loss")
    g = torch.Generator().manual_seed(_SEED.value)
    x = torch.randint(0, cfg.vocab_size, (_BATCH.value, _SEQ.value + 1), generator=g)
    batch = {"tokens": x[:, :-1], "labels": x[:, 1:], "loss_mask": torch.ones_like(x[:, 1:])}
    start = time.perf_counter()
    logits = mf.forward(params, batch["tokens"], cfg)
    elapsed = time.perf_counter() - start
    print(f"logits {tuple(logits.shape)} {logits.dtype}; first row head {logits[0, 0, :4].tolist()}")
    print(f"forward: {batch['tokens'].numel() / elapsed:,.0f} tokens/s")
    grads, loss = torch.func.grad_and_value(mf.loss_fn)(params, batch, cfg)
    gnorm = torch.sqrt(sum(g.float().pow(2).sum() for g in torch.utils._pytree.tree_leaves(grads)))
    print(f"loss {loss.item():.4f} (ln V = {torch.log(torch.tensor(float(cfg.vocab_size))).item():.4f}); "
          f"grad norm {gnorm.item():.4f}")

    stage("HF checkpoint round trip")
    hf_dir = workdir / "hf"
    checkpoints.save_hf(hf_dir, cfg, params, overwrite=True)
    cfg2, params2 = checkpoints.load_hf(hf_dir)
    same = torch.equal(mf.forward(params2, batch["tokens"], cfg2), logits)
    print(f"wrote {hf_dir}; reloaded logits identical: {same}")
    if not same:
        raise SystemExit("HF round trip changed the logits")
    print("\nquickstart: all stages succeeded")


if __name__ == "__main__":
    app.run(main)
