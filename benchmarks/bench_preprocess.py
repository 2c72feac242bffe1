"""Preprocessing throughput against raw SentencePiece encoding of the same text, in the same run.

    python -m benchmarks.bench_preprocess [--docs=20000] [--worker_counts=1,2]

Writes a parquet file of synthetic alpaca-style documents to a temporary directory, times
`sentencepiece.encode` over every text in this process, then the full pretraining preprocessing
(read parquet → encode → write the indexed dataset) at each worker count, and prints tokens/s and the
ratio to raw encoding. Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import json
import random
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import sentencepiece as spm
from absl import app, flags

from experiments.preprocess_data import PreprocessConfig, run
from mistral_fn.data.handlers import PretrainHandler
from mistral_fn.tokenizer import load_tokenizer

_DOCS = flags.DEFINE_integer("docs", 20000, "documents in the synthetic corpus")
_WORKER_COUNTS = flags.DEFINE_list("worker_counts", ["1", "2"], "preprocessing worker counts to measure")

_SAMPLE = Path(__file__).parent.parent / "tests" / "data" / "alpaca_sample.jsonl"


def synthetic_texts(n: int, seed: int = 0) -> list[str]:
    """`n` documents of 1-8 shuffled alpaca sample rows each (a few hundred tokens on average)."""
    rows = [json.loads(line) for line in _SAMPLE.read_text(encoding="utf-8").splitlines()]
    pieces = [f"{r['instruction']}\n{r['input']}\n{r['output']}" for r in rows]
    rng = random.Random(seed)
    return ["\n\n".join(rng.choices(pieces, k=rng.randint(1, 8))) for _ in range(n)]


def main(argv):
    del argv
    tokenizer = load_tokenizer()
    texts = synthetic_texts(_DOCS.value)
    sp = spm.SentencePieceProcessor(model_file=tokenizer.model_file)
    start = time.perf_counter()
    raw_tokens = sum(len(sp.encode(t)) + 1 for t in texts)  # + BOS, as the handler adds
    raw_rate = raw_tokens / (time.perf_counter() - start)
    print(f"{len(texts):,} documents, {raw_tokens:,} tokens")
    print(f"raw sentencepiece encode (1 process): {raw_rate:12,.0f} tokens/s")
    with tempfile.TemporaryDirectory() as tmp:
        pq.write_table(pa.table({"text": texts}), f"{tmp}/corpus.parquet", row_group_size=4096)
        for workers in map(int, _WORKER_COUNTS.value):
            summary = run(PreprocessConfig(input=f"{tmp}/corpus.parquet", output_prefix=f"{tmp}/out{workers}",
                                           handler=PretrainHandler(), tokenizer=tokenizer, workers=workers))
            assert summary.tokens == raw_tokens
            rate = summary.tokens / summary.seconds
            print(f"preprocess_data, {workers} worker(s):      {rate:12,.0f} tokens/s  "
                  f"ratio to raw encode {rate / raw_rate:.2f}")


if __name__ == "__main__":
    app.run(main)
