"""Triton kernel for the factored DoRA weight norm (DESIGN.md §3).

``||W_i + s(BA)_i||² = ||W_i||² + 2s<B_i, U_i> + s²<B_i, (B G)_i>`` with ``U = W Aᵀ [d_out, r]`` and
``G = A Aᵀ [r, r]``; the ``[d_out, d_in]`` product is never formed.

``weight_norm`` (what the ops call on CUDA): ``U``, ``G`` and ``B G`` from GEMMs with float32 outputs
(cuBLAS on CUDA, :func:`reference.matmul_float32`); for a bf16 ``B``, ``B G`` is one GEMM against the
two bf16 halves ``[G_hi | G_lo]`` of ``G``, built by one small kernel. Then one launch of
``_norm_rows_kernel``: each program owns a block of rows, sums ``<B_i, U_i>`` and ``<B_i, (B G)_i>``
over the columns in a fixed order, adds ``||W_i||²`` (given by the caller, kept per frozen weight by
:mod:`dora_fx.norm_cache`, or computed here, one more read of ``W``) and finishes its rows
(``_finish_rows``). The rows kernel has no atomics and no sums across programs; the same inputs give
the same bits (``test_cuda_run_to_run_identical``).

Transient memory: ``U`` (``d_out·r``) and ``B G`` (``d_out·2r`` for a bf16 ``B``, else ``d_out·r``) in
float32, and ``r × r``-sized ``G`` and halves.

Cancellation (docs/behaviour.md): a row whose factored terms cancel, amplification
``a_i = (||W_i||² + |2s<B_i, U_i>| + s²||(BA)_i||²) / norm_i²`` above ``AMPLIFICATION_LIMIT``, is
recomputed as ``||W_i + s·B_i·A||²`` tile by tile by the program that owns it, 16 rows at a time;
blocks without such rows only pay a comparison.

An earlier one-pass Triton kernel (``U`` accumulated with ``tl.dot`` while summing ``W²`` from the
same tiles) was removed on 2026-12-02 after an H200 measurement in one run: GPU time per
Llama-3-8B-shaped layer (seven projections, r = 384, bf16) 0.55 ms for this path with ``||W||²``
given, 0.66 ms for that kernel. Forming ``B G`` inside the rows kernel instead (bf16 halves of ``G``
in registers, ``[32, 128]`` tiles) was measured the same way on 2026-12-02 and dropped: 1.91 ms of
rows kernels for 4 layers against 0.28 ms plus about 0.4 ms of cuBLAS ``B·G``; tried again on
2026-12-04 with ``G``'s halves split as loaded and six tile settings (``bench_norm.py``, one H200 run):
631 to 766 µs per layer against 530 µs for this path, and the whole 4096-token train step 1.122x
LoRA's against 1.098x. A split-K Gram (``A`` viewed
as 2 to 32 chunks of columns, one batched GEMM, a sum) was measured on 2026-12-03 (``bench_gram.py``):
8.0 to 17.0 µs against 8.3 to 12.4 µs for the one GEMM at r = 384, so ``G`` stays one GEMM.
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
    u_ptr, bg_ptr, w_sq_ptr, out_ptr, w_ptr, a_ptr, b_ptr, d_out, d_in, r, scaling,
    stride_um, stride_ur, stride_bgm, stride_bgr, stride_wm, stride_wk, stride_ar, stride_ak, stride_bm, stride_br,
    AMPLIFICATION_LIMIT: tl.constexpr, BG_HALVES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    DENSE_ROWS: tl.constexpr, DENSE_UPCAST: tl.constexpr,
):
    """Row norms from ``U = W Aᵀ``, ``B G`` (float32 ``[d_out, r]``, ``G = A Aᵀ``) and ``||W_i||²``.

    For the ``BLOCK_M`` rows of a program, ``BLOCK_N`` columns at a time: ``cross_i = Σ_j B[i, j]·U[i, j]``
    and ``lora_i = Σ_j B[i, j]·(B G)[i, j]``; with ``BG_HALVES`` the ``B G`` buffer is ``[d_out, 2r]``,
    ``B·G_hi`` then ``B·G_lo``, added here. Then ``size = ||W_i||² + s²·lora_i``,
    ``squared = size + 2s·cross_i``, finished by :func:`_finish_rows` (cancelled rows recomputed
    densely from ``W``, ``A`` and ``B``, clamp, square root).
    """
    pid = tl.program_id(0)
    rows = (pid * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    mask_m = rows < d_out
    s = tl.cast(scaling, tl.float32)  # fp64 when Inductor launches the kernel
    offs_n = tl.arange(0, BLOCK_N)
    cross = tl.zeros((BLOCK_M,), dtype=tl.float32)
    lora = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n in range(0, r, BLOCK_N):
        cols = n + offs_n
        mask = mask_m[:, None] & (cols < r)[None, :]
        b_n = tl.load(b_ptr + rows[:, None] * stride_bm + cols[None, :] * stride_br, mask=mask, other=0.0).to(tl.float32)
        u_n = tl.load(u_ptr + rows[:, None] * stride_um + cols[None, :] * stride_ur, mask=mask, other=0.0)
        bg_ptrs = bg_ptr + rows[:, None] * stride_bgm + cols[None, :] * stride_bgr
        bg = tl.load(bg_ptrs, mask=mask, other=0.0)
        if BG_HALVES:
            bg += tl.load(bg_ptrs + r * stride_bgr, mask=mask, other=0.0)
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


@triton.jit
def _gram_halves_kernel(g_ptr, out_ptr, r, BLOCK: tl.constexpr):
    """``out [r, 2r]`` (bf16) ``= [G_hi | G_lo]`` for a contiguous float32 ``G [r, r]``:
    ``G_hi = bf16(G)``, ``G_lo = bf16(G - G_hi)``, so ``G_hi + G_lo`` holds about 16 bits of ``G``."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < r * r
    g = tl.load(g_ptr + offs, mask=mask, other=0.0)
    hi = g.to(tl.bfloat16)
    row, col = offs // r, offs % r
    tl.store(out_ptr + row * 2 * r + col, hi, mask=mask)
    tl.store(out_ptr + row * 2 * r + r + col, (g - hi.to(tl.float32)).to(tl.bfloat16), mask=mask)


