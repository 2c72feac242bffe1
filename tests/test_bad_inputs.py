"""The bad-input catalogue: what a hostile user can do to every app and at the library boundary, and what
must happen instead of a traceback, a hang, a silent wrong result or lost data.

Every command-line case (`CASES`) runs through its app's real entry point, `cli.run(main)`, in one process
per app (`tests.app_runner`: torch is imported once for dozens of command lines), and asserts: exit
status 1; the last stderr line is exactly `error: <message>` and no traceback was printed; every input is
byte-identical afterwards; no temporary name (`.partial`, `.old`, `*.tmp*`) remains. `ACCEPTED` cases are
inputs that used to give a wrong result and must now give the right one. Library cases assert the
exception type and its one-line message, with the same two checks on files. Faults that need processes of
their own (kill -9 during a Megatron save, a stalled peer) come last.

All inputs live in one module-scoped "world" of tiny checkpoints and datasets; each case writes only
under its own output directory `{O}`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import checkpoints
import mistral_fn as mf
import sharding
from checkpoints.megatron_pickle import load_pt, save_pt
from experiments.training import TrainConfig, train
from mistral_fn.atomic import atomic_dir
from mistral_fn.data.handlers import PretrainHandler
from mistral_fn.errors import CheckpointError, ConfigError, InputError
from mistral_fn.tokenizer import default_tokenizer_path, load_tokenizer
from tests.app_runner import leftovers
from tests.native_ranks import save_tp_ranks
from tests.snapshots import contents, one_line

REPO = Path(__file__).resolve().parents[1]
ALPACA = [json.loads(line) for line in (REPO / "tests" / "data" / "alpaca_sample.jsonl").read_text().splitlines()]
# The real tokenizer's vocabulary (generate and evaluate check the two agree), everything else tiny.
WORDS = mf.MistralConfig(vocab_size=32000, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=256)
SMALL = WORDS.replace(vocab_size=256)  # for training runs on synthetic data
TRAIN = ("--seq-length", "16", "--global-batch-size", "2", "--loss-chunk-size", "8", "--train-iters", "2")


# ---- the world: every input a case reads --------------------------------------------------------------

def _hf(path: Path, config, params, tokenizer=True, **kwargs) -> Path:
    checkpoints.save_hf(path, config, params, **kwargs)
    if tokenizer:
        shutil.copy(default_tokenizer_path(), path / "tokenizer.model")
    return path


def _jsonl(path: Path, texts) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def _preprocess(source: Path, prefix: Path) -> None:
    from experiments.preprocess_data import PreprocessConfig, run
    run(PreprocessConfig(input=str(source), output_prefix=str(prefix), handler=PretrainHandler(("text",)),
                         tokenizer=load_tokenizer()))


class _Payload:
    """Unpickling this runs `os.mkdir(path)`: a stand-in for any code a malicious checkpoint carries."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


