"""Preprocessing end to end: parquet and JSON lines in, Megatron indexed datasets out."""

import json
import os
import subprocess
import sys
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
from mistral_fn.tokenizer import ALPACA_SYSTEM, load_tokenizer

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
    done = cli(f"--input={ALPACA}", f"--output_prefix={tmp_path}/sft", "--handler_name=GeneralInstructionHandler",
               "--append_eod", "--workers=2")
    assert done.returncode == 0, done.stderr
    assert "wrote 36 documents" in done.stdout and len(read_docs(f"{tmp_path}/sft_packed_labels_document")) == 36
    bad_jsonl(tmp_path / "bad.jsonl")
    failed = cli(f"--input={tmp_path}/bad.jsonl", f"--output_prefix={tmp_path}/bad")
    assert failed.returncode == 1 and "Traceback" not in failed.stderr
    assert failed.stderr.strip().splitlines()[-1].startswith(f"error: {tmp_path}/bad.jsonl:2: missing key 'text'")
    assert not list(tmp_path.glob("bad_*"))
