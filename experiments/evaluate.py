"""Evaluate a checkpoint on MMLU and write per-question predictions and accuracies as JSON. Under
`torchrun` the model is tensor-parallel over all processes and rank 0 reports.

    python -m experiments.evaluate --task=mmlu --data_path=mmlu/data/test --load=ckpt/hf \
        --protocol=modellink --num_fewshot=5 --results_path=results/mmlu.json --batch_size=8

`--lora_load` (a LoRA run's native checkpoint or a PEFT directory) evaluates the model with those adapters
merged in, as generate does.
"""

from __future__ import annotations

import json

from absl import flags

from experiments import cli, megatron_flags
from experiments.cli import main_guard
from experiments.loading import load_for_inference
from mistral_fn.atomic import atomic_file, check_file_target
from mistral_fn.errors import InputError
from mistral_fn.evaluation import mmlu
from mistral_fn.generate import next_token_logits

_TASK = flags.DEFINE_string("task", "mmlu", "benchmark: mmlu")
_DATA = flags.DEFINE_string("data_path", "", "directory of <subject>_test.csv files (dev split next to it or in ../dev)")
_PROTOCOL = flags.DEFINE_string("protocol", "modellink", "modellink (the seed's: 5-shot, chat template, one generated "
                                "token) or harness (lm-evaluation-harness: log-likelihood of ' A'..' D')")
_SHOTS = flags.DEFINE_integer("num_fewshot", 5, "few-shot examples from the dev split")
_CHAT = flags.DEFINE_string("chat_template", "mistral", "modellink protocol: template wrapping the prompt "
                            "('none': BOS + raw text, as ModelLink without a chat template)")
_RESULTS = flags.DEFINE_string("results_path", "", "JSON file for accuracies and predictions (empty: don't write)")
_BATCH = flags.DEFINE_integer("batch_size", 1, "prompts per forward (ModelLink's --evaluation-batch-size)")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 1, "generated tokens per question: the seed's MMLU protocol "
                                "reads one (greedy over the whole vocabulary); only 1 is supported")
flags.DEFINE_alias("task_data_path", "data_path")
flags.DEFINE_alias("evaluation_batch_size", "batch_size")
_DTYPE = flags.DEFINE_string("dtype", "", "compute dtype: float32, bfloat16, float16 (default: --bf16/--fp16, "
                              "else as stored)")


@main_guard
def main(argv):
    del argv
    if _TASK.value != "mmlu":
        raise InputError(f"--task={_TASK.value!r}: only 'mmlu' is supported")
    if _PROTOCOL.value not in mmlu.PROTOCOLS:
        raise InputError(f"--protocol={_PROTOCOL.value!r}: expected one of {', '.join(mmlu.PROTOCOLS)}")
    if _MAX_NEW.value != 1:
        raise InputError(f"--max_new_tokens={_MAX_NEW.value}: the MMLU protocols score one next token; pass 1")
    if _SHOTS.value < 0:
        raise InputError(f"--num_fewshot must be >= 0, got {_SHOTS.value}")
    if _RESULTS.value:
        check_file_target(_RESULTS.value)  # before the evaluation, not after it
    test, dev = mmlu.load_mmlu(_DATA.value, _SHOTS.value)
    config, params, tokenizer, mesh = load_for_inference(megatron_flags.inference_args(_DTYPE.value))
    megatron_flags.report_kernels(mesh)
    with mesh:
        results = mmlu.evaluate(
            lambda prompts: next_token_logits(params, prompts, config, tp=mesh.tp), tokenizer, test, dev,
            protocol=_PROTOCOL.value, max_len=config.max_seq_len,
            chat_template=None if _CHAT.value == "none" else _CHAT.value, batch_size=_BATCH.value,
            progress=mesh.rank == 0)
    if mesh.rank != 0:
        return
    results = {"task": "mmlu", "protocol": _PROTOCOL.value, "num_fewshot": _SHOTS.value, **results}
    for name, entry in results["subjects"].items():
        print(f"{name:<40} {entry['n']:>6} {entry['accuracy']:.4f}")
    for name, entry in results["categories"].items():
        print(f"[{name}]{'':<{38 - len(name)}} {entry['n']:>6} {entry['accuracy']:.4f}")
    print(f"{'total (micro)':<40} {results['n']:>6} {results['accuracy']:.4f}   macro {results['macro_accuracy']:.4f}")
    if _RESULTS.value:
        with atomic_file(_RESULTS.value, "w") as f:
            f.write(json.dumps(results, indent=1) + "\n")
        print(f"wrote {_RESULTS.value}")


if __name__ == "__main__":
    cli.run(main)
