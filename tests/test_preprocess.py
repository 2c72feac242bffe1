"""Preprocessing end to end: parquet and JSON lines in, Megatron indexed datasets out."""

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from experiments.preprocess_data import PreprocessConfig, run
from mistral_fn.data.handlers import InstructionHandler, PretrainHandler
from mistral_fn.data.indexed import IndexedDataset
from mistral_fn.data.sources import find_inputs, iter_rows
from mistral_fn.errors import InputError
from mistral_fn.tokenizer import ALPACA_SYSTEM, default_tokenizer_path, load_tokenizer
from tests.snapshots import contents, one_line

DATA = Path(__file__).parent / "data"
ALPACA = DATA / "alpaca_sample.jsonl"
ROWS = [json.loads(line) for line in ALPACA.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def texts():
    return [f"{r['instruction']}\n{r['input']}\n{r['output']}" for r in ROWS]


def write_parquet(path, rows_per_group=7):
    pq.write_table(pa.table({"id": list(range(len(ROWS))), "text": texts()}), path, row_group_size=rows_per_group)


def preprocess(tok, input, prefix, handler, **kw):
    return run(PreprocessConfig(input=str(input), output_prefix=str(prefix), handler=handler, tokenizer=tok, **kw))


def read_docs(prefix):
    ds = IndexedDataset(prefix)
    assert ds.dtype == np.int32 and len(ds) == ds.num_documents
    return [list(ds[i]) for i in range(len(ds))]


def file_bytes(directory):
    return {p.name: p.read_bytes() for p in sorted(Path(directory).iterdir())}


@pytest.mark.parametrize("append_eod", [False, True])
def test_pretrain_parquet_one_and_four_workers(tok, tmp_path, append_eod):
    write_parquet(tmp_path / "alpaca.parquet")
    outputs = {}
    for workers in (1, 4):
        out = tmp_path / f"out{workers}"
        summary = preprocess(tok, tmp_path / "alpaca.parquet", out / "alpaca", PretrainHandler(("text",), append_eod),
                             workers=workers)
        assert summary.documents == len(ROWS) and summary.outputs == (str(out / "alpaca_text_document"),)
        outputs[workers] = file_bytes(out)
    assert outputs[1] == outputs[4] and sorted(outputs[1]) == ["alpaca_text_document.bin", "alpaca_text_document.idx"]
    eod = [tok.eos_id] if append_eod else []
    assert read_docs(tmp_path / "out1" / "alpaca_text_document") == [[1] + tok.encode(t) + eod for t in texts()]


def test_instruction_jsonl_one_and_four_workers(tok, tmp_path):
    outputs = {}
    for workers in (1, 4):
        preprocess(tok, ALPACA, tmp_path / f"out{workers}" / "sft", InstructionHandler(append_eod=True),
                   workers=workers)
        outputs[workers] = file_bytes(tmp_path / f"out{workers}")
    assert outputs[1] == outputs[4]
    assert sorted(outputs[1]) == sorted(f"sft_packed_{k}_document.{e}" for k in ("input_ids", "attention_mask",
                                                                                 "labels") for e in ("bin", "idx"))
    prefix = tmp_path / "out1" / "sft_packed_{}_document"
    ids, mask, labels = (read_docs(str(prefix).format(k)) for k in ("input_ids", "attention_mask", "labels"))
    assert len(ids) == len(ROWS)
    # hand-checked row: "Sum the numbers." / "17, 25, 8" / "50"
    k = next(i for i, r in enumerate(ROWS) if r["instruction"] == "Sum the numbers.")
    prompt = f"\n{ALPACA_SYSTEM}\n### Instruction:\nSum the numbers.\n17, 25, 8\n### Response:\n"
    assert ids[k] == [1] + tok.encode(prompt + "50\n") + [2]
    n_prompt = 1 + len(tok.encode(prompt))
    assert labels[k][:n_prompt] == [-100] * n_prompt and labels[k][n_prompt:] == ids[k][n_prompt:]
    assert tok.decode(labels[k][n_prompt:]) == "50\n" and labels[k][-1] == 2
    assert mask[k] == [1] * len(ids[k])
    for i, row in enumerate(ROWS):  # every row: the response and EOS are learned, the prompt is not
        target = [t for t in labels[i] if t != -100]
        assert tok.decode(target) == row["output"] + "\n" and len(labels[i]) == len(ids[i])


def test_json_array_directory_and_glob(tok, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.json").write_text(json.dumps([{"text": t} for t in texts()[:5]]), encoding="utf-8")
    (src / "b.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts()[5:9]), encoding="utf-8")
    (src / "notes.txt").write_text("ignored")
    preprocess(tok, src, tmp_path / "dir", PretrainHandler())
    assert read_docs(tmp_path / "dir_text_document") == [[1] + tok.encode(t) for t in texts()[:9]]
    preprocess(tok, src / "*.jsonl", tmp_path / "glob", PretrainHandler())
    assert len(read_docs(tmp_path / "glob_text_document")) == 4


def test_parquet_rows_stream_requested_columns(tmp_path, monkeypatch):
    write_parquet(tmp_path / "a.parquet", rows_per_group=5)
    batches = []
    original = pq.ParquetFile.iter_batches
    monkeypatch.setattr(pq.ParquetFile, "iter_batches",
                        lambda self, **kw: (batches.append(b.num_rows) or b for b in original(self, **kw)))
    rows = list(iter_rows([str(tmp_path / "a.parquet")], ["text", "absent"], batch_size=8))
    assert [r for _, r in rows] == [{"text": t} for t in texts()]  # only requested columns, nulls dropped
    assert rows[3][0] == f"{tmp_path / 'a.parquet'} row 3" and max(batches) <= 8 and sum(batches) == len(ROWS)
    (tmp_path / "c.csv").write_text("text\nx\n")
    with pytest.raises(InputError, match="c.csv: unsupported input format"):
        find_inputs(str(tmp_path / "c.csv"))


def bad_jsonl(path):
    lines = [json.dumps(row).encode() for row in ({"text": "fine row"}, {"title": "no text key"}, {"text": "  "})]
    lines += [b'{"text": "bad \xff byte"}', json.dumps({"text": "ok again"}).encode()]
    path.write_bytes(b"\n".join(lines) + b"\n")


@pytest.mark.parametrize("line, message", [(2, "missing key 'text'"), (3, "empty text"), (4, "invalid UTF-8")])
def test_bad_rows_are_errors(tok, tmp_path, line, message):
    bad_jsonl(tmp_path / "bad.jsonl")
    rows = (tmp_path / "bad.jsonl").read_bytes().splitlines(keepends=True)
    (tmp_path / "one.jsonl").write_bytes(rows[0] + rows[line - 1])
    with pytest.raises(InputError, match=f"one.jsonl:2: .*{message}"):
        preprocess(tok, tmp_path / "one.jsonl", tmp_path / "out" / "x", PretrainHandler(), workers=2)
    assert not (tmp_path / "out").exists() or os.listdir(tmp_path / "out") == []  # nothing half-written


def test_bad_rows_skipped_and_counted(tok, tmp_path):
    bad_jsonl(tmp_path / "bad.jsonl")
    summary = preprocess(tok, tmp_path / "bad.jsonl", tmp_path / "x", PretrainHandler(), skip_bad_rows=True)
    assert (summary.documents, summary.bad_rows) == (2, 3)
    assert read_docs(tmp_path / "x_text_document") == [[1] + tok.encode("fine row"), [1] + tok.encode("ok again")]


def test_ids_beyond_vocab_missing_input_and_seq_length(tok, tmp_path):
    with pytest.raises(InputError, match=r"alpaca_sample.jsonl:1: input_ids: token id \d+ is outside the vocab"):
        preprocess(tok, ALPACA, tmp_path / "v", InstructionHandler(), vocab_size=1000)
    with pytest.raises(InputError, match="no parquet/jsonl/json file matches"):
        preprocess(tok, tmp_path / "nothing*.parquet", tmp_path / "m", PretrainHandler())
    lengths = [1 + len(tok.encode(t)) for t in texts()]
    summary = preprocess(tok, ALPACA, tmp_path / "s", PretrainHandler(("output",)), seq_length=12)
    outputs = [1 + len(tok.encode(r["output"])) for r in ROWS]
    assert summary.too_long == sum(n >= 12 for n in outputs) > 0 and summary.documents == sum(n < 12 for n in outputs)
    assert max(len(d) for d in read_docs(tmp_path / "s_output_document")) < 12 < max(lengths)


def cli(*args):
    return subprocess.run([sys.executable, "-m", "experiments.preprocess_data", *args], capture_output=True,
                          text=True, cwd=Path(__file__).parent.parent, timeout=120)


@pytest.mark.slow
def test_cli_success_and_one_line_error(tmp_path):
    (tmp_path / "hf").mkdir()
    shutil.copy(default_tokenizer_path(), tmp_path / "hf" / "tokenizer.model")
    done = cli("--input", str(ALPACA), "--output-prefix", f"{tmp_path}/sft", "--tokenizer-type", "PretrainedFromHF",
               "--tokenizer-name-or-path", f"{tmp_path}/hf", "--append-eod", "--tokenizer-not-use-fast",
               "--handler-name", "GeneralInstructionHandler", "--workers", "2")  # the seed's, ModelLink-spelt
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("SentencePiece (tokenizer.model) is the slow tokenizer") == 1
    assert "wrote 36 documents" in done.stdout and len(read_docs(f"{tmp_path}/sft_packed_labels_document")) == 36
    bad_jsonl(tmp_path / "bad.jsonl")
    failed = cli(f"--input={tmp_path}/bad.jsonl", f"--output_prefix={tmp_path}/bad")
    assert failed.returncode == 1 and "Traceback" not in failed.stderr
    assert failed.stderr.strip().splitlines()[-1].startswith(f"error: {tmp_path}/bad.jsonl:2: missing key 'text'")
    assert not list(tmp_path.glob("bad_*"))


# ---- bad inputs and faults: one line naming the file and row, nothing published, nothing left ----------

def _parquet_bytes(table):
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


BAD_INPUTS = {  # file name: (bytes, options, message)
    "empty.jsonl": (b"", {}, "--input .*empty.jsonl: no rows; no documents to write, nothing was published"),
    "blank.jsonl": (b"\n  \n\n", {}, "blank.jsonl: no rows; no documents to write"),
    "empty.json": (b"[]", {}, "empty.json: no rows; no documents to write"),
    "empty.parquet": (_parquet_bytes(pa.table({"text": pa.array([], pa.string())})), {}, "empty.parquet: no rows"),
    "all_bad.jsonl": (b'{"title": "a"}\n{"text": " "}\n', {"skip_bad_rows": True},
                      r"all_bad.jsonl: every row skipped \(2 bad, 0 too long\); no documents to write"),
    "all_long.jsonl": (b'{"text": "a b c d e f g h"}\n', {"seq_length": 3},
                       r"all_long.jsonl: every row skipped \(0 bad, 1 too long\)"),
    "bad_json.jsonl": (b'{"text": "ok"}\n{"text": "cut"\n', {},
                       r"bad_json.jsonl:2: invalid JSON \(Expecting ',' delimiter"),
    "list_row.jsonl": (b'["text", "a list"]\n', {}, "list_row.jsonl:1: expected a JSON object, got list"),
    "number_text.jsonl": (b'{"text": 42}\n', {}, "number_text.jsonl:1: 'text': expected text, got int"),
    "utf16.jsonl": ('{"text": "hi"}\n'.encode("utf-16"), {}, "utf16.jsonl:1: invalid UTF-8 at byte 0"),
    "latin1.jsonl": ('{"text": "ok"}\n{"text": "café"}\n'.encode("latin-1"), {}, "latin1.jsonl:2: invalid UTF-8"),
    "surrogate.jsonl": (b'{"text": "\\ud800 lone"}\n', {}, "surrogate.jsonl:1: 'text': invalid UTF-8 .*surrogate"),
    "cut.json": (b'[{"text": "a"},\n{"text": "b"', {}, r"cut.json: not a valid UTF-8 JSON array \(Expecting"),
    "scalar_row.json": (b'[{"text": "a"}, 7]', {}, "scalar_row.json row 1: expected a JSON object, got int"),
    "int_column.parquet": (_parquet_bytes(pa.table({"text": [1, 2]})), {},
                           "int_column.parquet row 0: 'text': expected text, got int"),
    "damaged.parquet": (b"PAR1 not really", {}, "damaged.parquet: not a readable parquet file"),
}


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_input_is_one_line_and_leaves_everything_as_it_was(tok, tmp_path, name):
    data, options, message = BAD_INPUTS[name]
    (tmp_path / name).write_bytes(data)
    preprocess(tok, ALPACA, tmp_path / "out" / "x", PretrainHandler(("instruction",)))  # an earlier dataset
    before = contents(tmp_path)
    with pytest.raises(InputError, match=message) as caught:
        preprocess(tok, tmp_path / name, tmp_path / "out" / "x", PretrainHandler(("text",), True), **options)
    one_line(caught.value)
    assert contents(tmp_path) == before


def test_instruction_input_with_no_documents_publishes_nothing(tok, tmp_path):
    (tmp_path / "empty.jsonl").write_bytes(b"")
    with pytest.raises(InputError, match="no rows; no documents to write"):
        preprocess(tok, tmp_path / "empty.jsonl", tmp_path / "out" / "sft", InstructionHandler(), workers=2)
    assert contents(tmp_path) == {"empty.jsonl": b"", "out": None}


def test_leftovers_of_a_killed_run_are_swept_by_the_next(tok, tmp_path, caplog):
    out = tmp_path / "out"
    out.mkdir()
    for leftover in (".x_output_document.bin.partial", ".x_output_document.idx.partial"):
        (out / leftover).write_bytes(b"left by kill -9")
    with caplog.at_level("WARNING", logger="mistral_fn.atomic"):
        preprocess(tok, ALPACA, out / "x", PretrainHandler(("output",)))
    assert sorted(contents(out)) == ["x_output_document.bin", "x_output_document.idx"]
    assert sum("interrupted write" in r.getMessage() for r in caplog.records) == 2
    assert len(read_docs(out / "x_output_document")) == len(ROWS)


def test_a_full_disk_names_the_file_and_keeps_the_earlier_dataset(tok, tmp_path):
    rows = "".join(json.dumps({"text": f"row {i}: " + "lorem ipsum dolor " * 8}) + "\n" for i in range(3000))
    (tmp_path / "big.jsonl").write_text(rows)
    preprocess(tok, ALPACA, tmp_path / "out" / "x", PretrainHandler(("output",)))
    before = contents(tmp_path)
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails like a full disk
    resource.setrlimit(resource.RLIMIT_FSIZE, (len(rows) // 2, limit[1]))
    try:
        with pytest.raises(OSError, match=r"\[Errno 27\] File too large: '.*/out/x_text_document.bin'"):
            preprocess(tok, tmp_path / "big.jsonl", tmp_path / "out" / "x", PretrainHandler())
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)
        signal.signal(signal.SIGXFSZ, handler)
    assert contents(tmp_path) == before


@pytest.mark.slow
def test_kill_9_mid_write_leaves_only_what_the_next_run_sweeps(tok, tmp_path):
    rows = "".join(json.dumps({"text": f"row {i}: lorem ipsum dolor sit amet"}) + "\n" for i in range(60_000))
    (tmp_path / "big.jsonl").write_text(rows)
    partial = tmp_path / "out" / ".big_text_document.bin.partial"
    job = subprocess.Popen([sys.executable, "-m", "experiments.preprocess_data", f"--input={tmp_path}/big.jsonl",
                            f"--output_prefix={tmp_path}/out/big", "--workers=2"], cwd=Path(__file__).parent.parent,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 60
    while not (partial.exists() and partial.stat().st_size > 0) and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    job.kill()  # SIGKILL to the main process only; its workers must notice and exit
    job.wait()
    assert sorted(contents(tmp_path / "out")) == [partial.name]  # mid-write: nothing published
    while time.monotonic() < deadline:  # no orphaned worker stays behind
        try:
            os.killpg(job.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.killpg(job.pid, signal.SIGKILL)
        pytest.fail("worker processes outlived their killed parent")
    summary = preprocess(tok, tmp_path / "big.jsonl", tmp_path / "out" / "big", PretrainHandler())
    assert summary.documents == 60_000
    assert sorted(contents(tmp_path / "out")) == ["big_text_document.bin", "big_text_document.idx"]
    last = [1] + tok.encode("row 59999: lorem ipsum dolor sit amet")
    assert read_docs(tmp_path / "out" / "big_text_document")[-1] == last


def test_modellink_tokenizer_flags(tmp_path):
    from absl import flags
    from absl.testing import flagsaver
    from experiments.preprocess_data import config_from_flags
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "tokenizer.json").write_text("{}")
    base = ["prog", f"--input={ALPACA}", f"--output_prefix={tmp_path}/x"]

    def parse(*args):
        with flagsaver.flagsaver():
            flags.FLAGS.unparse_flags()
            flags.FLAGS([*base, *args])
            return config_from_flags()

    for args, message in [
        (["--tokenizer_type=GPT2BPETokenizer", f"--tokenizer_name_or_path={hf_dir}"],
         "--tokenizer_type=GPT2BPETokenizer: only PretrainedFromHF is supported"),
        (["--tokenizer_type=PretrainedFromHF"], "--tokenizer_type=PretrainedFromHF needs --tokenizer_name_or_path"),
        (["--tokenizer_type=PretrainedFromHF", f"--tokenizer_name_or_path={hf_dir}"],
         f"{hf_dir}: no tokenizer.model in this directory .*its tokenizer.json, a fast tokenizer, cannot replace it"),
    ]:
        with pytest.raises(InputError, match=message) as caught:
            parse(*args)
        one_line(caught.value)
    shutil.copy(default_tokenizer_path(), hf_dir / "tokenizer.model")
    cfg = parse("--tokenizer_type=PretrainedFromHF", f"--tokenizer_name_or_path={hf_dir}", "--tokenizer_not_use_fast",
                "--append_eod", "--handler_name=GeneralInstructionHandler", "--workers=4", "--log_interval=1000")
    assert cfg.tokenizer.model_file == str(hf_dir / "tokenizer.model") and cfg.workers == 4
    assert cfg.handler == InstructionHandler(append_eod=True)
    assert contents(tmp_path) == {"hf": None, "hf/tokenizer.json": b"{}",
                                  "hf/tokenizer.model": Path(default_tokenizer_path()).read_bytes()}
