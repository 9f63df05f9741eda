"""The dtypes of the dora_fx ops' results, from their inputs: what the ops, the kernels and the rewrite
(which builds the ops' fake values) agree on."""

from __future__ import annotations

import torch


def norm_dtype(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor) -> torch.dtype:
    """dtype of the factored norm: float32, or float64 when any input is float64."""
    dtype = torch.promote_types(weight.dtype, torch.float32)
    return torch.promote_types(dtype, torch.promote_types(lora_A.dtype, lora_B.dtype))


def compose_dtype(
    result: torch.Tensor, base: torch.Tensor | None, lora: torch.Tensor, magnitude: torch.Tensor
) -> torch.dtype:
    """dtype of the composed output: PEFT's type promotion of the tensors it combines (norm excluded)."""
    dtype = torch.promote_types(result.dtype, lora.dtype)
    if base is not None:
        dtype = torch.promote_types(dtype, base.dtype)
    return torch.promote_types(dtype, magnitude.dtype)
