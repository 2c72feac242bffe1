"""LoRA in the apps: `experiments.pretrain`'s --lora-* fine-tuning (against PEFT + torch.optim.AdamW, bit-exact
resume, TP=2 with SP against one process, resharding), the files (native checkpoints, PEFT export, merged HF and
Megatron via convert_ckpt) and --lora_load in generate/evaluate, which must equal the merged checkpoint."""

import json
import os
import socket
import subprocess
import sys

import peft
import pytest
import torch
import torch.nn.functional as F
import transformers
from torch.utils import _pytree as pytree

import checkpoints
import mistral_fn as mf
import sharding
from checkpoints import native
from checkpoints.convert import convert
from experiments.lora_args import LoraArgs
from experiments.loading import load_model_and_tokenizer, merge_adapters
from experiments.training import Data, TrainConfig, lora_setup, train
from mistral_fn import lora
from mistral_fn.errors import CheckpointError, ConfigError
from mistral_fn.params import leaves_with_paths, tree_map
from mistral_fn.tokenizer import encode_conversation, load_tokenizer
from tests.hf_reference import hf_model

CFG = mf.MistralConfig.tiny()
MODELLINK = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")
RUN = dict(model="tiny", seq_length=16, global_batch_size=2, micro_batch_size=1, lr=2e-2, lr_decay_iters=10,
           loss_chunk_size=8, seed=7)
LORA = LoraArgs(MODELLINK, r=4, alpha=8)


@pytest.fixture(scope="module")
def mesh():
    return sharding.Mesh({"dp": 1, "tp": 1})


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """An HF checkpoint of a random tiny model: (its directory, its params)."""
    path = tmp_path_factory.mktemp("base") / "hf"
    params = mf.init_params(CFG, seed=3)
    checkpoints.save_hf(path, CFG, params)
    return path, params


@pytest.fixture(scope="module")
def lora_run(base, mesh, tmp_path_factory):
    """A 4-step LoRA run on the base, saving at steps 2 and 4: (save dir, its metric records)."""
    save = tmp_path_factory.mktemp("lora") / "run"
    train(TrainConfig(**RUN, train_iters=4, load=str(base[0]), save=str(save), save_interval=2, lora=LORA), mesh)
    return save, records(save / "metrics.jsonl")


def records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def losses(path):
    return [r["loss"] for r in records(path) if "loss" in r]


def tensors(root, step=None):
    """`{name: tensor}` of rank 0 of a native checkpoint."""
    stored = native.read_metadata(root, step)["tensors"]
    template = {name: torch.empty(shape, dtype=getattr(torch, kind)) for name, (kind, shape) in stored.items()}
    return native.load_native(root, template, step=step)[0]


def max_diff(a, b) -> float:
    return max((x - y).abs().max().item() for x, y in zip(pytree.tree_leaves(a), pytree.tree_leaves(b), strict=True))


# ---- training -------------------------------------------------------------------------------------

def test_lora_run_trains_only_the_adapters_and_starts_as_the_base_model(base, lora_run, mesh, tmp_path):
    save, logged = lora_run
    full = train(TrainConfig(**RUN, train_iters=1, load=str(base[0]), metrics_file=str(tmp_path / "full.jsonl")),
                 mesh)
    assert losses(save / "metrics.jsonl")[0] == losses(tmp_path / "full.jsonl")[0]  # B = 0: the base model exactly

    adapters = lora.init(base[1], CFG, rank=4, alpha=8, targets=MODELLINK)
    adapter_paths = [path for path, _ in leaves_with_paths(adapters)]
    saved = tensors(save)
    assert sorted(n.removeprefix("train/params/") for n in saved if n.startswith("train/params/")) == sorted(
        adapter_paths)
    for moment in ("mu", "nu"):  # optimizer state for the adapters alone; no master copy of anything
        assert sorted(n.removeprefix(f"train/opt_state/{moment}/") for n in saved if f"/{moment}/" in n) == sorted(
            adapter_paths)
    assert not any("master" in n or n.endswith("/embed") or "/attn/wq" in n for n in saved)
    summary = logged[-1]
    assert summary["trainable_params"] == mf.count_params(adapters) < full["trainable_params"] // 100
    assert summary["peak_rss_mib"] > 0
    meta = native.read_metadata(save)["extra"]
    assert meta["lora"] == {"r": 4, "alpha": 8.0, "targets": list(MODELLINK), "base": str(base[0])}
    config, step, trained = checkpoints.read_native_lora(save)
    assert (config, step, trained.alpha, trained.rank) == (CFG, 4, 8.0, 4)
    assert all(x.any() for x in pytree.tree_leaves(trained))  # A and B both moved (B started at 0)


