"""Triton helpers shared by the kernels."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dora_fx.kernels import launch


@triton.jit
def column_sums(partial_ptr, stride_part, n_parts, cols, mask, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """``Σ_p P[p, cols]`` in float32 over the ``n_parts`` rows of a partial-sum buffer ``P``.

    ``cols`` are ``BLOCK_N`` column offsets (``mask`` marks the valid ones); the rows are read
    ``BLOCK_P`` at a time and added in a ``[BLOCK_P, BLOCK_N]`` accumulator, reduced once at the end.
    """
    offs_p = tl.arange(0, BLOCK_P)
    total = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    for p in range(0, n_parts, BLOCK_P):
        parts = p + offs_p
        total += tl.load(
            partial_ptr + parts[:, None] * stride_part + cols[None, :],
            mask=(parts < n_parts)[:, None] & mask[None, :],
            other=0.0,
        )
    return tl.sum(total, axis=0)


@triton.jit
def mma(a, b, acc, UPCAST: tl.constexpr):
    """``acc + a @ b`` with fp32 accumulation.

    ``UPCAST`` runs the product on float32 operands with ``tf32x3`` (about fp32 accuracy); it is used
    for float32 or mixed-dtype inputs, and for any inputs under the Triton interpreter, whose ``tl.dot``
    multiplies the raw bf16 bit patterns as integers (16-bit products are exact in fp32, so the
    upcast changes nothing but the accumulation order); :func:`mma_upcast` decides.
    """
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="tf32x3")
    return tl.dot(a, b, acc)


def mma_upcast(a: torch.dtype, b: torch.dtype) -> bool:
    """:func:`mma`'s ``UPCAST`` for operands of dtypes ``a`` and ``b``: float32 or mixed operands, and
    any operands under Triton's interpreter."""
    native = a == b and a in (torch.float16, torch.bfloat16)
    return not native or launch.interpreting()
