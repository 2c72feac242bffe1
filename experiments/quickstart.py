"""The main job: the seed recipe's whole pipeline, end to end, on an embedded default that runs offline on a
2-core CPU in a few minutes — or on real weights and data when given paths.

    python -m experiments.quickstart                     # embedded default: tiny random model, committed samples
    python -m experiments.quickstart --hf_dir=Mistral-7B-Instruct-v0.2 --data=alpaca.parquet \
        --mmlu_dir=mmlu/data --tp=8                    # the model's config comes from --hf_dir

Stages (each prints what it did, where it wrote, and its figures; everything goes under --workdir):
  1 model      a small Mistral-shaped model saved as an HF checkpoint (or --hf_dir)
  2 convert    HF -> Megatron tp×pp1 -> HF, checked bit-exact (experiments.convert_ckpt)
  3 data       the alpaca-style sample -> Megatron indexed datasets, pretraining and instruction (preprocess_data)
  4 pretrain   TP over gloo/hccl/nccl via torchrun from the Megatron checkpoint (experiments.pretrain)
  5 finetune   instruction fine-tuning from the pretrained checkpoint (--finetune --is_instruction_dataset),
               long enough to fit the committed instruction sample
  6 finetune_lora  the same fine-tuning with LoRA adapters only (--lora-target-modules ...), its memory and
               speed against full fine-tuning, the adapters exported as a PEFT directory (convert_ckpt --saver peft)
  7 generate   one of the sample's instructions, asked in the fine-tuning format (`alpaca_training`), greedy,
               on the fine-tuned model and with the LoRA adapters: the full model answers with the trained response
  8 evaluate   MMLU-format questions, the seed's protocol and lm-eval-harness' (experiments.evaluate)
  9 plot       the loss curves as a PNG (experiments.plot_metrics)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from absl import flags

import checkpoints
import mistral_fn as mf
from experiments import cli
from experiments.cli import main_guard
from experiments.plot_metrics import plot_loss, read_metrics
from mistral_fn.data.sources import find_inputs, iter_rows, parse_row
from mistral_fn.errors import MistralFnError
from mistral_fn.tokenizer import default_tokenizer_path

HERE = Path(__file__).resolve().parent
_WORKDIR = flags.DEFINE_string("workdir", "workdir/quickstart", "everything the quickstart writes goes here")
_HF_DIR = flags.DEFINE_string("hf_dir", None, "a real HF Mistral directory (default: build a small random model)")
_MODEL = flags.DEFINE_string("model", "tiny", f"preset of the random default model ({', '.join(sorted(mf.PRESETS))}); "
                             "with --hf_dir every stage takes the model from its config.json instead")
_DATA = flags.DEFINE_string("data", str(HERE / "data" / "alpaca_sample.jsonl"),
                            "alpaca-style parquet/jsonl (instruction, input, output, text columns)")
_MMLU = flags.DEFINE_string("mmlu_dir", str(HERE / "data" / "mmlu"), "MMLU-format directory with test/ and dev/")
_TP = flags.DEFINE_integer("tp", 2, "tensor-parallel size (processes started by torchrun)")
_PRETRAIN_ITERS = flags.DEFINE_integer("pretrain_iters", 40, "pretraining steps")
_FINETUNE_ITERS = flags.DEFINE_integer("finetune_iters", 60, "fine-tuning steps (enough to fit the committed sample)")
_FINETUNE_GBS = flags.DEFINE_integer("finetune_batch_size", 36, "fine-tuning sequences per step (the committed "
                                     "sample has 36: each step is one epoch)")
_LORA_ITERS = flags.DEFINE_integer("lora_iters", 10, "LoRA fine-tuning steps (a short run, not fitted)")
_SEQ = flags.DEFINE_integer("seq_length", 128, "training sequence length")
_GBS = flags.DEFINE_integer("global_batch_size", 8, "sequences per optimizer step")
_SEED = flags.DEFINE_integer("seed", 0, "seed of the random model and of training")
_PROMPT = flags.DEFINE_string("prompt", "Give three tips for staying healthy.", "the generation stage's prompt")

STAGES = 9
OUTPUTS = ("hf", "megatron_tp*", "hf_from_megatron", "data", "pretrain", "finetune", "finetune_lora*", "logs",
           "mmlu_*.json", "*_loss.png")
LORA_FLAGS = ["--lora-target-modules", "query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h", "--lora-r", "8",
              "--lora-alpha", "16"]


class StageError(MistralFnError):
    """A pipeline stage's command failed; the message names the stage and its log file."""


