"""Generate text from a checkpoint with a chat template: one `--prompt`, or an interactive chat that
keeps the conversation history. Tokens are printed as they come; speed is reported at the end. Under
`torchrun` the model is tensor-parallel over all processes; rank 0 reads the chat and prints.

    python -m experiments.generate --load=ckpt/hf --prompt="how are you?" --prompt_type=mixtral
    python -m experiments.generate --load=ckpt/hf --temperature=0.7 --top_k=50 --top_p=0.95   # chat
    torchrun --nproc_per_node=8 -m experiments.generate --load=ckpt/hf --prompt="how are you?"   # TP=8
    python -m experiments.generate --load=ckpt/hf --lora-load ckpt/lora --prompt="how are you?"  # + LoRA adapters

`--lora_load` (a LoRA run's native checkpoint or a PEFT directory) is merged into the model once after
loading: the answers are those of the merged checkpoint (`convert_ckpt --lora-dir`).
"""

from __future__ import annotations

import sys
import time

import torch.distributed as dist
from absl import flags

from experiments import cli, megatron_flags
from experiments.cli import main_guard
from experiments.loading import load_for_inference
from mistral_fn.generate import generate_stream, stream_text
from mistral_fn.tokenizer import TEMPLATES, encode_conversation, get_template

_PROMPT_TYPE = flags.DEFINE_string("prompt_type", "mixtral", f"chat template: {', '.join(TEMPLATES)} "
                                   "(ModelLink's --inference-prompt-type; its default 'llama' is 'plain')")
flags.DEFINE_alias("inference_prompt_type", "prompt_type")
MODELLINK_PROMPT_TYPES = {"llama": "plain"}  # ModelLink's name for "no template"
_PROMPT = flags.DEFINE_string("prompt", "", "a single prompt; empty: interactive chat (exit with Ctrl-D)")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 128, "tokens to generate per answer at most")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "sampling temperature; 0 = greedy")
_TOP_K = flags.DEFINE_integer("top_k", 0, "keep the k most likely tokens (0 = off)")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "nucleus sampling mass (1 = off)")
_REPETITION = flags.DEFINE_float("repetition_penalty", 1.0, "CTRL repetition penalty (1 = off)")
_STOP = flags.DEFINE_multi_string("stop", [], "stop string (repeatable); EOS always stops")
_DTYPE = flags.DEFINE_string("dtype", "", "compute dtype: float32, bfloat16, float16 (default: --bf16/--fp16, "
                              "else as stored)")
_COMPILE = flags.DEFINE_bool("compile", False, "torch.compile the decode step (slow first answer, faster decode)")


def answer(params, config, tokenizer, ids: list[int], mesh) -> tuple[str, int, list[float]]:
    """Stream one answer (printed on rank 0): `(text, new tokens, times)`; `times` are the start and each
    step's end."""
    stream = generate_stream(
        params, [ids], config, max_new_tokens=_MAX_NEW.value, temperature=_TEMPERATURE.value,
        top_k=_TOP_K.value or None, top_p=_TOP_P.value, repetition_penalty=_REPETITION.value, seed=flags.FLAGS.seed,
        stop_strings=_STOP.value, tokenizer=tokenizer, compile_decode=_COMPILE.value, tp=mesh.tp)
    times = [time.perf_counter()]
    tokens: list[int] = []

    def first_row():
        for emitted in stream:
            times.append(time.perf_counter())
            if emitted[0] is None:
                return
            tokens.append(emitted[0])
            yield emitted[0]

    text = ""
    for piece in stream_text(tokenizer, first_row()):
        text += piece
        show(piece, mesh, end="", flush=True)
    show("", mesh)
    return text, len(tokens), times


def show(text: str, mesh, **kwargs) -> None:
    if mesh.rank == 0:
        print(text, **kwargs)


def read_turn(mesh) -> str | None:
    """The next user message (None at end of input), read on rank 0 and shared with the other ranks."""
    if mesh.rank == 0:
        try:
            message = input("user> ")
        except EOFError:
            message = None
    if mesh.size == 1:
        return message
    box = [message if mesh.rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def report(n: int, times: list[float], mesh) -> None:
    """Print the token count, time to the first token (prefill) and decode steps per second."""
    first = times[1] - times[0] if len(times) > 1 else 0.0
    rate = f"{(len(times) - 2) / (times[-1] - times[1]):,.1f} tokens/s" if len(times) > 2 else "n/a"
    show(f"[{n} tokens; first token {first * 1000:,.0f} ms; decode {rate}]", mesh, file=sys.stderr)


@main_guard
def main(argv):
    del argv
    template = get_template(MODELLINK_PROMPT_TYPES.get(_PROMPT_TYPE.value, _PROMPT_TYPE.value))
    config, params, tokenizer, mesh = load_for_inference(megatron_flags.inference_args(_DTYPE.value))
    megatron_flags.report_kernels(mesh)
    with mesh:
        converse(params, config, tokenizer, template, mesh)


def converse(params, config, tokenizer, template, mesh) -> None:
    """One answer to --prompt, or the interactive chat loop keeping the conversation history."""
    if _PROMPT.value:
        ids = encode_conversation(tokenizer, [{"role": "user", "content": _PROMPT.value}], template)
        report(*answer(params, config, tokenizer, ids, mesh)[1:], mesh)
        return
    history: list[dict] = []
    while (user := read_turn(mesh)) is not None:
        if not user.strip():
            continue
        history.append({"role": "user", "content": user})
        ids = encode_conversation(tokenizer, history, template)
        show("assistant> ", mesh, end="", flush=True)
        text, *stats = answer(params, config, tokenizer, ids, mesh)
        history.append({"role": "assistant", "content": text})
        report(*stats, mesh)
    show("", mesh)


if __name__ == "__main__":
    cli.run(main)
