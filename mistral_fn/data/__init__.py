"""Data: Megatron indexed datasets, preprocessing handlers, pretraining/instruction datasets and batches."""

from mistral_fn.data.indexed import IndexedDataset, IndexedDatasetWriter

__all__ = ["IndexedDataset", "IndexedDatasetWriter"]