class Pipeline:
    """Runs the stage commands, each logged to `<workdir>/logs/<name>.log`."""

    def __init__(self, workdir: Path, tp: int):
        self.workdir, self.tp = workdir, tp
        self.logs = workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.index = 0

    def stage(self, title: str) -> float:
        self.index += 1
        print(f"\n== [{self.index}/{STAGES}] {title}", flush=True)
        return time.perf_counter()

    def run(self, name: str, module: str, *flag_args: str, distributed: bool = False) -> tuple[str, str]:
        """Run `python -m module` (under torchrun with --tp processes when `distributed`); (stdout, stderr)."""
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={self.tp}"] \
            if distributed else [sys.executable]
        cmd = [*launcher, "-m", module, *flag_args]
        log = self.logs / f"{name}.log"
        print("$ " + " ".join(_short(a) for a in cmd[cmd.index("-m", 1 if distributed else 0):]), flush=True)
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        log.write_text(f"$ {' '.join(cmd)}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}", encoding="utf-8")
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or proc.stdout.strip().splitlines() or ["(no output)"])[-1]
            raise StageError(f"stage {name} failed (exit {proc.returncode}): {tail} — full log: {log}")
        return proc.stdout, proc.stderr


def _short(arg: str) -> str:
    return arg.replace(str(Path.cwd()) + os.sep, "")


def _summary(metrics: Path) -> tuple[list[dict], dict]:
    records = read_metrics(metrics)
    lines = [json.loads(line) for line in metrics.read_text(encoding="utf-8").splitlines() if line.strip()]
    summary = next((r for r in reversed(lines) if r.get("summary")), {})
    return records, summary


