"""Triton kernel for the factored DoRA weight norm (DESIGN.md §3).

``||W_i + s(BA)_i||² = ||W_i||² + 2s<B_i, U_i> + s²<B_i, (B G)_i>`` with ``U = W Aᵀ [d_out, r]`` and
``G = A Aᵀ [r, r]``; the ``[d_out, d_in]`` product is never formed.

``weight_norm`` (what the ops call on CUDA): ``U`` and ``G`` from GEMMs with float32 outputs (cuBLAS
on CUDA, :func:`reference.matmul_float32`), then one launch of ``_norm_rows_kernel``: each program
owns a block of rows, forms their rows of ``B G`` tile by tile on the tensor cores (for a bf16 ``B``
against the two bf16 halves ``[G_hi | G_lo]`` of ``G``, split as they are loaded), sums
``<B_i, U_i>`` and ``<B_i, (B G)_i>`` over the columns in a fixed order, adds ``||W_i||²`` (given by
the caller, kept per frozen weight by :mod:`dora_fx.norm_cache`, or computed here, one more read of
``W``) and finishes its rows (``_finish_rows``). The rows kernel has no atomics and no sums across
programs; the same inputs give the same bits (``test_cuda_run_to_run_identical``).

Transient memory: ``U`` (``d_out·r``, float32) and the ``r × r`` ``G``.

Cancellation (docs/behaviour.md): a row whose factored terms cancel, amplification
``a_i = (||W_i||² + |2s<B_i, U_i>| + s²||(BA)_i||²) / norm_i²`` above ``AMPLIFICATION_LIMIT``, is
recomputed as ``||W_i + s·B_i·A||²`` tile by tile by the program that owns it, 16 rows at a time;
blocks without such rows only pay a comparison.

An earlier one-pass Triton kernel (``U`` accumulated with ``tl.dot`` while summing ``W²`` from the
same tiles) was removed on 2026-12-02 after an H200 measurement in one run: GPU time per
Llama-3-8B-shaped layer (seven projections, r = 384, bf16) 0.55 ms for the GEMM path with ``||W||²``
given, 0.66 ms for that kernel. A split-K Gram (``A`` viewed as 2 to 32 chunks of columns, one
batched GEMM, a sum) was measured on 2026-12-03 (``bench_gram.py``): 8.0 to 17.0 µs against 8.3 to
12.4 µs for the one GEMM at r = 384, so ``G`` stays one GEMM. Until 2026-12-04 ``B G`` was a cuBLAS
GEMM against ``[G_hi | G_lo]`` (from a kernel of its own) whose float32 ``[d_out, 2r]`` result the
rows kernel read back: 14 bytes read per element of ``B`` where this kernel reads 6.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dora_fx import dtypes
from dora_fx.kernels import launch, reference
from dora_fx.kernels.launch import launchable
from dora_fx.kernels.reductions import mma, mma_upcast


@triton.jit
def _dense_row_squares(
    w_ptr, a_ptr, b_ptr, rows, mask_m, d_in, r, s,
    stride_wm, stride_wk, stride_ar, stride_ak, stride_bm, stride_br,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, UPCAST: tl.constexpr,
):
    """``Σ_k (W[i, k] + s·(B A)[i, k])²`` for the rows ``rows`` (where ``mask_m``): the dense form, one
    ``[BLOCK_M, BLOCK_K]`` tile of ``B A`` at a time in registers (``r·BLOCK_K`` multiply-adds per row
    and tile), summed in float32. Its error does not grow with cancellation between ``W`` and ``s·B A``."""
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    total = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k in range(0, d_in, BLOCK_K):
        cols = (k + offs_k).to(tl.int64)
        mask_k = cols < d_in
        w = tl.load(
            w_ptr + rows[:, None] * stride_wm + cols[None, :] * stride_wk, mask=mask_m[:, None] & mask_k[None, :], other=0.0
        ).to(tl.float32)
        ba = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for j in range(0, r, BLOCK_R):
            mask_r = (j + offs_r) < r
            b = tl.load(
                b_ptr + rows[:, None] * stride_bm + (j + offs_r)[None, :] * stride_br,
                mask=mask_m[:, None] & mask_r[None, :],
                other=0.0,
            )
            a = tl.load(
                a_ptr + (j + offs_r)[:, None] * stride_ar + cols[None, :] * stride_ak,
                mask=mask_r[:, None] & mask_k[None, :],
                other=0.0,
            )
            ba = mma(b, a, ba, UPCAST)
        v = w + s * ba
        total += tl.sum(v * v, axis=1)
    return total


@triton.jit
def _finish_rows(
    squared, size, out_ptr, w_ptr, a_ptr, b_ptr, row_start, d_out, d_in, r, s,
    stride_wm, stride_wk, stride_ar, stride_ak, stride_bm, stride_br,
    AMPLIFICATION_LIMIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, DENSE_ROWS: tl.constexpr,
    DENSE_UPCAST: tl.constexpr,
):
    """Stores the norms of rows ``row_start + [0, BLOCK_M)`` from their factored squared norm
    ``squared`` and its non-negative part ``size = ||W_i||² + s²||(B A)_i||²``.

    ``|2s<B_i, U_i>| = |squared - size|``, so ``a_i = (size + |squared - size|) / squared`` is the
    amplification of rounding errors by cancellation. Rows with a positive
    ``size`` whose ``squared`` is not positive (fully cancelled) or whose ``a_i > AMPLIFICATION_LIMIT``
    are marked ``-1`` in ``out`` and then recomputed densely by :func:`_dense_row_squares`,
    ``DENSE_ROWS`` rows at a time and only in the groups of rows that hold a marked one; a block
    without such rows pays one comparison. Zero rows (``size = 0``) and NaN sums are not flagged.
    Norms are ``sqrt(max(·, 0))``.
    """
    rows = (row_start + tl.arange(0, BLOCK_M)).to(tl.int64)
    mask = rows < d_out
    norms = tl.sqrt_rn(tl.maximum(squared, 0.0))
    amplified = size + tl.abs(squared - size) > AMPLIFICATION_LIMIT * squared
    flagged = mask & (size > 0.0) & ((squared <= 0.0) | amplified)
    tl.store(out_ptr + rows, tl.where(flagged, -1.0, norms), mask=mask)
    if tl.sum(flagged.to(tl.int32), axis=0) > 0:
        tl.debug_barrier()  # the marks are visible to every thread of the program
        for group in range(0, BLOCK_M, DENSE_ROWS):
            group_rows = (row_start + group + tl.arange(0, DENSE_ROWS)).to(tl.int64)
            group_mask = group_rows < d_out
            marked = group_mask & (tl.load(out_ptr + group_rows, mask=group_mask, other=0.0) < 0.0)
            if tl.sum(marked.to(tl.int32), axis=0) > 0:
                dense = _dense_row_squares(
                    w_ptr, a_ptr, b_ptr, group_rows, marked, d_in, r, s,
                    stride_wm, stride_wk, stride_ar, stride_ak, stride_bm, stride_br,
                    DENSE_ROWS, BLOCK_K, BLOCK_R, DENSE_UPCAST,
                )
                tl.store(out_ptr + group_rows, tl.sqrt_rn(tl.maximum(dense, 0.0)), mask=marked)


@triton.jit
def _norm_rows_kernel(
    u_ptr, gram_ptr, w_sq_ptr, out_ptr, w_ptr, a_ptr, b_ptr, d_out, d_in, r, scaling,
    stride_um, stride_ur, stride_wm, stride_wk, stride_ar, stride_ak, stride_bm, stride_br,
    AMPLIFICATION_LIMIT: tl.constexpr, GRAM_HALVES: tl.constexpr, GRAM_UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr, DENSE_ROWS: tl.constexpr, DENSE_UPCAST: tl.constexpr,
):
    """Row norms from ``U = W Aᵀ`` (float32 ``[d_out, r]``), ``G = A Aᵀ`` (float32 ``[r, r]``,
    contiguous), ``B`` and ``||W_i||²``; ``B G`` is formed here, tile by tile, and never stored.

    For the ``BLOCK_M`` rows of a program, ``BLOCK_N`` columns at a time: the ``[BLOCK_M, BLOCK_N]``
    tile of ``B G`` from ``BLOCK_G``-deep products (with ``GRAM_HALVES``, for a bf16 ``B``, against the
    two bf16 halves ``G_hi = bf16(G)`` and ``G_lo = bf16(G - G_hi)``, which hold about 16 bits of ``G``:
    exact products on the tensor cores, float32 sums; otherwise float32 products, ``GRAM_UPCAST``),
    then ``cross_i = Σ_j B[i, j]·U[i, j]`` and ``lora_i = Σ_j B[i, j]·(B G)[i, j]``. Then
    ``size = ||W_i||² + s²·lora_i``, ``squared = size + 2s·cross_i``, finished by :func:`_finish_rows`
    (cancelled rows recomputed densely from ``W``, ``A`` and ``B``, clamp, square root).
    """
    pid = tl.program_id(0)
    rows = (pid * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    mask_m = rows < d_out
    s = tl.cast(scaling, tl.float32)  # fp64 when Inductor launches the kernel
    offs_n = tl.arange(0, BLOCK_N)
    offs_g = tl.arange(0, BLOCK_G)
    cross = tl.zeros((BLOCK_M,), dtype=tl.float32)
    lora = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n in range(0, r, BLOCK_N):
        cols = n + offs_n
        mask_n = cols < r
        bg = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, r, BLOCK_G):
            inner = k + offs_g
            mask_g = inner < r
            b_k = tl.load(
                b_ptr + rows[:, None] * stride_bm + inner[None, :] * stride_br,
                mask=mask_m[:, None] & mask_g[None, :], other=0.0,
            )
            g = tl.load(gram_ptr + inner[:, None] * r + cols[None, :], mask=mask_g[:, None] & mask_n[None, :], other=0.0)
            if GRAM_HALVES:
                g_hi = g.to(tl.bfloat16)
                bg = mma(b_k, g_hi, bg, GRAM_UPCAST)
                bg = mma(b_k, (g - g_hi.to(tl.float32)).to(tl.bfloat16), bg, GRAM_UPCAST)
            else:
                bg = mma(b_k, g, bg, GRAM_UPCAST)
        mask = mask_m[:, None] & mask_n[None, :]
        b_n = tl.load(b_ptr + rows[:, None] * stride_bm + cols[None, :] * stride_br, mask=mask, other=0.0).to(tl.float32)
        u_n = tl.load(u_ptr + rows[:, None] * stride_um + cols[None, :] * stride_ur, mask=mask, other=0.0)
        cross += tl.sum(b_n * u_n, axis=1)
        lora += tl.sum(b_n * bg, axis=1)
    w_sq = tl.load(w_sq_ptr + rows, mask=mask_m, other=0.0)
    size = w_sq + (s * s) * lora
    squared = size + (2.0 * s) * cross
    _finish_rows(
        squared, size, out_ptr, w_ptr, a_ptr, b_ptr, pid * BLOCK_M, d_out, d_in, r, s,
        stride_wm, stride_wk, stride_ar, stride_ak, stride_bm, stride_br,
        AMPLIFICATION_LIMIT, BLOCK_M, BLOCK_K, BLOCK_R, DENSE_ROWS, DENSE_UPCAST,
    )


def _pow2_at_least(n: int, low: int = 16) -> int:
    return max(low, triton.next_power_of_2(max(n, 1)))


# Tiles of ``_norm_rows_kernel`` on a GPU: rows per program, columns of ``B G`` per tile, depth of
# one product; and its launch's warps and pipeline stages. Module-level so that a benchmark can sweep them.
ROWS_TILES = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_G": 64, "num_warps": 4, "num_stages": 2}
_INTERPRETER_TILES = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_G": 16, "num_warps": 4, "num_stages": 1}


def weight_norm(
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    fan_in_fan_out: bool,
    row_squares: torch.Tensor | None = None,
) -> torch.Tensor:
    """Row norms of ``W + s·B·A`` (float32 ``[d_out]``), as :func:`reference.weight_norm`: two GEMMs
    (``U = W Aᵀ``, ``G = A Aᵀ``; float32 outputs, cuBLAS on CUDA) and ``_norm_rows_kernel``, which
    forms ``B G`` itself.

    ``row_squares`` is ``||W_i||²`` in float32 when the caller has it (a frozen ``W``'s is computed
    once, :mod:`dora_fx.norm_cache`); otherwise it is computed here, one more read of ``W``.
    float64 inputs and empty shapes go to the reference math.
    """
    if dtypes.norm_dtype(weight, lora_A, lora_B) != torch.float32:
        return reference.weight_norm(weight, lora_A, lora_B, scaling, fan_in_fan_out)
    w_rows = weight.T if fan_in_fan_out else weight  # [d_out, d_in], a view
    (d_out, d_in), r = w_rows.shape, lora_A.shape[0]
    if r == 0 or d_in == 0 or d_out == 0:
        return reference.weight_norm(weight, lora_A, lora_B, scaling, fan_in_fan_out)
    if row_squares is None:
        row_squares = torch.linalg.vector_norm(w_rows, dim=1, dtype=torch.float32).square()
    u = reference.matmul_float32(w_rows, lora_A.T)
    gram = reference.matmul_float32(lora_A, lora_A.T)
    out = torch.empty((d_out,), dtype=torch.float32, device=weight.device)
    tiles = dict(_INTERPRETER_TILES if launch.interpreting() else ROWS_TILES)
    tiles["BLOCK_N"] = min(tiles["BLOCK_N"], _pow2_at_least(r))
    tiles["BLOCK_G"] = min(tiles["BLOCK_G"], _pow2_at_least(r))
    halves = lora_B.dtype == torch.bfloat16
    launchable(_norm_rows_kernel, weight)[(triton.cdiv(d_out, tiles["BLOCK_M"]),)](
        u, gram, row_squares.contiguous(), out, w_rows, lora_A, lora_B, d_out, d_in, r, float(scaling),
        u.stride(0), u.stride(1), w_rows.stride(0), w_rows.stride(1),
        lora_A.stride(0), lora_A.stride(1), lora_B.stride(0), lora_B.stride(1),
        AMPLIFICATION_LIMIT=reference.AMPLIFICATION_LIMIT, GRAM_HALVES=halves,
        GRAM_UPCAST=mma_upcast(lora_B.dtype, torch.bfloat16 if halves else torch.float32),
        BLOCK_R=min(32, _pow2_at_least(r)), BLOCK_K=32 if launch.interpreting() else 64,
        DENSE_ROWS=16, DENSE_UPCAST=mma_upcast(lora_B.dtype, lora_A.dtype),
        **tiles,
    )
    return out