def build_world(w: Path, scratch: Path) -> None:
    """Every input of the catalogue under `w` (tiny: a few MB); `scratch` is for what builds them."""
    tok = w / "tok"
    tok.mkdir(parents=True)
    shutil.copy(default_tokenizer_path(), tok / "tokenizer.model")
    params = mf.init_params(WORDS, seed=0, dtype=torch.bfloat16)
    _hf(w / "hf", WORDS, params)
    (w / "hf" / "README.md").write_text("# a model card\n")
    _hf(w / "small", SMALL, mf.init_params(SMALL, seed=0), tokenizer=False)
    checkpoints.save_megatron(w / "mg", WORDS, params, tp=2, pp=1)
    # checkpoints whose files contradict each other, or that hold what no one should load
    checkpoints.save_megatron(scratch / "mg_other", WORDS, mf.init_params(WORDS, seed=5, dtype=torch.bfloat16), tp=2, pp=1)
    shutil.copytree(w / "mg", w / "mg_mixed")
    rank1 = Path("iter_0000001") / "mp_rank_01" / "model_optim_rng.pt"
    shutil.copyfile(scratch / "mg_other" / rank1, w / "mg_mixed" / rank1)
    shutil.copytree(w / "mg", w / "mg_pickle")
    rank0 = w / "mg_pickle" / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt"
    state = load_pt(rank0, mmap=False)
    state["payload"] = _Payload(scratch / "payload_ran")
    save_pt(state, rank0)
    full = mf.params.cast(params, torch.float32)
    save_tp_ranks(w / "native_mixed", 1, full, WORDS)
    save_tp_ranks(scratch / "native_other", 1, mf.params.tree_map(lambda x: x + 1, full), WORDS)
    for name in ("rank_001.safetensors", "rank_001.msgpack"):
        shutil.copyfile(scratch / "native_other" / "iter_0000001" / name, w / "native_mixed" / "iter_0000001" / name)
    nan = mf.init_params(WORDS, seed=0)
    nan["layers"][0]["attn"]["wq"][0, 0] = float("nan")
    _hf(w / "nan", WORDS, nan)
    big = mf.init_params(WORDS, seed=0)
    big["layers"][1]["mlp"]["w_down"][3, 5] = 1e6
    _hf(w / "big", WORDS, big)
    _hf(w / "index_outside", WORDS, params, max_shard_bytes=1_500_000)
    index = w / "index_outside" / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"]["lm_head.weight"] = "../" + data["weight_map"]["lm_head.weight"]
    index.write_text(json.dumps(data))
    save_file(load_file(w / "index_outside" / "model-00003-of-00003.safetensors"), w / "model-00003-of-00003.safetensors")
    for name, config_text in (("config_list", "[1, 2]"),
                              ("config_abc", json.dumps({**WORDS.to_hf(), "rms_norm_eps": "abc"}))):
        shutil.copytree(w / "hf", w / name)
        (w / name / "config.json").write_text(config_text)
    # data: a dataset, MMLU questions, metrics, and files that are empty or not UTF-8
    _preprocess(_jsonl(w / "outputs.jsonl", [r["output"] for r in ALPACA]), w / "data" / "alpaca")
    shutil.copytree(REPO / "experiments" / "data" / "mmlu", w / "mmlu")
    shutil.copytree(w / "mmlu", w / "mmlu_latin1")
    (w / "mmlu_latin1" / "test" / "world_religions_test.csv").write_bytes("Qu'est-ce qu'un caf\xe9?,a,b,c,d,A\n"
                                                                           .encode("latin-1"))
    (w / "empty.jsonl").write_bytes(b"")
    (w / "latin1.jsonl").write_bytes('{"text": "caf\xe9"}\n'.encode("latin-1"))
    (w / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 5.0 / s}) + "\n" for s in range(1, 6)))
    (w / "metrics_binary.jsonl").write_bytes(bytes(range(128, 256)))
    (w / "readonly").mkdir()
    (w / "readonly").chmod(0o555)
    # an earlier run's save directory: iteration 2, and a higher iteration 100 that `latest` names
    mesh = sharding.Mesh({"dp": 1, "tp": 1})
    small = dict(load=str(w / "small"), seq_length=16, global_batch_size=2, loss_chunk_size=8)
    train(TrainConfig(**small, train_iters=2, save=str(w / "keep")), mesh)
    shutil.copytree(w / "keep" / "iter_0000002", w / "keep" / "iter_0000100")
    (w / "keep" / "latest").write_text("iter_0000100\n")
    # a dataset prefix whose index cache was built for other contents, and the same contents afresh
    _preprocess(_jsonl(scratch / "instructions.jsonl", [r["instruction"] for r in ALPACA]), w / "stale" / "d")
    train(TrainConfig(**{**small, "load": str(w / "hf")}, train_iters=1, data_path=str(w / "stale" / "d_text_document"),
                      metrics_file=str(scratch / "m.jsonl")), mesh)
    assert (w / "stale" / "d_text_document" / "cache").is_dir()
    _preprocess(w / "outputs.jsonl", w / "stale" / "d")
    _preprocess(w / "outputs.jsonl", w / "fresh" / "d")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = tmp_path_factory.mktemp("world")
    scratch = tmp_path_factory.mktemp("scratch")
    build_world(w, scratch)
    yield w
    (w / "readonly").chmod(0o755)
    assert not (scratch / "payload_ran").exists(), "a pickle payload ran"


# ---- the command-line cases ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Case:
    """One command line of `experiments.<app>`; `{W}` is the world, `{O}` this case's own output directory.

    `error`: the message the last stderr line must hold after `error: ` (a compiled pattern where a message
    carries random ids); None: the run must succeed. `watch`: what must stay byte-identical.
    """

    app: str
    argv: tuple[str, ...]
    error: str | re.Pattern | None
    env: tuple[tuple[str, str], ...] = ()
    fsize: int | None = None
    permission_bits: bool = False
    watch: tuple[str, ...] = ("{W}",)


CASES: dict[str, Case] = {}


def case(name: str, app: str, *argv: str, error: str | re.Pattern | None, **options) -> None:
    assert name not in CASES
    CASES[name] = Case(app, argv, error, **options)


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


OUTSIDE = "writing it would delete what is being read (choose another save directory)"
SAVE_DIR = "--save must be an empty directory or a native checkpoint directory of this project"
FLAGS_HELP = "(--helpshort lists the flags)"
PEER = "another process failed or stalled (see its log; --distributed_timeout_minutes bounds the wait)"

# -- data loss: outputs never overwrite, prune or re-point what they do not own
case("pretrain/save-into-hf-dir", "pretrain", *TRAIN, "--save", "{W}/hf",
     error=f"{{W}}/hf: is an HF model directory; {SAVE_DIR}")
case("pretrain/save-into-megatron-dir", "pretrain", *TRAIN, "--save", "{W}/mg",
     error=f"{{W}}/mg: is a Megatron checkpoint directory; {SAVE_DIR}")
case("pretrain/save-into-unrelated-dir", "pretrain", *TRAIN, "--save", "{W}/mmlu",
     error=f"{{W}}/mmlu: is not empty ('dev', ...) and holds no native checkpoint; {SAVE_DIR}")
