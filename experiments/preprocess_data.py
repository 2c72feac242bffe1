"""Tokenize parquet/JSON rows into Megatron indexed datasets (ModelLink `tools/preprocess_data.py`).

Pretraining text (writes `<prefix>_text_document.{bin,idx}`):
    python -m experiments.preprocess_data --input alpaca.parquet --tokenizer_name_or_path <hf dir> \\
        --output_prefix dataset/alpaca --workers 4 --log_interval 1000
Instruction data (writes `<prefix>_packed_{input_ids,attention_mask,labels}_document.{bin,idx}`):
    ... --handler_name GeneralInstructionHandler --append_eod

Rows are encoded by `--workers` processes in input order, so the output does not depend on the
worker count. Outputs are written under `.<name>.partial` names (swept by the next run to the same
prefix if a run is killed) and renamed only when every row is done; an input without a single
document to write is an error and publishes nothing.

ModelLink's flags are accepted in underscore spelling: `--tokenizer_type PretrainedFromHF` (the only
type: a local HF directory's SentencePiece `tokenizer.model`) and `--tokenizer_not_use_fast`
(SentencePiece is the slow tokenizer already).
"""

from __future__ import annotations

import dataclasses
import itertools
import multiprocessing
import sys
import time

from absl import flags, logging
from tqdm import tqdm

from experiments import cli
from experiments.cli import main_guard
from mistral_fn.data.handlers import HANDLER_NAMES, encode_row, make_handler
from mistral_fn.data.indexed import IndexedDatasetWriter
from mistral_fn.data.sources import find_inputs, iter_rows
from mistral_fn.errors import InputError
from mistral_fn.tokenizer import Tokenizer, load_tokenizer

_INPUT = flags.DEFINE_string("input", None, "a parquet/jsonl/json file, a directory of them, or a glob pattern")
_TOKENIZER_MODEL = flags.DEFINE_string("tokenizer_model", None, "a SentencePiece tokenizer.model file")
_TOKENIZER_DIR = flags.DEFINE_string("tokenizer_name_or_path", None,
                                     "a local HF model directory holding tokenizer.model (no hub downloads)")
_TOKENIZER_TYPE = flags.DEFINE_string("tokenizer_type", None, "ModelLink's tokenizer type; only PretrainedFromHF "
                                      "(with --tokenizer_name_or_path) is supported")
_NOT_USE_FAST = flags.DEFINE_bool("tokenizer_not_use_fast", False,
                                  "accepted for ModelLink command lines: SentencePiece is the slow tokenizer already")
_OUTPUT_PREFIX = flags.DEFINE_string("output_prefix", None, "output path prefix")
_HANDLER = flags.DEFINE_enum("handler_name", "GeneralPretrainHandler", HANDLER_NAMES, "ModelLink handler name")
_JSON_KEYS = flags.DEFINE_list("json_keys", ["text"], "row fields to tokenize (pretraining handler)")
_APPEND_EOD = flags.DEFINE_bool("append_eod", False, "append EOS to every document")
_WORKERS = flags.DEFINE_integer("workers", 1, "tokenizer processes", lower_bound=1)
_LOG_INTERVAL = flags.DEFINE_integer("log_interval", 1000, "log progress every this many documents", lower_bound=1)
_SEQ_LENGTH = flags.DEFINE_integer("seq_length", None, "skip samples of at least this many tokens (as ModelLink)")
_ON_BAD_ROW = flags.DEFINE_enum("on_bad_row", "error", ["error", "skip"],
                                "a malformed row stops with an error, or is counted, logged and skipped")
_VOCAB_SIZE = flags.DEFINE_integer("vocab_size", None, "model vocabulary the ids must fit (default: the tokenizer's)")

_CHUNK_ROWS = 64  # rows per task sent to a worker


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
    input: str
    output_prefix: str
    handler: object
    tokenizer: Tokenizer
    workers: int = 1
    log_interval: int = 1000
    seq_length: int | None = None
    skip_bad_rows: bool = False
    vocab_size: int | None = None


@dataclasses.dataclass
class Summary:
    documents: int = 0
    tokens: int = 0
    bad_rows: int = 0
    too_long: int = 0
    seconds: float = 0.0
    outputs: tuple[str, ...] = ()


_worker: dict = {}  # per-process encoding settings, set once by `_init_worker`


def _init_worker(handler, tokenizer: Tokenizer, vocab_size: int, skip_bad_rows: bool) -> None:
    _worker.update(handler=handler, tokenizer=tokenizer, vocab_size=vocab_size, skip=skip_bad_rows)


def _encode_chunk(chunk: list) -> list:
    """[(where, raw row)] → [(where, {output: ids}) or (where, error message) for a skipped bad row]."""
    out = []
    for where, raw in chunk:
        try:
            out.append((where, encode_row(_worker["handler"], _worker["tokenizer"], where, raw,
                                          _worker["vocab_size"])))
        except InputError as e:
            if not _worker["skip"]:
                raise
            out.append((where, str(e)))
    return out


