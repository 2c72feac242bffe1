"""Training datasets over indexed data, and a data-parallel batch iterator.

A sample is `{"tokens": [T] int64, "labels": [T] int64, "loss_mask": [T] float32}` with labels already
shifted (labels[t] is the token after tokens[t]) — Megatron's `get_batch` convention, which
`mistral_fn.loss_fn` consumes; `iterate_batches` stacks samples into `[B, T]` tensors.

GPTDataset (pretraining, Megatron `GPTDataset`): a split's documents are concatenated in a shuffled
order, one fresh permutation per epoch, and cut into `seq_length + 1`-token windows that overlap by one
token (sample i covers stream positions [i*T, i*T + T]); tokens = x[:-1], labels = x[1:], loss_mask 1.
The indices are built once per (data contents, split, seq_length, num_samples, seed) and cached
(`mistral_fn.data.cache`).

InstructionDataset (ModelLink `DecoderPackedMTFDataset`): one sample per example; tokens =
input_ids[:-1], labels = labels[1:], cut to seq_length, right-padded with pad_id / -100; loss_mask =
labels != -100.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch

from mistral_fn.data.cache import cache_dirs, cached
from mistral_fn.data.indexed import IndexedDataset
from mistral_fn.errors import InputError
from mistral_fn.vocab_parallel import IGNORE_INDEX

SPLITS = ("train", "valid", "test")


def split_bounds(split: str, size: int) -> dict[str, tuple[int, int]]:
    """`--split "949,50,1"` → {"train": (0, a), "valid": (a, b), "test": (b, size)} over `size` documents.

    Megatron's rule: each part gets round(weight * size) documents, the rounding error is taken off
    the later boundaries so the last one lands on `size`.
    """
    try:
        weights = [float(w) for w in split.replace("/", ",").split(",")]
    except ValueError:
        raise InputError(f"--split {split!r}: expected up to three comma-separated numbers like 949,50,1") from None
    if not 1 <= len(weights) <= 3 or min(weights) < 0 or sum(weights) <= 0:
        raise InputError(f"--split {split!r}: expected 1-3 non-negative weights with a positive sum")
    weights += [0.0] * (3 - len(weights))
    bounds = [0]
    for w in weights:
        bounds.append(bounds[-1] + int(round(w / sum(weights) * size)))
    excess = bounds[-1] - size
    bounds = [0] + [b - excess for b in bounds[1:]]
    return {name: (bounds[i], bounds[i + 1]) for i, name in enumerate(SPLITS)}


def split_documents(num_documents: int, split: str, split_name: str, where: str) -> np.ndarray:
    if split_name not in SPLITS:
        raise InputError(f"split name {split_name!r}: expected one of {', '.join(SPLITS)}")
    start, end = split_bounds(split, num_documents)[split_name]
    if end <= start:
        raise InputError(f"{where}: the {split_name} part of --split {split} has no documents (of {num_documents})")
    return np.arange(start, end, dtype=np.int64)


def epoch_permutations(documents: np.ndarray, epochs: int, rng: np.random.RandomState) -> np.ndarray:
    """`epochs` independent shuffles of `documents`, concatenated: every document once per epoch."""
    return np.concatenate([rng.permutation(documents) for _ in range(epochs)])


def build_gpt_indices(lengths: np.ndarray, documents: np.ndarray, seq_length: int, num_samples: int | None,
                      seed: int) -> dict[str, np.ndarray]:
    """Megatron's three GPT indices for `documents` (ids into `lengths`, the tokens per document).

    document_index [epochs * D]: document ids in stream order; sample_index [N + 1, 2]: (position in
    document_index, token offset) where sample i starts — it ends, inclusive, where sample i + 1 starts;
    shuffle_index [N]: the order samples are served in. `num_samples=None` means one epoch.
    """
    tokens_per_epoch = int(lengths[documents].sum())
    if tokens_per_epoch < seq_length + 1:
        raise InputError(f"{tokens_per_epoch} tokens cannot make one sample of seq_length + 1 = {seq_length + 1}")
    if num_samples is None:
        num_samples = (tokens_per_epoch - 1) // seq_length
    epochs = max(1, -(-(num_samples * seq_length + 1) // tokens_per_epoch))
    rng = np.random.RandomState(seed)
    document_index = epoch_permutations(documents, epochs, rng)
    ends = np.cumsum(lengths[document_index])
    starts = np.arange(num_samples + 1, dtype=np.int64) * seq_length
    position = np.searchsorted(ends, starts, side="right")  # first document whose end lies past the start
    sample_index = np.stack([position, starts - (ends[position] - lengths[document_index[position]])], axis=1)
    return {"document_index": document_index, "sample_index": sample_index,
            "shuffle_index": rng.permutation(num_samples).astype(np.int64)}


class GPTDataset:
    """Pretraining samples from an indexed dataset `<prefix>.{bin,idx}` (see the module docstring).

    The indices are cached (`mistral_fn.data.cache`): beside the dataset in
    `<prefix>/cache/GPTDataset_indices` (Megatron's place) when writable, else in the user cache
    directory, or in `cache_dir` when given; keyed by the dataset's contents, so a dataset
    re-preprocessed at the same prefix gets fresh indices. Every data-parallel rank may construct it
    at once: one builds, the others wait for it and read.
    """

    def __init__(self, prefix: str, seq_length: int, *, num_samples: int | None = None, seed: int = 1234,
                 split: str = "969,30,1", split_name: str = "train", cache_dir: str | None = None):
        self.data = IndexedDataset(prefix)
        self.seq_length = seq_length
        documents = split_documents(self.data.num_documents, split, split_name, self.data.prefix)
        description = {"kind": "GPTDataset", "data": self.data.fingerprint(), "split": split,
                       "split_name": split_name, "documents": [int(documents[0]), int(documents[-1]) + 1],
                       "seq_length": seq_length, "num_samples": num_samples, "seed": seed}
        lengths = self.data.document_lengths()
        self.indices = cached(cache_dirs(prefix, "GPTDataset", cache_dir), description,
                              lambda: build_gpt_indices(lengths, documents, seq_length, num_samples, seed))

    def __len__(self) -> int:
        return len(self.indices["shuffle_index"])

    def window(self, j: int) -> np.ndarray:
        """The `seq_length + 1` tokens of unshuffled sample j, int64."""
        document_index, sample_index = self.indices["document_index"], self.indices["sample_index"]
        (first, offset), (last, end) = sample_index[j], sample_index[j + 1]
        parts = [self.data.document(int(document_index[k])) for k in range(first, last + 1)]
        parts[-1] = parts[-1][:end + 1]
        parts[0] = parts[0][offset:]
        return np.concatenate(parts).astype(np.int64)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        x = self.window(int(self.indices["shuffle_index"][i]))
        return {"tokens": x[:-1], "labels": x[1:], "loss_mask": np.ones(self.seq_length, np.float32)}


class InstructionDataset:
    """Fine-tuning samples from `<prefix>_packed_{input_ids,labels}_document` (see the module docstring).

    Documents are served in one fresh shuffle per epoch for `num_samples` (default: one epoch). The
    order is a permutation of the document ids, recomputed at construction (milliseconds, never
    cached), so it cannot go stale.
    """

    def __init__(self, prefix: str, seq_length: int, pad_id: int, *, num_samples: int | None = None,
                 seed: int = 1234, split: str = "969,30,1", split_name: str = "train"):
        self.input_ids = IndexedDataset(f"{prefix}_packed_input_ids_document")
        self.labels = IndexedDataset(f"{prefix}_packed_labels_document")
        if not np.array_equal(self.input_ids.document_lengths(), self.labels.document_lengths()):
            raise InputError(f"{prefix}: the packed input_ids and labels datasets disagree in document lengths")
        self.seq_length, self.pad_id = seq_length, pad_id
        documents = split_documents(self.input_ids.num_documents, split, split_name, prefix)
        epochs = 1 if num_samples is None else -(-num_samples // len(documents))
        self.order = epoch_permutations(documents, epochs, np.random.RandomState(seed))[:num_samples]

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        k = int(self.order[i])
        tokens = np.full(self.seq_length, self.pad_id, np.int64)
        labels = np.full(self.seq_length, IGNORE_INDEX, np.int64)
        ids, target = self.input_ids.document(k)[:-1][:self.seq_length], self.labels.document(k)[1:][:self.seq_length]
        tokens[:len(ids)], labels[:len(target)] = ids, target
        return {"tokens": tokens, "labels": labels, "loss_mask": (labels != IGNORE_INDEX).astype(np.float32)}


def collate(samples: Sequence[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Stack per-sample arrays into `[B, T]` tensors."""
    return {key: torch.from_numpy(np.stack([s[key] for s in samples])) for key in samples[0]}


def iterate_batches(dataset, micro_batch_size: int, *, dp_rank: int = 0, dp_size: int = 1,
                    consumed_samples: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """This rank's micro-batches, Megatron's pretraining sampler: each step takes the next
    `micro_batch_size * dp_size` samples and rank r gets the r-th slice of `micro_batch_size`.

    Starts after `consumed_samples` (a resumed run passes its count); drops a last incomplete step.
    """
    if not 0 <= dp_rank < dp_size:
        raise InputError(f"dp_rank {dp_rank} is outside [0, {dp_size})")
    if micro_batch_size < 1:
        raise InputError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    if not 0 <= consumed_samples <= len(dataset):
        raise InputError(f"consumed_samples {consumed_samples} is outside [0, {len(dataset)}] samples")
    step = micro_batch_size * dp_size
    for start in range(consumed_samples, len(dataset) - step + 1, step):
        first = start + dp_rank * micro_batch_size
        yield collate([dataset[i] for i in range(first, first + micro_batch_size)])