case("pretrain/save-into-earlier-run", "pretrain", *TRAIN, "--save", "{W}/keep",
     error="{W}/keep: holds the checkpoints of an earlier run (latest iter_0000100); pass --load={W}/keep to resume "
           "it, or choose an empty --save directory")
case("pretrain/save-is-a-file", "pretrain", *TRAIN, "--save", "{W}/metrics.jsonl",
     error="{W}/metrics.jsonl: is a file; --save must be a directory")
case("pretrain/finetune-into-its-own-load", "pretrain", *TRAIN, "--load", "{W}/keep", "--save", "{W}/keep", "--finetune",
     error="{W}/keep: --finetune starts a new run from the checkpoint in this directory; give it an empty --save "
           "directory of its own")
case("convert/save-dir-is-load-dir", "convert_ckpt", "--load-dir", "{W}/hf", "--save-dir", "{W}/hf", "--overwrite",
     error=f"{{W}}/hf: the output is the input {{W}}/hf; {OUTSIDE}")
case("convert/save-dir-contains-load-dir", "convert_ckpt", "--load-dir", "{W}/hf", "--save-dir", "{W}", "--overwrite",
     error=f"{{W}}: the output contains the input {{W}}/hf; {OUTSIDE}")
case("convert/save-dir-inside-load-dir", "convert_ckpt", "--load-dir", "{W}/mg", "--save-dir", "{W}/mg/iter_0000001",
     "--saver", "hf", error=f"{{W}}/mg/iter_0000001: the output lies inside the input {{W}}/mg; {OUTSIDE}")
case("convert/hf-to-hf-in-place", "convert_ckpt", "--load-dir", "{W}/hf", "--save-dir", "{W}/hf/", "--saver", "hf",
     "--params-dtype", "fp32", "--overwrite", error=f"{{W}}/hf: the output is the input {{W}}/hf; {OUTSIDE}")
case("convert/overwrite-non-checkpoint", "convert_ckpt", "--load-dir", "{W}/hf", "--save-dir", "{W}/mmlu",
     "--overwrite", error="{W}/mmlu: is not a Megatron checkpoint; --overwrite replaces only a checkpoint of the "
                          "output format")
case("convert/existing-output", "convert_ckpt", "--load-dir", "{W}/hf", "--save-dir", "{W}/mg",
     error="{W}/mg: already exists; pass --overwrite to replace it")

# -- silent wrong results: refused before any tensor is used
case("convert/megatron-ranks-of-two-checkpoints", "convert_ckpt", "--load-dir", "{W}/mg_mixed", "--save-dir", "{O}",
     "--saver", "hf", error=re.compile(
         r"(?P<W>.+)/mg_mixed/iter_0000001/mp_rank_01/model_optim_rng.pt: args mistral_fn_save_id='\w{32}' but rank 0 "
         r"\((?P=W)/mg_mixed/iter_0000001/mp_rank_00/model_optim_rng.pt\) has '\w{32}'; the rank files come from "
         r"different checkpoints"))
case("generate/native-ranks-of-two-runs", "generate", "--load", "{W}/native_mixed", "--prompt", "hi", error=re.compile(
    r".+/native_mixed/iter_0000001/rank_001.msgpack: run_id '\w{32}' differs from rank 0's '\w{32}'; the rank files "
    r"come from different checkpoints"))
case("pretrain/diverging-run", "pretrain", *TRAIN, "--load", "{W}/small", "--save", "{O}", "--lr", "1e10",
     "--clip-grad", "0", "--save-interval", "1", "--train-iters", "4",
     error="training ended on 3 non-finite step(s) in a row (loss nan); nothing was saved for them; {O}/latest is the "
           "last finite checkpoint, step 1")
NAN_LOGITS = ("logits row 0 of 1 is not finite (NaN): the model's weights are not finite (a diverged checkpoint?) "
              "or its compute dtype overflowed (try float32)")
case("generate/nan-weights", "generate", "--load", "{W}/nan", "--prompt", "hi", error=NAN_LOGITS)
case("evaluate/nan-weights", "evaluate", "--load", "{W}/nan", "--data-path", "{W}/mmlu/test", error=NAN_LOGITS)
OUTSIDE_INDEX = ("{W}/index_outside/model.safetensors.index.json: lm_head.weight points outside the checkpoint "
                 "directory ('../model-00003-of-00003.safetensors'); index entries must be file names inside it")
case("generate/index-entry-outside", "generate", "--load", "{W}/index_outside", "--prompt", "hi", error=OUTSIDE_INDEX)
case("convert/index-entry-outside", "convert_ckpt", "--load-dir", "{W}/index_outside", "--save-dir", "{O}",
     error=OUTSIDE_INDEX)
case("convert/fp16-overflow", "convert_ckpt", "--load-dir", "{W}/big", "--save-dir", "{O}", "--params-dtype", "fp16",
     error="layers/1/mlp/w_down: max |value| 1e+06 is beyond float16's range (65504); converting would turn it into "
           "inf (keep bf16 or fp32)")
case("preprocess/empty-input", "preprocess_data", "--input", "{W}/empty.jsonl", "--output-prefix", "{O}/x",
     error="--input {W}/empty.jsonl: no rows; no documents to write, nothing was published")

