"""Data: Megatron indexed datasets, preprocessing handlers, pretraining/instruction datasets and batches."""

from mistral_fn.data.datasets import GPTDataset, InstructionDataset, iterate_batches, split_bounds
from mistral_fn.data.handlers import InstructionHandler, PretrainHandler, make_handler
from mistral_fn.data.indexed import IndexedDataset, IndexedDatasetWriter

__all__ = ["IndexedDataset", "IndexedDatasetWriter", "PretrainHandler", "InstructionHandler", "make_handler",
           "GPTDataset", "InstructionDataset", "iterate_batches", "split_bounds"]