def test_lora_resume_is_bit_exact(base, lora_run, mesh, tmp_path):
    save, _ = lora_run
    resumed = tmp_path / "resumed"
    train(TrainConfig(**RUN, train_iters=4, load=str(base[0]), save=str(resumed), lora=LoraArgs(
        MODELLINK, 4, 8, load=str(save / "iter_0000002"))), mesh)
    assert losses(resumed / "metrics.jsonl") == losses(save / "metrics.jsonl")[2:]  # exact float equality
    for (name, a), (_, b) in zip(sorted(tensors(resumed).items()), sorted(tensors(save).items()), strict=True):
        assert torch.equal(a, b), name  # adapters, moments, counters and the data RNG

    # --finetune: the adapters alone, from step 0 and the first batch
    config = TrainConfig(**RUN, train_iters=1, load=str(base[0]), finetune=True, save=str(tmp_path / "finetuned"),
                         lora=LoraArgs(MODELLINK, 4, 8, load=str(save / "iter_0000002")))
    summary = train(config, mesh)
    _, _, adapters = checkpoints.read_native_lora(save / "iter_0000002")
    first = next(Data(config, CFG, "train", 0, 0, 1).batches(0, torch.Generator().manual_seed(config.seed)))
    want = sum(mf.loss_fn(lora.apply(base[1], adapters), mb, CFG) for mb in mf.train.split_micro_batches(first, 1)) / 2
    assert summary["start_step"] == 0 and summary["final_loss"] == pytest.approx(want.item(), rel=1e-6)
    assert int(tensors(tmp_path / "finetuned")["train/opt_state/count"]) == 1