# -- tracebacks that must be one line: full disks, permissions, undecodable or malformed files
DISK_FULL = dict(fsize=100_000)
case("convert/disk-full-megatron", "convert_ckpt", "--load-dir", "{W}/hf", "--save-dir", "{O}", **DISK_FULL,
     error="{O}/iter_0000001/mp_rank_00/model_optim_rng.pt: File too large")
case("convert/disk-full-hf", "convert_ckpt", "--load-dir", "{W}/mg", "--save-dir", "{O}", "--saver", "hf",
     **DISK_FULL, error="{O}/model.safetensors: File too large")
case("pretrain/disk-full", "pretrain", *TRAIN, "--load", "{W}/small", "--save", "{O}", **DISK_FULL,
     error="{O}/iter_0000002/rank_000.safetensors: File too large")
case("preprocess/disk-full", "preprocess_data", "--input", "{W}/outputs.jsonl", "--output-prefix", "{O}/x",
     fsize=1000, error="{O}/x_text_document.bin: File too large")
case("plot/disk-full", "plot_metrics", "--metrics", "{W}/metrics.jsonl", "--out", "{O}/loss.png", fsize=1000,
     error="{O}/loss.png: File too large")
case("evaluate/disk-full", "evaluate", "--load", "{W}/hf", "--data-path", "{W}/mmlu/test", "--results-path",
     "{O}/results.json", fsize=1000, error="{O}/results.json: File too large")
READONLY = dict(permission_bits=True)
case("preprocess/permission-denied", "preprocess_data", "--input", "{W}/outputs.jsonl", "--output-prefix",
     "{W}/readonly/x", **READONLY, error="{W}/readonly/x_text_document.bin: Permission denied")
case("convert/permission-denied", "convert_ckpt", "--load-dir", "{W}/hf", "--save-dir", "{W}/readonly/mg", **READONLY,
     error="{W}/readonly/mg: cannot be written (no writable directory to create it in)")
case("pretrain/permission-denied", "pretrain", *TRAIN, "--save", "{W}/readonly/run", **READONLY,
     error="{W}/readonly/run: Permission denied")
case("evaluate/permission-denied", "evaluate", "--load", "{W}/hf", "--data-path", "{W}/mmlu/test", "--results-path",
     "{W}/readonly/results.json", **READONLY,
     error="{W}/readonly/results.json: cannot be written (no writable directory to create it in)")
case("plot/permission-denied", "plot_metrics", "--metrics", "{W}/metrics.jsonl", "--out", "{W}/readonly/loss.png",
     **READONLY, error="{W}/readonly/loss.png: cannot be written (no writable directory to create it in)")
case("evaluate/csv-not-utf8", "evaluate", "--load", "{W}/hf", "--data-path", "{W}/mmlu_latin1/test",
     error="{W}/mmlu_latin1/test/world_religions_test.csv: line 1: not UTF-8 (byte 19 is 0xe9); save the file as UTF-8")
case("preprocess/jsonl-not-utf8", "preprocess_data", "--input", "{W}/latin1.jsonl", "--output-prefix", "{O}/x",
     error="{W}/latin1.jsonl:1: invalid UTF-8 at byte 13")
case("plot/metrics-not-utf8", "plot_metrics", "--metrics", "{W}/metrics_binary.jsonl", "--out", "{O}/loss.png",
     error="{W}/metrics_binary.jsonl: not UTF-8 text (byte 0); expected the JSON lines a training run writes")
case("generate/config-json-is-a-list", "generate", "--load", "{W}/config_list", "--prompt", "hi",
     error="{W}/config_list/config.json: expected a JSON object, got a JSON list")
case("convert/config-json-abc-for-a-float", "convert_ckpt", "--load-dir", "{W}/config_abc", "--save-dir", "{O}",
     error="{W}/config_abc/config.json: rms_norm_eps: expected a number, got 'abc'")
case("generate/negative-temperature", "generate", "--load", "{W}/hf", "--prompt", "hi", "--temperature", "-1",
     error="temperature must be a finite number >= 0 (0 = greedy), got -1.0")
case("generate/nan-temperature", "generate", "--load", "{W}/hf", "--prompt", "hi", "--temperature", "nan",
     error="temperature must be a finite number >= 0 (0 = greedy), got nan")
case("evaluate/results-path-is-a-directory", "evaluate", "--load", "{W}/hf", "--data-path", "{W}/mmlu/test",
     "--results-path", "{W}/mmlu", error="{W}/mmlu: is a directory; expected a file path to write")
case("generate/load-is-a-file", "generate", "--load", "{W}/hf/model.safetensors", "--prompt", "hi",
     error="{W}/hf/model.safetensors: is a file; expected a checkpoint directory")
if not torch.cuda.is_available():
    case("generate/device-unavailable", "generate", "--load", "{W}/hf", "--prompt", "hi", "--device", "cuda",
         error="--device=cuda: CUDA is not available here")
