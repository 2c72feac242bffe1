"""Benchmarks scored with the model: MMLU (`mmlu`) under the seed's and lm-evaluation-harness's protocols."""

from mistral_fn.evaluation import mmlu

__all__ = ["mmlu"]