def test_lora_training_equals_peft_with_torch_adamw(base, mesh, tmp_path):
    """The app's run on PEFT's targets (constant lr, weight decay, clipping) against transformers + peft +
    torch.optim.AdamW + clip_grad_norm_ on the same batches, from the same initial adapters."""
    targets, steps = ("q_proj", "v_proj", "o_proj", "down_proj"), 3
    config = TrainConfig(**{**RUN, "micro_batch_size": 2}, train_iters=steps, load=str(base[0]),
                         save=str(tmp_path / "run"), lr_decay_style="constant", weight_decay=0.1, clip_grad=0.05,
                         lora=LoraArgs(targets, r=4, alpha=16))
    train(config, mesh)
    _, _, ours = checkpoints.read_native_lora(tmp_path / "run")

    initial = lora.init(base[1], CFG, rank=4, alpha=16, targets=targets, seed=config.seed, dtype=torch.float32)
    reference = peft.PeftModel.from_pretrained(hf_model(CFG, base[1]), str(checkpoints.save_peft(
        tmp_path / "initial", CFG, initial)), is_trainable=True)
    trainable = [p for p in reference.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == mf.count_params(initial)
    opt = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    batches = Data(config, CFG, "train", 0, 0, 1).batches(0, torch.Generator().manual_seed(config.seed))
    ref_losses = []
    for _ in range(steps):
        batch = next(batches)
        opt.zero_grad()
        logits = reference(batch["tokens"]).logits
        loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, config.clip_grad)
        opt.step()
        ref_losses.append(loss.item())
    logged = [r for r in records(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert all(r["grad_norm"] > config.clip_grad for r in logged)  # every step clipped
    assert [r["loss"] for r in logged] == pytest.approx(ref_losses, rel=1e-6)
    reference.save_pretrained(tmp_path / "reference")
    trained = checkpoints.load_peft(tmp_path / "reference", CFG)
    assert ours.targets == trained.targets and max_diff(ours, initial) > 1e-2
    # Adam divides each gradient element by its own size: for elements with gradients near eps the two
    # forwards' rounding reaches the update at lr scale (lr = 2e-2; measured 3.8e-6)
    assert max_diff(ours, trained) < 2e-5


def test_bf16_lora_run_keeps_the_base_in_bf16_and_its_megatron_copy_is_the_merged_model(base, mesh, tmp_path):
    config = TrainConfig(**RUN, train_iters=2, load=str(base[0]), save=str(tmp_path / "run"), precision="bf16",
                         save_format="megatron", lora=LORA)
    frozen, adapters, _, _ = lora_setup(config, CFG, base[1], sharding.match(base[1], sharding.mistral_rules(CFG)),
                                        sharding.mistral_rules(CFG), None, mesh)
    assert {x.dtype for x in pytree.tree_leaves(frozen)} == {torch.bfloat16}
    assert {x.dtype for x in pytree.tree_leaves(adapters)} == {torch.float32}
    train(config, mesh)
    saved = tensors(tmp_path / "run")
    assert {x.dtype for name, x in saved.items() if name.startswith("train/params/")} == {torch.float32}
    _, _, trained = checkpoints.read_native_lora(tmp_path / "run")
    _, copy = checkpoints.load_megatron(tmp_path / "run" / "megatron")
    assert max_diff(copy, lora.merge(mf.params.cast(base[1], torch.bfloat16), trained)) == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pretrain(*flags, nproc):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={_free_port()}",
           "-m", "experiments.pretrain", *map(str, flags)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
def test_tp2_sp_lora_run_equals_tp1_and_resumes_resharded_on_zero1(base, lora_run, tmp_path):
    """ModelLink's spellings under torchrun: TP=2 with sequence parallelism against the one-process run; its
    step-2 adapters resumed on dp=2 with the distributed optimizer (resharded) continue the same loss curve."""
    save, _ = lora_run
    flags = ["--model=tiny", "--seq-length", "16", "--global-batch-size", "2", "--micro-batch-size", "1", "--lr",
             "2e-2", "--lr-decay-iters", "10", "--loss-chunk-size", "8", "--seed", "7", "--train-iters", "4",
             f"--load={base[0]}", "--lora-target-modules", *MODELLINK, "--lora-r", "4", "--lora-alpha", "8"]
    _pretrain(*flags, "--tensor-model-parallel-size", "2", "--sequence-parallel", f"--save={tmp_path / 'tp2'}",
              "--save-interval", "2", nproc=2)
    one, two = losses(save / "metrics.jsonl"), losses(tmp_path / "tp2" / "metrics.jsonl")
    assert one[-1] != one[0] and max(abs(a - b) for a, b in zip(one, two, strict=True)) < 1e-5
    assert native.read_metadata(tmp_path / "tp2", rank=1)["extra"]["tp"] == 2
    assert max_diff(checkpoints.read_native_lora(tmp_path / "tp2")[2], checkpoints.read_native_lora(save)[2]) < 1e-5

    _pretrain(*flags, "--use-distributed-optimizer", "--overlap-grad-reduce", "--lora-load",
              tmp_path / "tp2" / "iter_0000002", f"--save={tmp_path / 'zero'}", nproc=2)
    assert native.read_metadata(tmp_path / "zero", rank=1)["extra"]["distributed_optimizer"]
    assert losses(tmp_path / "zero" / "metrics.jsonl") == pytest.approx(one[2:], abs=1e-5)
    assert max_diff(checkpoints.read_native_lora(tmp_path / "zero")[2], checkpoints.read_native_lora(save)[2]) < 1e-5


def test_lora_flag_errors_name_the_flag(base, lora_run, mesh, tmp_path):
    save, _ = lora_run
    with pytest.raises(ConfigError, match="--lora_r/--lora_alpha/--lora_load need --lora_target_modules"):
        TrainConfig(**RUN, lora=LoraArgs(r=8))
    with pytest.raises(ConfigError, match="unknown lora target 'qkv'"):
        LoraArgs(("qkv",))
    with pytest.raises(ConfigError, match="--lora_r=0 must be a positive integer"):
        LoraArgs(MODELLINK, r=0)
    with pytest.raises(ConfigError, match=r"--lora_r=8 does not match .*run, which was trained with r=4"):
        train(TrainConfig(**RUN, load=str(base[0]), lora=LoraArgs(MODELLINK, 8, 8, load=str(save))), mesh)
    with pytest.raises(ConfigError, match=r"--lora_target_modules=query_key_value,dense does not match .*run, which "
                                          r"was trained with targets=query_key_value,dense,dense_h_to_4h,"):
        train(TrainConfig(**RUN, load=str(base[0]), lora=LoraArgs(MODELLINK[:2], 4, 8, load=str(save))), mesh)
    full = tmp_path / "full"
    train(TrainConfig(**RUN, train_iters=1, save=str(full)), mesh)
    adapter_dir = checkpoints.save_peft(tmp_path / "peft", CFG, checkpoints.read_native_lora(save)[2])
    for wrong in (full, adapter_dir):  # a full run's checkpoint; PEFT adapters (for generate/evaluate)
        with pytest.raises(ConfigError, match="not the native checkpoint of a LoRA run, which pretrain resumes"):
            train(TrainConfig(**RUN, load=str(base[0]), lora=LoraArgs(MODELLINK, load=str(wrong))), mesh)
    with pytest.raises(CheckpointError, match="holds LoRA adapters, not a model; apply them to their base model"):
        checkpoints.load(save)
    other = mf.MistralConfig(vocab_size=32000, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=160)
    with pytest.raises(CheckpointError, match="adapters for a model with dim=64, but the base model has dim=32"):
        checkpoints.load_lora(save, other)


# ---- files: PEFT export, merged HF and Megatron ------------------------------------------------------

def test_exports_peft_dir_and_merged_hf_and_megatron(base, lora_run, tmp_path):
    save, _ = lora_run
    _, _, adapters = checkpoints.read_native_lora(save)
    tokens = torch.randint(0, CFG.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    ours = mf.forward(lora.apply(base[1], adapters), tokens, CFG)
    assert (ours - mf.forward(base[1], tokens, CFG)).abs().max() > 1e-3  # the adapters matter

    out = convert(None, "peft", base[0], tmp_path / "peft", lora_dir=save)
    assert out.tensors == 2 * CFG.n_layers * 7  # one A and one B per PEFT module: q, k, v, o, gate, up, down
    model = peft.PeftModel.from_pretrained(transformers.MistralForCausalLM.from_pretrained(
        base[0], attn_implementation="eager"), str(tmp_path / "peft")).eval()
    with torch.no_grad():
        assert (model(tokens).logits - ours).abs().max() < 1e-4

    convert(None, "hf", base[0], tmp_path / "merged", lora_dir=save)
    merged = transformers.MistralForCausalLM.from_pretrained(tmp_path / "merged", attn_implementation="eager").eval()
    with torch.no_grad():
        assert (merged(tokens).logits - ours).abs().max() < 1e-4
    _, hf_params = checkpoints.load_hf(tmp_path / "merged")
    assert max_diff(hf_params, lora.merge(base[1], adapters)) == 0
    convert(None, "megatron", base[0], tmp_path / "megatron", tp=2, lora_dir=save)
    _, mg_params = checkpoints.load_megatron(tmp_path / "megatron")
    assert max_diff(mg_params, hf_params) == 0

    with pytest.raises(ConfigError, match="--saver=peft writes LoRA adapters: pass them as --lora_dir"):
        convert(None, "peft", base[0], tmp_path / "none")
    with pytest.raises(CheckpointError, match="the output is the input"):
        convert(None, "peft", base[0], save, lora_dir=save, overwrite=True)
    with pytest.raises(CheckpointError, match="not LoRA adapters"):
        convert(None, "hf", base[0], tmp_path / "bad", lora_dir=base[0])


# ---- generate / evaluate: --lora_load equals the merged checkpoint -------------------------------------

def _inference(load, lora_args=LoraArgs()):
    """The params generate/evaluate run: the checkpoint `load`, and `--lora_load` adapters merged into it."""
    config, params, _, mesh = load_model_and_tokenizer(str(load), device_type="cpu")
    if lora_args.load:
        params = merge_adapters(params, config, lora_args, mesh)
    mesh.close()
    return config, params


def test_lora_load_merges_native_and_peft_adapters_as_the_merged_checkpoint(base, lora_run, tmp_path):
    save, _ = lora_run
    convert(None, "hf", base[0], tmp_path / "merged", lora_dir=save)
    convert(None, "peft", base[0], tmp_path / "peft", lora_dir=save)
    _, merged = _inference(tmp_path / "merged")
    assert max_diff(merged, base[1]) > 1e-3
    for source, given in ((save, LORA), (tmp_path / "peft", LoraArgs(MODELLINK, alpha=8))):
        _, params = _inference(base[0], LoraArgs(given.target_modules, given.r, given.alpha, load=str(source)))
        assert max_diff(params, merged) == 0, source
    with pytest.raises(ConfigError, match=r"--lora_alpha=16 does not match .*peft, which has alpha=8"):
        _inference(base[0], LoraArgs(alpha=16, load=str(tmp_path / "peft")))
    with pytest.raises(ConfigError, match="--lora_target_modules=dense does not match"):
        _inference(base[0], LoraArgs(("dense",), load=str(save)))


def _cli(module, *args):
    done = subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.slow
def test_generate_and_evaluate_with_lora_load_equal_the_merged_model(base, tmp_path):
    """Adapters strong enough to change greedy answers, as a PEFT directory: generate/evaluate with
    --lora-load (ModelLink's flags) print and score exactly as the merged checkpoint made by convert_ckpt."""
    g = torch.Generator().manual_seed(5)
    strong = tree_map(lambda x: torch.randn(x.shape, generator=g) * 0.3,
                      lora.init(base[1], CFG, rank=4, alpha=8, targets=["q_proj", "o_proj", "up_proj"]))
    checkpoints.save_peft(tmp_path / "peft", CFG, strong)
    _cli("experiments.convert_ckpt", "--saver", "hf", "--load-dir", base[0], "--lora-dir", tmp_path / "peft",
         "--save-dir", tmp_path / "merged")
    prompt = ["--prompt=Name a colour.", "--max_new_tokens=8"]
    lora_flags = ["--lora-load", tmp_path / "peft", "--lora-r", "4", "--lora-target-modules", "q_proj", "o_proj",
                  "up_proj"]
    with_lora = _cli("experiments.generate", f"--load={base[0]}", *prompt, *lora_flags)
    assert with_lora == _cli("experiments.generate", f"--load={tmp_path / 'merged'}", *prompt)
    ids = encode_conversation(load_tokenizer(), [{"role": "user", "content": "Name a colour."}], "mixtral")
    merged = lora.merge(base[1], strong)  # the adapters change the greedy answer
    assert mf.generate(merged, [ids], CFG, max_new_tokens=8) != mf.generate(base[1], [ids], CFG, max_new_tokens=8)

    data = os.path.join(os.path.dirname(__file__), "..", "experiments", "data", "mmlu", "test")
    scored = {}
    for name, load in (("lora", [f"--load={base[0]}", *lora_flags]), ("merged", [f"--load={tmp_path / 'merged'}"])):
        _cli("experiments.evaluate", f"--data_path={data}", "--protocol=harness", "--num_fewshot=0",
             f"--results_path={tmp_path / name}.json", *load)
        scored[name] = json.loads((tmp_path / f"{name}.json").read_text())["predictions"]
    assert scored["lora"] == scored["merged"]