case("generate/device-unknown", "generate", "--load", "{W}/hf", "--prompt", "hi", "--device", "tpu",
     error="--device=tpu: expected one of npu, cuda, cpu")

# -- ModelLink flag misuse
case("convert/unknown-flag", "convert_ckpt", "--load-dir", "{W}/hf", "--save-dir", "{O}", "--model-tipe", "GPT",
     error=f"Unknown command line flag 'model_tipe'. Did you mean: model_type ? {FLAGS_HELP}")
case("pretrain/malformed-value", "pretrain", *TRAIN, "--train-iters", "ten",
     error=f"flag --train_iters=ten: invalid literal for int() with base 10: 'ten' {FLAGS_HELP}")
case("convert/missing-required-flag", "convert_ckpt", "--save-dir", "{O}",
     error=f"flag --load_dir=None: Flag --load_dir must have a value other than None. {FLAGS_HELP}")
case("pretrain/flagfile-missing", "pretrain", "--flagfile", "{W}/pretrain.flags",
     error="Unable to open flagfile: [Errno 2] No such file or directory: '{W}/pretrain.flags'")
case("convert/tp-not-dividing-heads", "convert_ckpt", "--load-dir", "{W}/hf", "--save-dir", "{O}",
     "--target-tensor-parallel-size", "3", error="n_heads=4 is not divisible by tensor-parallel size tp=3")
case("convert/tp-not-dividing-kv-heads", "convert_ckpt", "--load-dir", "{W}/hf", "--save-dir", "{O}",
     "--target-tensor-parallel-size", "4", error="n_kv_heads=2 is not divisible by tensor-parallel size tp=4")
case("pretrain/tp-not-dividing-world-size", "pretrain", *TRAIN, "--tensor-model-parallel-size", "2",
     error="--tensor_model_parallel_size=2 does not divide WORLD_SIZE=1")
case("generate/tp-not-world-size", "generate", "--load", "{W}/hf", "--prompt", "hi", "--tensor-model-parallel-size",
     "2", error="--tensor_model_parallel_size=2: inference is tensor-parallel over all WORLD_SIZE=1 processes; "
                "launch 2")
PIPELINE = ("--pipeline_model_parallel_size=2: pipeline parallelism is not implemented here; use tensor (and data) "
            "parallelism")
case("pretrain/pipeline-parallel", "pretrain", *TRAIN, "--pipeline-model-parallel-size", "2", error=PIPELINE)
case("evaluate/pipeline-parallel", "evaluate", "--load", "{W}/hf", "--data-path", "{W}/mmlu/test",
     "--pipeline-model-parallel-size", "2", error=PIPELINE)
case("pretrain/bf16-and-fp16", "pretrain", *TRAIN, "--bf16", "--fp16", error="--bf16 and --fp16 are exclusive")
case("generate/bf16-and-fp16", "generate", "--load", "{W}/hf", "--prompt", "hi", "--bf16", "--fp16",
     error="--bf16 and --fp16 are exclusive")
case("pretrain/finetune-without-load", "pretrain", *TRAIN, "--finetune", error="--finetune needs --load")
case("pretrain/attention-dropout", "pretrain", *TRAIN, "--attention-dropout", "0.1",
     error="--attention_dropout=0.1: dropout is not implemented (the seed trains with 0.0)")
case("pretrain/hidden-dropout", "pretrain", *TRAIN, "--hidden-dropout", "0.1",
     error="--hidden_dropout=0.1: dropout is not implemented (the seed trains with 0.0)")
case("pretrain/num-layers-disagrees", "pretrain", *TRAIN, "--load", "{W}/small", "--num-layers", "3",
     error="--num_layers=3 does not match {W}/small, which has n_layers=2; drop --num_layers or load a matching "
           "checkpoint")
case("generate/hidden-size-disagrees", "generate", "--load", "{W}/mg", "--prompt", "hi", "--hidden-size", "64",
     error="--hidden_size=64 does not match {W}/mg, which has dim=32; drop --hidden_size or load a matching checkpoint")
case("evaluate/query-groups-disagree", "evaluate", "--load", "{W}/hf", "--data-path", "{W}/mmlu/test",
     "--group-query-attention", "--num-query-groups", "4",
     error="--num_query_groups=4 does not match {W}/hf, which has n_kv_heads=2; drop --num_query_groups or load a "
           "matching checkpoint")
NO_TOKENIZER = "{W}/mmlu: no tokenizer.model in this directory (the SentencePiece model is required)"
case("generate/no-tokenizer-model", "generate", "--load", "{W}/hf", "--prompt", "hi", "--tokenizer-name-or-path",
     "{W}/mmlu", error=NO_TOKENIZER)
case("preprocess/no-tokenizer-model", "preprocess_data", "--input", "{W}/latin1.jsonl", "--output-prefix", "{O}/x",
     "--tokenizer-type", "PretrainedFromHF", "--tokenizer-name-or-path", "{W}/mmlu", error=NO_TOKENIZER)
case("convert/unsafe-pickle", "convert_ckpt", "--load-dir", "{W}/mg_pickle", "--save-dir", "{O}", "--saver", "hf",
     error="{W}/mg_pickle/iter_0000001/mp_rank_00/model_optim_rng.pt: refused to unpickle global posix.mkdir (not in "
           "the Megatron allow-list)")