@main_guard
def main(argv):
    del argv
    started = time.perf_counter()
    workdir = Path(_WORKDIR.value)
    clear_outputs(workdir)
    p = Pipeline(workdir, _TP.value)
    tokenizer_model = str(Path(_HF_DIR.value) / "tokenizer.model") if _HF_DIR.value else default_tokenizer_path()

    t = p.stage("model")
    if _HF_DIR.value:
        hf_dir = Path(_HF_DIR.value)
        cfg = mf.MistralConfig.from_hf(hf_dir)
        print(f"using {hf_dir}")
    else:
        hf_dir = workdir / "hf"
        cfg = mf.MistralConfig.preset(_MODEL.value)
        params = mf.init_params(cfg, seed=_SEED.value)
        checkpoints.save_hf(hf_dir, cfg, params, tokenizer=tokenizer_model, overwrite=True)
        print(f"random {_MODEL.value!r} model, {mf.count_params(params):,} parameters -> {hf_dir} "
              f"({time.perf_counter() - t:.1f} s)")
    print(f"dim {cfg.dim}, layers {cfg.n_layers}, heads {cfg.n_heads}/{cfg.n_kv_heads} kv, vocab {cfg.vocab_size}, "
          f"rope theta {cfg.rope_theta:g}, window {cfg.sliding_window}")

    t = p.stage(f"convert: HF -> Megatron tp{p.tp}-pp1 -> HF")
    megatron_dir, back_dir = workdir / f"megatron_tp{p.tp}", workdir / "hf_from_megatron"
    p.run("convert_hf2mg", "experiments.convert_ckpt", "--loader=hf", "--saver=megatron", f"--load_dir={hf_dir}",
          f"--save_dir={megatron_dir}", f"--target_tensor_parallel_size={p.tp}", "--target_pipeline_parallel_size=1",
          f"--tokenizer_model={tokenizer_model}", "--overwrite")
    p.run("convert_mg2hf", "experiments.convert_ckpt", "--loader=megatron", "--saver=hf", f"--load_dir={megatron_dir}",
          f"--save_dir={back_dir}", f"--hf_config={hf_dir}", "--overwrite")
    exact = _same_params(hf_dir, back_dir)
    ranks = sorted(d.name for d in (megatron_dir / "iter_0000001").iterdir())
    print(f"{megatron_dir}: {', '.join(ranks)}; back in {back_dir}; round trip bit-exact: {exact} "
          f"({time.perf_counter() - t:.1f} s)")
    if not exact:
        raise StageError("convert: the HF -> Megatron -> HF round trip changed the weights")

    t = p.stage("data: preprocess into Megatron indexed datasets")
    prefix = workdir / "data" / "alpaca"
    for name, extra in (("preprocess_pretrain", ["--json_keys=text"]),
                        ("preprocess_sft", ["--handler_name=GeneralInstructionHandler", "--append_eod"])):
        out, _ = p.run(name, "experiments.preprocess_data", f"--input={_DATA.value}", f"--tokenizer_model={tokenizer_model}",
                    f"--output_prefix={prefix}" + ("_sft" if name.endswith("sft") else ""), "--workers=2", *extra)
        print("  " + next((line for line in out.splitlines() if line.startswith("wrote")), out.strip()))
    print(f"({time.perf_counter() - t:.1f} s)")

    # Every stage loads a checkpoint, so the model's config comes from it (--model only shapes the random default).
    train_flags = [f"--tensor_model_parallel_size={p.tp}", f"--seq_length={_SEQ.value}", f"--seed={_SEED.value}",
                   f"--tokenizer_model={tokenizer_model}", "--split=100,0,0", "--log_interval=1"]
    small_batches = ["--micro_batch_size=2", f"--global_batch_size={_GBS.value}"]
    stats, summaries = {}, {}
    sft = [f"--data_path={prefix}_sft", "--finetune", "--is_instruction_dataset"]
    sft_batches = ["--lr=1e-2", "--lr_decay_style=constant", "--lr_warmup_fraction=0.05", "--micro_batch_size=4",
                   f"--global_batch_size={_FINETUNE_GBS.value}"]
    for name, load, iters, extra in (
        ("pretrain", megatron_dir, _PRETRAIN_ITERS.value, [f"--data_path={prefix}_text_document", "--lr=3e-3",
                                                            "--lr_warmup_fraction=0.1", *small_batches]),
        # full fine-tuning fits the sample: whole-sample batches at a constant learning rate
        ("finetune", workdir / "pretrain", _FINETUNE_ITERS.value, [*sft, *sft_batches]),
        # LoRA: the same batches (so memory and speed compare), a short run
        ("finetune_lora", workdir / "pretrain", _LORA_ITERS.value, [*sft, *sft_batches, *LORA_FLAGS]),
    ):
        t = p.stage(f"{name}: TP={p.tp} over torchrun" + (" (LoRA: adapters only)" if "lora" in name else ""))
        # Pretraining resumes the converted checkpoint's iteration 1, as Megatron does; fine-tuning starts at 0.
        end = iters + (1 if name == "pretrain" else 0)
        p.run(name, "experiments.pretrain", *train_flags, *extra, f"--load={load}", f"--train_iters={end}",
              f"--save={workdir / name}", distributed=True)
        records, summary = _summary(workdir / name / "metrics.jsonl")
        stats[name], summaries[name] = records, summary
        print(f"{len(records)} steps: loss {records[0]['loss']:.4f} -> {records[-1]['loss']:.4f}; "
              f"{summary.get('mean_tokens_per_sec', float('nan')):,.0f} tokens/s; skipped "
              f"{summary.get('skipped_total', 0)}; {summary['trainable_params']:,} trainable params; peak RSS "
              f"{summary['peak_rss_mib']:,.0f} MiB/rank; checkpoint {workdir / name} ({time.perf_counter() - t:.1f} s)")
    full, adapted = summaries["finetune"], summaries["finetune_lora"]
    print(f"LoRA vs full fine-tuning: trainable params {adapted['trainable_params'] / full['trainable_params']:.2%}, "
          f"peak RSS {adapted['peak_rss_mib']:,.0f} vs {full['peak_rss_mib']:,.0f} MiB/rank, speed "
          f"{adapted['mean_tokens_per_sec']:,.0f} vs {full['mean_tokens_per_sec']:,.0f} tokens/s")
    peft_dir = workdir / "finetune_lora_peft"
    out, _ = p.run("export_lora", "experiments.convert_ckpt", "--saver=peft", f"--load_dir={workdir / 'pretrain'}",
                   f"--lora_dir={workdir / 'finetune_lora'}", f"--save_dir={peft_dir}")
    print(f"PEFT adapters: {out.strip()}")

    t = p.stage("generate: asked in the fine-tuning format (alpaca_training), greedy")
    trained = trained_response(_DATA.value, _PROMPT.value)
    for name, load in (("generate", [f"--load={workdir / 'finetune'}"]),
                       ("generate_lora", [f"--load={workdir / 'pretrain'}", f"--lora_load={peft_dir}"])):
        out, err = p.run(name, "experiments.generate", *load, f"--tokenizer_model={tokenizer_model}",
                         "--prompt_type=alpaca_training", f"--prompt={_PROMPT.value}", "--max_new_tokens=24",
                         distributed=True)
        print(f"{'LoRA' if 'lora' in name else 'full'}: prompt {_PROMPT.value!r} -> {out.strip()[:200]!r}")
        if trained is not None and name == "generate":
            head = trained[:20]
            print(f"  trained response {trained[:60]!r}...; the answer starts with it: "
                  f"{'yes' if out.strip().startswith(head.strip()) else 'no'}")
        print("  " + (err.strip().splitlines() or [""])[-1])

    t = p.stage("evaluate: MMLU format")
    for protocol in ("modellink", "harness"):
        results_path = workdir / f"mmlu_{protocol}.json"
        p.run(f"evaluate_{protocol}", "experiments.evaluate", "--task=mmlu", f"--data_path={Path(_MMLU.value) / 'test'}",
              f"--protocol={protocol}", f"--load={workdir / 'finetune'}", f"--tokenizer_model={tokenizer_model}",
              f"--results_path={results_path}", "--batch_size=4", distributed=True)
        results = json.loads(results_path.read_text(encoding="utf-8"))
        print(f"{protocol}: accuracy {results['accuracy']:.3f} over {len(results['predictions'])} questions "
              f"-> {results_path}")

    p.stage("plot: loss curves")
    for name, records in stats.items():
        print(f"{plot_loss(records, workdir / f'{name}_loss.png', f'{name} (quickstart)')}")
    print(f"\nquickstart: all {STAGES} stages succeeded in {time.perf_counter() - started:.0f} s; outputs in {workdir}")


def trained_response(data: str, instruction: str) -> str | None:
    """The `output` of the row of `data` whose instruction is `instruction` (no input), if there is one."""
    for _, raw in iter_rows(find_inputs(data), ("instruction", "input", "output")):
        row = parse_row(raw)
        if row.get("instruction") == instruction and not row.get("input"):
            return row.get("output")
    return None


def clear_outputs(workdir: Path) -> None:
    """Remove what an earlier quickstart wrote under `workdir` (only its own names), so runs never mix."""
    for pattern in OUTPUTS:
        for path in workdir.glob(pattern):
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def _same_params(dir_a: Path, dir_b: Path) -> bool:
    (cfg_a, a), (cfg_b, b) = checkpoints.load_hf(dir_a), checkpoints.load_hf(dir_b)
    leaves_a, leaves_b = torch.utils._pytree.tree_leaves(a), torch.utils._pytree.tree_leaves(b)
    return cfg_a == cfg_b and all(torch.equal(x, y) for x, y in zip(leaves_a, leaves_b, strict=True))


if __name__ == "__main__":
    cli.run(main)
