"""Dtypes of written checkpoints, and the one cast every checkpoint writer and loader uses.

Casting to float16 is checked: a weight beyond float16's range (|x| > 65504) would silently become
`inf`, so it is refused with the tensor's name and its largest magnitude. bfloat16 and float32 have
float32's range and need no check.
"""

from __future__ import annotations

import torch

from mistral_fn.errors import CheckpointError
from mistral_fn.params import map_with_path

# ModelLink's `--params-dtype` names.
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
FP16_MAX = torch.finfo(torch.float16).max


def cast_leaf(name: str, x: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """`x` as `dtype` (None or the same dtype: `x` itself). `name` identifies `x` in the error raised
    when a float16 cast would overflow."""
    if dtype is None or x.dtype == dtype:
        return x
    if dtype == torch.float16 and x.is_floating_point() and x.numel():
        low, high = torch.aminmax(x.detach())
        peak = max(-low.item(), high.item())
        if peak > FP16_MAX:
            raise CheckpointError(f"{name}: max |value| {peak:.6g} is beyond float16's range (65504); "
                                  "converting would turn it into inf (keep bf16 or fp32)")
    return x.to(dtype)


def cast_tree(tree, dtype: torch.dtype | None, prefix: str = ""):
    """Every leaf of `tree` through `cast_leaf`, named by `prefix` joined with its path."""
    if dtype is None:
        return tree
    return map_with_path(lambda path, x: cast_leaf("/".join(p for p in (prefix, path) if p), x, dtype), tree)