case("pretrain/peer-never-joins", "pretrain", *TRAIN, "--tensor-model-parallel-size", "2",
     "--distributed-timeout-minutes", "0.02",
     env=(("WORLD_SIZE", "2"), ("RANK", "0"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"),
          ("MASTER_PORT", _free_port())),
     error=re.compile(rf"rank 0: waiting for the other processes failed \(Timed out after \d+ seconds waiting for "
                      rf"clients\. 1/2 clients joined\.\); {re.escape(PEER)}"))
case("generate/bad-timeout", "generate", "--load", "{W}/hf", "--prompt", "hi", "--distributed-timeout-minutes", "0",
     error="--distributed_timeout_minutes=0.0 must be > 0")
case("quickstart/missing-hf-dir", "quickstart", "--workdir", "{O}", "--hf_dir", "{W}/missing",
     error="{W}/missing: no such HF config file")

# -- accepted: inputs that used to give a wrong result or a traceback, and must now work
case("pretrain/keep-last-beside-an-older-runs-higher-iteration", "pretrain", *TRAIN, "--load", "{W}/keep/iter_0000002",
     "--save", "{W}/keep", "--keep-last", "1", "--save-interval", "1", "--train-iters", "4", error=None,
     watch=("{W}/keep/iter_0000002", "{W}/keep/iter_0000100"))
case("pretrain/re-preprocessed-dataset", "pretrain", *TRAIN, "--load", "{W}/hf", "--data-path",
     "{W}/stale/d_text_document", "--train-iters", "1", "--metrics-file", "{O}/m.jsonl", error=None, watch=())
case("pretrain/dataset-control", "pretrain", *TRAIN, "--load", "{W}/hf", "--data-path",
     "{W}/fresh/d_text_document", "--train-iters", "1", "--metrics-file", "{O}/m.jsonl", error=None, watch=())
case("generate/temperature-1e-45", "generate", "--load", "{W}/hf", "--prompt", "hi", "--max-new-tokens", "4",
     "--temperature", "1e-45", error=None)
case("generate/greedy-control", "generate", "--load", "{W}/hf", "--prompt", "hi", "--max-new-tokens", "4", error=None)


@pytest.fixture(scope="module")
def results(world, tmp_path_factory):
    """`results(app)`: `{case name: the runner's result}` for every case of `app`, run once per module."""
    out, done = tmp_path_factory.mktemp("out"), {}

    def fill(text: str, name: str) -> str:
        return text.replace("{W}", str(world)).replace("{O}", str(out / name.replace("/", "_")))

    def run(app: str) -> dict:
        if app not in done:
            cases = [{"id": name, "argv": [fill(a, name) for a in c.argv], "env": dict(c.env), "fsize": c.fsize,
                      "permission_bits": c.permission_bits, "watch": [fill(p, name) for p in c.watch],
                      "scan": [str(world), str(out)]} for name, c in CASES.items() if c.app == app]
            spec = out / f".{app}.cases.json"
            spec.write_text(json.dumps(cases))
            env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
            runner = subprocess.run([sys.executable, "-m", "tests.app_runner", f"experiments.{app}", str(spec),
                                     str(out / f".{app}.results.json")], cwd=REPO, env=env, capture_output=True,
                                    text=True, timeout=600)
            assert runner.returncode == 0, runner.stderr[-3000:]
            done[app] = json.loads((out / f".{app}.results.json").read_text())
            for name in done[app]:
                done[app][name]["out"] = Path(fill("{O}", name))
            spec.unlink()
            (out / f".{app}.results.json").unlink()
        return done[app]

    run.fill = fill
    return run


def result_of(name: str, results) -> dict:
    return results(CASES[name].app)[name]


@pytest.mark.slow
@pytest.mark.parametrize("name", [name for name, c in CASES.items() if c.error is not None])
def test_bad_command_line_is_one_line_and_leaves_every_input_as_it_was(name, results):
    c, r = CASES[name], result_of(name, results)
    stderr = r["stderr"]
    assert r["code"] == 1, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    if isinstance(c.error, re.Pattern):
        assert last.startswith("error: ") and c.error.fullmatch(last.removeprefix("error: ")), last
    else:
        assert last == "error: " + results.fill(c.error, name)
    assert r["changed"] == [], "inputs changed"
    assert r["leftovers"] == [], "temporary files left behind"


# ---- accepted inputs: the right result, nothing an earlier run wrote is touched -------------------------

def succeeded(name: str, results) -> dict:
    r = result_of(name, results)
    assert r["code"] in (0, None), r["stderr"][-3000:]
    assert r["changed"] == [] and r["leftovers"] == []
    return r


@pytest.mark.slow
def test_keep_last_prunes_only_this_runs_iterations(world, results):
    """The save directory holds an older run's iterations 2 and 100 (`latest` named 100). A run resumed from 2
    with --keep-last 1 saves 3 and 4 and prunes its own 3; the older run's 2 and 100 stay byte-identical (the
    watch), and `latest` names the new run's complete iteration 4."""
    succeeded("pretrain/keep-last-beside-an-older-runs-higher-iteration", results)
    keep = world / "keep"
    assert checkpoints.list_steps(keep) == [2, 4, 100]
    assert (keep / "latest").read_text() == "iter_0000004\n"
    assert checkpoints.read_metadata(keep)["step"] == 4
    assert checkpoints.read_native_params(keep)[1] == 4


def _losses(path: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, path.read_text().splitlines()) if "loss" in r]