def _chunks(iterable, size: int):
    iterator = iter(iterable)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def _encoded(cfg: PreprocessConfig, chunks):
    """Encoded chunks in input order, from `cfg.workers` processes (or this one)."""
    args = (cfg.handler, cfg.tokenizer, cfg.vocab_size or cfg.tokenizer.vocab_size, cfg.skip_bad_rows)
    if cfg.workers == 1:
        _init_worker(*args)
        yield from map(_encode_chunk, chunks)
        return
    with multiprocessing.Pool(cfg.workers, initializer=_init_worker, initargs=args) as pool:
        yield from pool.imap(_encode_chunk, chunks)


def run(cfg: PreprocessConfig) -> Summary:
    """Tokenize every input row into the handler's indexed datasets; returns counts and timing."""
    files = find_inputs(cfg.input)
    handler = cfg.handler
    id_output = handler.id_outputs[0]
    prefixes = [handler.output_prefix(cfg.output_prefix, out) for out in handler.outputs]
    writers = {out: IndexedDatasetWriter(prefix) for out, prefix in zip(handler.outputs, prefixes)}
    summary = Summary(outputs=tuple(prefixes))
    start = time.perf_counter()
    progress = tqdm(unit=" docs", file=sys.stderr, desc="preprocess", mininterval=1.0, delay=0.5)
    try:
        chunks = _chunks(iter_rows(files, handler.input_keys), _CHUNK_ROWS)
        for results in _encoded(cfg, chunks):
            for where, docs in results:
                if isinstance(docs, str):
                    summary.bad_rows += 1
                    logging.warning("skipped %s", docs)
                elif cfg.seq_length and max(len(d) for d in docs.values()) >= cfg.seq_length:
                    summary.too_long += 1
                else:
                    for out, writer in writers.items():
                        writer.add_document(docs[out])
                    summary.documents += 1
                    summary.tokens += len(docs[id_output])
                    if summary.documents % cfg.log_interval == 0:
                        elapsed = time.perf_counter() - start
                        logging.info("processed %d documents (%.0f docs/s, %.0f tokens/s)", summary.documents,
                                     summary.documents / elapsed, summary.tokens / elapsed)
            progress.update(len(results))
            progress.set_postfix_str(f"{summary.tokens / max(time.perf_counter() - start, 1e-9):,.0f} tokens/s",
                                     refresh=False)
        if summary.documents == 0:
            rows = (f"every row skipped ({summary.bad_rows} bad, {summary.too_long} too long)"
                    if summary.bad_rows or summary.too_long else "no rows")
            raise InputError(f"--input {cfg.input}: {rows}; no documents to write, nothing was published")
        for writer in writers.values():
            writer.finish()
        for writer in writers.values():
            writer.commit()
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    finally:
        progress.close()
    summary.seconds = time.perf_counter() - start
    return summary


def config_from_flags() -> PreprocessConfig:
    for flag in (_INPUT, _OUTPUT_PREFIX):
        if not flag.value:
            raise InputError(f"--{flag.name} is required")
    if _TOKENIZER_MODEL.value and _TOKENIZER_DIR.value:
        raise InputError("pass either --tokenizer_model or --tokenizer_name_or_path, not both")
    if _TOKENIZER_TYPE.value not in (None, "PretrainedFromHF"):
        raise InputError(f"--tokenizer_type={_TOKENIZER_TYPE.value}: only PretrainedFromHF is supported (a local HF "
                         "model directory's SentencePiece tokenizer.model, given by --tokenizer_name_or_path)")
    if _TOKENIZER_TYPE.value and not _TOKENIZER_DIR.value:
        raise InputError("--tokenizer_type=PretrainedFromHF needs --tokenizer_name_or_path, a local HF model directory")
    if _NOT_USE_FAST.value:
        logging.info("--tokenizer_not_use_fast: SentencePiece (tokenizer.model) is the slow tokenizer; "
                     "it is the only one used")
    return PreprocessConfig(
        input=_INPUT.value, output_prefix=_OUTPUT_PREFIX.value,
        handler=make_handler(_HANDLER.value, tuple(_JSON_KEYS.value), _APPEND_EOD.value),
        tokenizer=load_tokenizer(_TOKENIZER_MODEL.value or _TOKENIZER_DIR.value), workers=_WORKERS.value,
        log_interval=_LOG_INTERVAL.value, seq_length=_SEQ_LENGTH.value, skip_bad_rows=_ON_BAD_ROW.value == "skip",
        vocab_size=_VOCAB_SIZE.value)


@main_guard
def main(argv):
    if len(argv) > 1:
        raise InputError(f"unexpected arguments: {' '.join(argv[1:])}")
    cfg = config_from_flags()
    s = run(cfg)
    rate = 1 / max(s.seconds, 1e-9)
    print(f"wrote {s.documents:,} documents, {s.tokens:,} tokens in {s.seconds:.1f} s "
          f"({s.documents * rate:,.0f} docs/s, {s.tokens * rate:,.0f} tokens/s) with {cfg.workers} worker(s)")
    if s.bad_rows:
        print(f"skipped {s.bad_rows:,} bad rows (logged above)")
    if s.too_long:
        print(f"skipped {s.too_long:,} samples of >= {cfg.seq_length} tokens")
    for prefix in s.outputs:
        print(f"  {prefix}.bin / .idx")


if __name__ == "__main__":
    cli.run(main)