def _times_gram(lora_B: torch.Tensor, gram: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``(B·G, halves)`` in float32. For a bf16 ``B``, one GEMM against ``[G_hi | G_lo]``
    (``_gram_halves_kernel``; ``B`` exact) on the tensor cores on CUDA, so the result is ``[d_out, 2r]``
    and ``halves`` is True; otherwise a float32 GEMM."""
    if lora_B.dtype != torch.bfloat16:
        return lora_B.float() @ gram, False
    r = gram.shape[0]
    gram = gram.contiguous()
    halves = torch.empty((r, 2 * r), dtype=torch.bfloat16, device=gram.device)
    block = 1024
    launchable(_gram_halves_kernel, gram)[(triton.cdiv(r * r, block),)](gram, halves, r, BLOCK=block)
    return reference.matmul_float32(lora_B, halves), True


def weight_norm(
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    fan_in_fan_out: bool,
    row_squares: torch.Tensor | None = None,
) -> torch.Tensor:
    """Row norms of ``W + s·B·A`` (float32 ``[d_out]``), as :func:`reference.weight_norm`: three GEMMs
    (``U = W Aᵀ``, ``G = A Aᵀ``, ``B G``; float32 outputs, cuBLAS on CUDA) and ``_norm_rows_kernel``.

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
    bg, halves = _times_gram(lora_B, reference.matmul_float32(lora_A, lora_A.T))
    out = torch.empty((d_out,), dtype=torch.float32, device=weight.device)
    interpreting = launch.interpreting()
    block_m = 16 if interpreting else 32
    block_n = min(64 if interpreting else 128, _pow2_at_least(r))
    launchable(_norm_rows_kernel, weight)[(triton.cdiv(d_out, block_m),)](
        u, bg, row_squares.contiguous(), out, w_rows, lora_A, lora_B, d_out, d_in, r, float(scaling),
        u.stride(0), u.stride(1), bg.stride(0), bg.stride(1), w_rows.stride(0), w_rows.stride(1),
        lora_A.stride(0), lora_A.stride(1), lora_B.stride(0), lora_B.stride(1),
        AMPLIFICATION_LIMIT=reference.AMPLIFICATION_LIMIT, BG_HALVES=halves,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=min(32, _pow2_at_least(r)), BLOCK_K=32 if interpreting else 64,
        DENSE_ROWS=16, DENSE_UPCAST=mma_upcast(lora_B.dtype, lora_A.dtype),
        num_warps=4, num_stages=1,
    )
    return out