@pytest.mark.slow
def test_a_re_preprocessed_dataset_trains_on_its_new_contents(world, results):
    """`stale/` holds an index cache built for other contents at the same prefix: the run trains exactly as on a
    fresh copy of the new contents (bit-identical loss), never on the stale sample index."""
    stale = succeeded("pretrain/re-preprocessed-dataset", results)
    fresh = succeeded("pretrain/dataset-control", results)
    assert _losses(stale["out"] / "m.jsonl") == _losses(fresh["out"] / "m.jsonl")
    for suffix in (".bin", ".idx"):  # the same contents, untouched by either run
        assert (world / f"stale/d_text_document{suffix}").read_bytes() == (world / f"fresh/d_text_document{suffix}"
                                                                             ).read_bytes()
    entries = [p.name for p in (world / "stale/d_text_document/cache/GPTDataset_indices").iterdir()]
    assert len([name for name in entries if name != ".lock"]) == 2  # the stale entry stays unread beside the new one


@pytest.mark.slow
def test_a_vanishing_temperature_is_greedy(results):
    """--temperature=1e-45 used to overflow into a traceback; it is the limit of sampling: the greedy answer."""
    tiny = succeeded("generate/temperature-1e-45", results)["stdout"]
    greedy = succeeded("generate/greedy-control", results)["stdout"]
    assert tiny == greedy and tiny.strip()


@pytest.mark.slow
def test_a_diverging_run_keeps_its_last_finite_checkpoint_as_latest(results):
    out = result_of("pretrain/diverging-run", results)["out"]
    assert checkpoints.list_steps(out) == [1] and checkpoints.latest_step(out) == 1
    assert checkpoints.read_native_params(out)[1] == 1


@pytest.mark.slow
def test_results_path_is_checked_before_the_evaluation(results):
    assert result_of("evaluate/results-path-is-a-directory", results)["stdout"] == ""


# ---- the library boundary ----------------------------------------------------------------------------

def refuses(error_type, message: str, call, *inputs: Path):
    """`call()` raises `error_type` with exactly `message` (one line); `inputs` stay byte-identical and no
    temporary file remains under them."""
    before = [contents(p) for p in inputs]
    with pytest.raises(error_type) as caught:
        call()
    assert one_line(caught.value) == message
    assert [contents(p) for p in inputs] == before
    assert [leftovers(p) for p in inputs] == [[] for _ in inputs]


def _forward(params, config=WORDS):
    return mf.forward(params, torch.ones(1, 3, dtype=torch.long), config)


PARAMS_OF = f"(config: 2 layers, dim 32, vocab {WORDS.vocab_size})"


def test_a_params_tree_missing_a_layer_or_a_leaf_is_named():
    params = mf.init_params(WORDS)
    refuses(ConfigError, f"params layers: 1 layers, expected 2 {PARAMS_OF}",
            lambda: _forward({**params, "layers": params["layers"][:1]}))
    layer = {**params["layers"][1], "attn": {k: v for k, v in params["layers"][1]["attn"].items() if k != "wv"}}
    refuses(ConfigError, f"params layers/1/attn/wv: missing {PARAMS_OF}",
            lambda: _forward({**params, "layers": [params["layers"][0], layer]}))
    refuses(ConfigError, f"params norm: shape (31,), expected (32,) {PARAMS_OF}",
            lambda: _forward({**params, "norm": params["norm"][:-1]}))
    refuses(InputError, "token id 32000 is outside the vocabulary [0, 32000)",
            lambda: mf.forward(params, torch.full((1, 2), 32000), WORDS))


def test_checkpoints_refuse_what_the_command_lines_refuse(world, tmp_path):
    refuses(CheckpointError, f"{world}/hf/config.json: is a file; expected a checkpoint directory",
            lambda: checkpoints.load(world / "hf" / "config.json"), world / "hf")
    with pytest.raises(CheckpointError, match="the rank files come from different checkpoints"):
        checkpoints.load(world / "mg_mixed")
    with pytest.raises(CheckpointError, match="the rank files come from different checkpoints"):
        checkpoints.load(world / "native_mixed")
    refuses(CheckpointError, OUTSIDE_INDEX.replace("{W}", str(world)),
            lambda: checkpoints.load(world / "index_outside"), world / "index_outside")
    refuses(CheckpointError, "layers/1/mlp/w_down: max |value| 1e+06 is beyond float16's range (65504); converting "
                             "would turn it into inf (keep bf16 or fp32)",
            lambda: checkpoints.load(world / "big", dtype=torch.float16), world / "big")
    refuses(CheckpointError, f"{world}/mg: already exists; pass overwrite to replace it",
            lambda: checkpoints.save_hf(world / "mg", WORDS, mf.init_params(WORDS)), world / "mg")
    nan = checkpoints.load(world / "nan")[1]
    refuses(InputError, NAN_LOGITS, lambda: mf.generate(nan, [[1, 2, 3]], WORDS, max_new_tokens=1), world / "nan")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_replace_killed_between_its_renames_is_rolled_back(tmp_path, caplog):
    """`atomic_dir(overwrite=True)` moves the old directory to `.name.old`, then renames the new one in: a
    kill between the two leaves only `.old`, the complete previous version, which the next write restores
    (it used to be swept away, taking the only copy with it)."""
    target = tmp_path / "megatron"
    with atomic_dir(target) as tmp:
        (tmp / "weights").write_bytes(b"v1")
    os.replace(target, tmp_path / ".megatron.old")  # the first rename of a replace, then kill -9
    (tmp_path / ".megatron.partial").mkdir()
    (tmp_path / ".megatron.partial" / "weights").write_bytes(b"v2")
    with pytest.raises(CheckpointError, match="megatron: already exists .restored from an interrupted replace."):
        with atomic_dir(target):
            pass
    assert contents(tmp_path) == {"megatron": None, "megatron/weights": b"v1"}
    assert any("restored" in r.getMessage() for r in caplog.records)
    with atomic_dir(target, overwrite=True) as tmp:
        (tmp / "weights").write_bytes(b"v3")
    assert contents(tmp_path) == {"megatron": None, "megatron/weights": b"v3"}


def test_the_catalogue_covers_at_least_forty_bad_inputs():
    assert len([c for c in CASES.values() if c.error is not None]) >= 40


# ---- faults that need their own processes ------------------------------------------------------------

KILLED_MEGATRON_SAVE = """
import sys, time
import checkpoints.megatron as megatron
from experiments import cli, pretrain
write, marker = megatron.save_pt, sys.argv[1]
def stall(obj, path):  # once the first rank file of the Megatron copy is written: say so, then wait for kill -9
    write(obj, path)
    open(marker, "w").close()
    time.sleep(120)
megatron.save_pt = stall
sys.argv = ["pretrain", *sys.argv[2:]]
cli.run(pretrain.main)
"""


@pytest.mark.slow
def test_kill_9_during_a_megatron_save_leaves_nothing_after_the_next_run(world, tmp_path):
    """pretrain --save-format megatron killed while writing its Megatron copy: the native iteration and
    `latest` are complete, the copy exists only as `.megatron.partial`; the next run (a resume) removes
    it with a log line, writes the copy whole and leaves no temporary name."""
    save, marker = tmp_path / "run", tmp_path / "writing"
    args = [*TRAIN, "--load", str(world / "small"), "--save", str(save), "--save-format", "megatron"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    job = subprocess.Popen([sys.executable, "-c", KILLED_MEGATRON_SAVE, str(marker), *args], cwd=REPO, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not marker.exists() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), "the Megatron save did not start"
    job.send_signal(signal.SIGKILL)
    job.wait()
    assert leftovers(save) == [".megatron.partial"] and checkpoints.latest_step(save) == 2
    resumed = subprocess.run([sys.executable, "-m", "experiments.pretrain", *args, "--load", str(save),
                              "--train-iters", "3"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"removed {save}/.megatron.partial, left by an interrupted write" in resumed.stderr
    assert leftovers(save) == [] and checkpoints.latest_step(save) == 3
    assert checkpoints.open_checkpoint(save / "megatron").iteration == 3


@pytest.mark.slow
def test_a_stalled_peer_times_out_with_one_line_on_every_rank(world):
    """A TP=2 chat: rank 0 waits for the user (stdin stays open), rank 1 waits for rank 0's message in a
    collective. With --distributed-timeout-minutes 0.05 rank 1 stops after ~3 s with one line; rank 0, once
    its input ends, finds its peer gone and stops with one line too. Neither hangs."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "WORLD_SIZE": "2",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": _free_port()}
    command = [sys.executable, "-m", "experiments.generate", f"--load={world / 'hf'}", "--max-new-tokens=2",
               "--distributed-timeout-minutes=0.05"]
    ranks = [subprocess.Popen(command, cwd=REPO, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    try:
        _, err1 = ranks[1].communicate(timeout=120)
        _, err0 = ranks[0].communicate(input="", timeout=120)
    finally:
        for rank in ranks:
            if rank.poll() is None:
                rank.kill()
    assert [rank.returncode for rank in ranks] == [1, 1]
    assert err1.strip().splitlines()[-1] == (
        f"error: rank 1: waiting for the other processes failed (Timed out waiting 3000ms for recv operation to "
        f"complete); {PEER}")
    assert re.fullmatch(rf"error: rank 0: waiting for the other processes failed \(Connection closed by peer "
                        rf"\[127.0.0.1\]:\d+\); {re.escape(PEER)}", err0.strip().splitlines()[-1])
    assert "Traceback" not in err0 + err1
