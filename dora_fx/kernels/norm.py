"""Triton kernels for the factored DoRA weight norm (DESIGN.md §3).

``||W_i + s(BA)_i||² = ||W_i||² + 2s<B_i, U_i> + s²<B_i, (B G)_i>`` with ``U = W Aᵀ [d_out, r]`` and
``G = A Aᵀ [r, r]``; the ``[d_out, d_in]`` product is never formed. Two implementations:

- ``weight_norm`` (what the ops call on CUDA): ``U``, ``G`` and ``B G`` from cuBLAS GEMMs with float32
  outputs (``B G`` against the two bf16 halves of ``G`` for a bf16 ``B``), then ``_norm_rows_kernel``,
  one pass over the rows that sums ``<B_i, U_i>`` and ``<B_i, (B G)_i>`` and finishes them as below
  (``||W||²`` given by the caller, kept per frozen weight, or computed).
- ``fused_weight_norm``: one pass over ``W`` that accumulates ``U`` with ``tl.dot`` and the row sums of
  ``W²`` from the same tiles; kept to be measured against the first in one run (``bench_kernels.py``).

Launch plan of ``fused_weight_norm``, three launches at most:

1. ``G = A Aᵀ`` in float32: cuBLAS with float32 output for 16-bit ``A`` on CUDA, else
   ``_gram_kernel`` (split over ``d_in``; only the upper triangle of tiles is computed).
2. ``_prepare_kernel``: sums the Gram splits and, for a bf16 ``B``, stores ``G`` as two bf16 halves;
   zeroes one arrival counter per row block for step 3. Skipped when there is nothing to prepare
   (one Gram split, no bf16 ``B``, one program per row block).
3. ``_norm_kernel``: one pass over ``W``. A program owns ``BLOCK_M`` rows, ``BLOCK_N`` columns of
   ``U`` and a slice of ``d_in`` (split-K when ``d_out·r`` alone gives too few programs; the cross
   term ``<B_i, U_i>`` is linear in ``U``, so slices add up). Its K loop accumulates ``U`` with
   ``tl.dot`` (fp32 accumulation) and, for a round-robin share of the K steps, the row sums of ``W²``
   from the same tile, so the column programs of one row block split that work evenly and ``W`` is
   read from HBM once. Its epilogue adds ``<B_i, 2s·U_i + s²·(B G)_i>`` over its columns (the
   ``B G`` rows shared out among the ``d_in`` slices) and writes partial squared norms; the last
   program of a row block to finish (an atomic counter) sums that block's partials in a fixed order,
   recomputes densely the rows whose factored sum cancelled (``_finish_rows``), clamps at zero and
   takes the square root.

Launches before this plan, bf16 at ``d = 8192, r = 384`` on an H200 (the issue #4 shape): four
(cuBLAS ``G``, ``_gram_finish_kernel``, ``_norm_partial_kernel``, ``_norm_finalize_kernel``); now
three (cuBLAS ``G``, ``_prepare_kernel``, ``_norm_kernel``). float32 ``A``: ``_gram_kernel``,
``_prepare_kernel`` where needed, ``_norm_kernel``. The counters are the reason step 2 stays: they
must be zero before step 3 starts, and a buffer kept zeroed across calls would be state shared by
every call (streams, CUDA graphs, Inductor's buffer planning).

Results do not depend on the order in which programs finish: every sum has a fixed order, and the
counter only decides which program does the final one (``test_cuda_run_to_run_identical``).

Triton 3.6 on an H200 gave run-to-run differences (a race) in two earlier versions of the main
kernel: one that split ``G`` into bf16 halves in registers inside the epilogue loop, and one with
128×256 tiles. The halves therefore come from memory (``_prepare_kernel``), and the tiles stay 128×128.

Transient memory: the partial Gram sums, ``G``, the counters and the ``[2, partials, d_out]`` partial
sums, all 32-bit; ``U`` never leaves registers. The Gram split is capped so that the total stays
under ``2·d_out·r·4`` bytes whenever ``r`` is well below ``d_out``.

Cancellation (docs/behaviour.md): a row whose factored terms cancel, amplification
``a_i = (||W_i||² + |2s<B_i, U_i>| + s²||(BA)_i||²) / norm_i²`` above ``AMPLIFICATION_LIMIT``, is
recomputed as ``||W_i + s·B_i·A||²`` tile by tile in the finishing program, 16 rows at a time;
blocks without such rows only pay a comparison.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
import triton
import triton.language as tl

from dora_fx.kernels import reference
from dora_fx.kernels import launch
from dora_fx.kernels.launch import launchable, num_sms
from dora_fx.kernels.reductions import column_sums, mma

log = logging.getLogger(__name__)


@triton.jit
def _gram_kernel(
    a_ptr,
    partial_ptr,
    r,
    d_in,
    k_per_split,
    stride_ar,
    stride_ak,
    stride_ps,
    stride_pi,
    stride_pj,
    BLOCK_G: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Partial Gram matrix ``P[s, i, j] = Σ_{k ∈ split s} A[i, k]·A[j, k]`` in float32.

    Grid ``(cdiv(r, BLOCK_G), cdiv(r, BLOCK_G), splits)``; tiles below the diagonal exit at once and
    the diagonal-or-above tile also writes its transpose (``G`` is symmetric).
    """
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    pid_s = tl.program_id(2)
    if pid_i > pid_j:
        return
    offs_i = pid_i * BLOCK_G + tl.arange(0, BLOCK_G)
    offs_j = pid_j * BLOCK_G + tl.arange(0, BLOCK_G)
    offs_k = tl.arange(0, BLOCK_K)
    mask_i = offs_i < r
    mask_j = offs_j < r
    k_start = pid_s * k_per_split
    k_stop = tl.minimum(k_start + k_per_split, d_in)
    ai_ptrs = a_ptr + offs_i[:, None] * stride_ar + (k_start + offs_k)[None, :] * stride_ak  # [G, K]
    aj_ptrs = a_ptr + offs_j[None, :] * stride_ar + (k_start + offs_k)[:, None] * stride_ak  # [K, G]
    acc = tl.zeros((BLOCK_G, BLOCK_G), dtype=tl.float32)
    for k in range(k_start, k_stop, BLOCK_K):
        if EVEN_K:  # no mask along the contiguous K: keeps 16-byte loads
            ai = tl.load(ai_ptrs, mask=mask_i[:, None], other=0.0)
            aj = tl.load(aj_ptrs, mask=mask_j[None, :], other=0.0)
        else:
            k_left = k_stop - k
            ai = tl.load(ai_ptrs, mask=mask_i[:, None] & (offs_k[None, :] < k_left), other=0.0)
            aj = tl.load(aj_ptrs, mask=mask_j[None, :] & (offs_k[:, None] < k_left), other=0.0)
        acc = mma(ai, aj, acc, UPCAST)
        ai_ptrs += BLOCK_K * stride_ak
        aj_ptrs += BLOCK_K * stride_ak
    base = partial_ptr + pid_s * stride_ps
    mask = mask_i[:, None] & mask_j[None, :]
    tl.store(base + offs_i[:, None] * stride_pi + offs_j[None, :] * stride_pj, acc, mask=mask)
    if pid_i != pid_j:
        tl.store(base + offs_j[None, :] * stride_pi + offs_i[:, None] * stride_pj, acc, mask=mask)


@triton.jit
def _prepare_kernel(
    partial_ptr,
    g_ptr,
    g_lo_ptr,
    counter_ptr,
    n_elements,
    splits,
    n_counters,
    stride_ps,
    FINISH_G: tl.constexpr,
    SPLIT_BF16: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Everything ``_norm_kernel`` needs ready before it starts, in one launch.

    - With ``FINISH_G``: ``G = Σ_s P[s]`` over the flattened ``r × r`` Gram matrix, in float32. With
      ``SPLIT_BF16`` it stores ``G_hi = bf16(G)`` to ``g_ptr`` and ``G_lo = bf16(G - G_hi)`` to
      ``g_lo_ptr`` (``G_hi + G_lo`` carries about 16 bits of ``G``), else ``G`` itself to ``g_ptr``.
    - Zeroes the ``n_counters`` arrival counters of ``_norm_kernel`` (one per row block).
    """
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(counter_ptr + offs, tl.zeros((BLOCK,), dtype=tl.int32), mask=offs < n_counters)
    if FINISH_G:
        mask = offs < n_elements
        g = column_sums(partial_ptr, stride_ps, splits, offs, mask, BLOCK_S, BLOCK)
        if SPLIT_BF16:
            g_hi = g.to(tl.bfloat16)
            tl.store(g_ptr + offs, g_hi, mask=mask)
            tl.store(g_lo_ptr + offs, (g - g_hi.to(tl.float32)).to(tl.bfloat16), mask=mask)
        else:
            tl.store(g_ptr + offs, g, mask=mask)


@triton.jit
def _row_squares(w, w_ptrs, w_mask, OWN_LOAD: tl.constexpr):
    """``Σ_k W[i, k]²`` over a tile, in float32 (from the tile given, or a load of its own)."""
    if OWN_LOAD:
        wf = tl.load(w_ptrs, mask=w_mask, other=0.0).to(tl.float32)
    else:
        wf = w.to(tl.float32)
    return tl.sum(wf * wf, axis=1)


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
    AMPLIFICATION_LIMIT: tl.constexpr, DENSE_FALLBACK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, DENSE_ROWS: tl.constexpr,
    DENSE_UPCAST: tl.constexpr,
):
    """Stores the norms of rows ``row_start + [0, BLOCK_M)`` from their factored squared norm
    ``squared`` and its non-negative part ``size = ||W_i||² + s²||(B A)_i||²``.

    ``|2s<B_i, U_i>| = |squared - size|``, so ``a_i = (size + |squared - size|) / squared`` is the
    amplification of rounding errors by cancellation. With ``DENSE_FALLBACK``, rows with a positive
    ``size`` whose ``squared`` is not positive (fully cancelled) or whose ``a_i > AMPLIFICATION_LIMIT``
    are marked ``-1`` in ``out`` and then recomputed densely by :func:`_dense_row_squares`,
    ``DENSE_ROWS`` rows at a time and only in the groups of rows that hold a marked one; a block
    without such rows pays one comparison. Zero rows (``size = 0``) and NaN sums are not flagged.
    Without ``DENSE_FALLBACK`` (tests only) nothing is. Norms are ``sqrt(max(·, 0))``.
    """
    rows = (row_start + tl.arange(0, BLOCK_M)).to(tl.int64)
    mask = rows < d_out
    norms = tl.sqrt_rn(tl.maximum(squared, 0.0))
    if not DENSE_FALLBACK:
        tl.store(out_ptr + rows, norms, mask=mask)
        return
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
def _norm_kernel(
    w_ptr,
    a_ptr,
    b_ptr,
    g_ptr,
    g_lo_ptr,
    partial_ptr,
    counter_ptr,
    out_ptr,
    d_out,
    d_in,
    r,
    k_per_split,
    scaling,
    stride_wm,
    stride_wk,
    stride_ar,
    stride_ak,
    stride_bm,
    stride_br,
    stride_gi,
    stride_gj,
    stride_pt,
    stride_pn,
    AMPLIFICATION_LIMIT: tl.constexpr,
    DENSE_FALLBACK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_P: tl.constexpr,
    DENSE_ROWS: tl.constexpr,
    EVEN_K: tl.constexpr,
    UPCAST: tl.constexpr,
    DENSE_UPCAST: tl.constexpr,
    SPLIT_G_BF16: tl.constexpr,
    ROUND_ROBIN_SQUARES: tl.constexpr,
    SQUARES_OWN_LOAD: tl.constexpr,
    SINGLE_PART: tl.constexpr,
):
    """Row norms of ``W + s·B·A`` from tiles of rows ``M``, LoRA columns ``N`` and a slice ``K`` of
    ``d_in``, finished in the same launch.

    With ``U_K = W[:, K] A[:, K]ᵀ`` accumulated by ``tl.dot`` (``W`` read in its stored layout
    through ``stride_wm``/``stride_wk``), program ``(m, n, k)`` computes, for each row ``i`` of its block,

        T[(k, n), i] = Σ_{K steps t of its share} W[i, t]²  +  Σ_{j ∈ N} B[i, j]·(2s·U_K[i, j] + s²·(B G_k)[i, j])
        S[(k, n), i] = the same without the ``2s·U_K`` term,

    where ``G_k`` holds the rows ``j`` of ``G`` in the ``BLOCK_R`` chunks ``k, k + num_k, ...`` (the
    ``B G`` work is shared by the ``d_in`` slices instead of falling on the first one). Each of the
    ``cdiv(r, BLOCK_N)`` column programs of a ``(M, K)`` tile squares every ``num_n``-th K step of ``W``
    (``ROUND_ROBIN_SQUARES``; otherwise column block 0 squares all of them). So ``Σ T`` over ``(k, n)``
    is ``||W_i + s(BA)_i||²`` and ``Σ S`` is ``||W_i||² + s²||(BA)_i||²``. ``(B G)[:, N]`` runs on tensor
    cores: with ``SPLIT_G_BF16``, ``G = G_hi + G_lo`` (``g_ptr``, ``g_lo_ptr``, both bf16, about 16
    bits of ``G``) against the bf16 ``B``; otherwise fp32 ``G`` at ``g_ptr`` in a ``tf32x3`` product.
    ``SQUARES_OWN_LOAD`` squares a second load of the ``W`` tile instead of the one fed to ``tl.dot``.

    Finish: with ``SINGLE_PART`` (one program per row block) the program finishes its rows itself.
    Otherwise each program stores ``T`` and ``S`` to ``partial_ptr`` (planes ``stride_pt`` apart) and
    bumps its row block's counter (zeroed by ``_prepare_kernel``); the program that arrives last sums
    the partials of the block in a fixed order (so the result does not depend on arrival order) and
    finishes the rows with :func:`_finish_rows` (clamp, square root, dense recomputation of rows
    whose factored sum cancelled).
    """
    pid = tl.program_id(0)
    num_n = tl.cdiv(r, BLOCK_N)
    num_k = tl.cdiv(d_in, k_per_split)
    pid_n = pid % num_n
    pid_k = (pid // num_n) % num_k
    pid_m = pid // (num_n * num_k)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < d_out
    mask_n = offs_n < r
    rows = offs_m.to(tl.int64)
    k_start = pid_k * k_per_split
    k_stop = tl.minimum(k_start + k_per_split, d_in)

    w_ptrs = w_ptr + rows[:, None] * stride_wm + (k_start + offs_k)[None, :].to(tl.int64) * stride_wk  # [M, K]
    a_ptrs = a_ptr + offs_n[None, :] * stride_ar + (k_start + offs_k)[:, None].to(tl.int64) * stride_ak  # [K, N]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    w_sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for it in range(0, tl.cdiv(k_stop - k_start, BLOCK_K)):
        if EVEN_K:  # no mask along K, which is W's contiguous dim unless fan_in_fan_out: 16-byte loads
            w_mask = mask_m[:, None]
            a = tl.load(a_ptrs, mask=mask_n[None, :], other=0.0)
        else:
            k_left = k_stop - k_start - it * BLOCK_K
            w_mask = mask_m[:, None] & (offs_k[None, :] < k_left)
            a = tl.load(a_ptrs, mask=mask_n[None, :] & (offs_k[:, None] < k_left), other=0.0)
        w = tl.load(w_ptrs, mask=w_mask, other=0.0)
        acc = mma(w, a, acc, UPCAST)
        if ROUND_ROBIN_SQUARES:
            if it % num_n == pid_n:
                w_sq += _row_squares(w, w_ptrs, w_mask, SQUARES_OWN_LOAD)
        else:
            w_sq += _row_squares(w, w_ptrs, w_mask, SQUARES_OWN_LOAD)
        w_ptrs += BLOCK_K * stride_wk
        a_ptrs += BLOCK_K * stride_ak
    if not ROUND_ROBIN_SQUARES:
        w_sq = tl.where(pid_n == 0, w_sq, 0.0)

    # Epilogue: s²·(B G_k)[M, N] = s²·Σ_{j in this slice's chunks} B[M, j] G[j, N], then the row terms.
    s = tl.cast(scaling, tl.float32)  # fp64 when Inductor launches the kernel
    bg = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    offs_r = tl.arange(0, BLOCK_R)
    for j in range(pid_k * BLOCK_R, r, num_k * BLOCK_R):
        mask_r = (j + offs_r) < r
        b = tl.load(
            b_ptr + rows[:, None] * stride_bm + (j + offs_r)[None, :] * stride_br,
            mask=mask_m[:, None] & mask_r[None, :],
            other=0.0,
        )
        g_offs = (j + offs_r)[:, None] * stride_gi + offs_n[None, :] * stride_gj
        g_mask = mask_r[:, None] & mask_n[None, :]
        g = tl.load(g_ptr + g_offs, mask=g_mask, other=0.0)
        if SPLIT_G_BF16:
            bg = mma(b, g, bg, UPCAST)
            bg = mma(b, tl.load(g_lo_ptr + g_offs, mask=g_mask, other=0.0), bg, UPCAST)
        else:
            bg = tl.dot(b.to(tl.float32), g, bg, input_precision="tf32x3")
    b_n = tl.load(
        b_ptr + rows[:, None] * stride_bm + offs_n[None, :] * stride_br,
        mask=mask_m[:, None] & mask_n[None, :],
        other=0.0,
    ).to(tl.float32)
    size = w_sq + tl.sum(b_n * ((s * s) * bg), axis=1)
    squared = size + tl.sum(b_n * ((2.0 * s) * acc), axis=1)

    if SINGLE_PART:
        _finish_rows(
            squared, size, out_ptr, w_ptr, a_ptr, b_ptr, pid_m * BLOCK_M, d_out, d_in, r, s,
            stride_wm, stride_wk, stride_ar, stride_ak, stride_bm, stride_br,
            AMPLIFICATION_LIMIT, DENSE_FALLBACK, BLOCK_M, BLOCK_K, BLOCK_R, DENSE_ROWS, DENSE_UPCAST,
        )
    else:
        num_parts = num_n * num_k
        part = pid_k * num_n + pid_n
        tl.store(partial_ptr + part * stride_pn + offs_m, squared, mask=mask_m)
        tl.store(partial_ptr + stride_pt + part * stride_pn + offs_m, size, mask=mask_m)
        tl.debug_barrier()  # every thread's stores precede the release below
        if tl.atomic_add(counter_ptr + pid_m, 1, sem="acq_rel") == num_parts - 1:
            tl.debug_barrier()  # the acquire above precedes every thread's loads of the partials
            _finish_rows(
                column_sums(partial_ptr, stride_pn, num_parts, offs_m, mask_m, BLOCK_P, BLOCK_M),
                column_sums(partial_ptr + stride_pt, stride_pn, num_parts, offs_m, mask_m, BLOCK_P, BLOCK_M),
                out_ptr, w_ptr, a_ptr, b_ptr, pid_m * BLOCK_M, d_out, d_in, r, s,
                stride_wm, stride_wk, stride_ar, stride_ak, stride_bm, stride_br,
                AMPLIFICATION_LIMIT, DENSE_FALLBACK, BLOCK_M, BLOCK_K, BLOCK_R, DENSE_ROWS, DENSE_UPCAST,
            )


@dataclasses.dataclass(frozen=True)
class NormConfig:
    """Tile shape and launch options of ``_norm_kernel``.

    ``split_k`` cuts ``d_in`` into that many slices of whole ``block_k`` steps (more programs for
    small ``d_out·r``); ``block_r`` is the inner tile of ``B G`` (``None``: up to 64).
    """

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    split_k: int = 1
    block_r: int | None = None
    round_robin_squares: bool = True
    squares_own_load: bool = False
    dense_fallback: bool = True  # False only in tests: the factored sum even where it cancelled


def _pow2_at_least(n: int, low: int = 16) -> int:
    return max(low, triton.next_power_of_2(max(n, 1)))


def norm_config(d_out: int, d_in: int, r: int, device: torch.device) -> NormConfig:
    """Heuristic tile shape: 128-row tiles as wide as ``r`` (up to 128 columns), and ``d_in`` split
    until there are two programs per SM (fewer waves left half-empty), keeping 8+ K steps each."""
    block_n = min(128, _pow2_at_least(r))
    if device.type != "cuda":  # interpreter: few, small programs
        return NormConfig(min(32, _pow2_at_least(d_out)), min(32, block_n), 32, 4, 1)
    block_m, block_k = 128, 64
    tiles = triton.cdiv(d_out, block_m) * triton.cdiv(r, block_n)
    split = 1
    while tiles * split < 2 * num_sms(device, default=4) and triton.cdiv(d_in, block_k) >= 16 * split:
        split *= 2
    num_warps = 8 if block_n >= 128 else 4
    return NormConfig(block_m, block_n, block_k, num_warps, 3 if block_n >= 128 else 4, split_k=split)


def _needs_upcast(a: torch.dtype, b: torch.dtype, interpreting: bool) -> bool:
    """Whether ``mma`` must take float32 operands: mixed or float32 inputs, or bf16 when interpreting."""
    native = a == b and a in (torch.float16, torch.bfloat16)
    return not native or (interpreting and a == torch.bfloat16)


def _gram_partials(lora_A: torch.Tensor, upcast: bool, n_sm: int, interpreting: bool, max_splits: int) -> torch.Tensor:
    """``[splits, r, r]`` float32 partial sums of ``A Aᵀ``.

    16-bit ``A`` on CUDA: one cuBLAS product with float32 output (exact products, fp32 sums), where
    this PyTorch has ``mm.dtype``. Otherwise ``_gram_kernel``, split over ``d_in``.
    """
    if not interpreting and reference.mm_to_float32_in_place(lora_A, lora_A.T):
        return reference.matmul_float32(lora_A, lora_A.T).unsqueeze(0)
    r, d_in = lora_A.shape
    block_g = 16 if r <= 16 else (32 if r <= 32 or interpreting else 64)
    block_k = 32 if interpreting else 64
    tiles = triton.cdiv(r, block_g)
    upper_tiles = tiles * (tiles + 1) // 2
    k_steps = triton.cdiv(d_in, block_k)
    splits = max(1, min(triton.cdiv(2 * n_sm, upper_tiles), triton.cdiv(k_steps, 4), max_splits))
    k_per_split = triton.cdiv(k_steps, splits) * block_k
    splits = triton.cdiv(d_in, k_per_split)
    partial = torch.empty((splits, r, r), dtype=torch.float32, device=lora_A.device)
    launchable(_gram_kernel, lora_A)[(tiles, tiles, splits)](
        lora_A,
        partial,
        r,
        d_in,
        k_per_split,
        lora_A.stride(0),
        lora_A.stride(1),
        partial.stride(0),
        partial.stride(1),
        partial.stride(2),
        BLOCK_G=block_g,
        BLOCK_K=block_k,
        EVEN_K=d_in % block_k == 0,
        UPCAST=upcast,
        num_warps=4,
        num_stages=1 if interpreting else 3,
    )
    return partial


def fused_weight_norm(
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    fan_in_fan_out: bool,
    *,
    config: NormConfig | None = None,
) -> torch.Tensor:
    """Row norms of ``W + s·B·A`` (float32 ``[d_out]``) in one pass over ``W`` (``_norm_kernel``), as
    :func:`reference.weight_norm`.

    ``weight`` is read in its stored layout (``[d_in, d_out]`` when ``fan_in_fan_out``). float64
    inputs, and degenerate shapes (``r == 0`` or ``d_in == 0``), go to the reference math.
    """
    if reference.norm_dtype(weight, lora_A, lora_B) != torch.float32:
        return reference.weight_norm(weight, lora_A, lora_B, scaling, fan_in_fan_out)
    d_in, d_out = weight.shape if fan_in_fan_out else weight.shape[::-1]
    r = lora_A.shape[0]
    if r == 0 or d_in == 0 or d_out == 0:
        return reference.weight_norm(weight, lora_A, lora_B, scaling, fan_in_fan_out)
    device = weight.device
    interpreting = launch.interpreting()
    cfg = config or norm_config(d_out, d_in, r, device)
    block_r = cfg.block_r or min(64, _pow2_at_least(r))
    stride_wm, stride_wk = weight.stride()[::-1] if fan_in_fan_out else weight.stride()
    upcast = _needs_upcast(weight.dtype, lora_A.dtype, interpreting)
    split_g = lora_B.dtype == torch.bfloat16

    num_n = triton.cdiv(r, cfg.block_n)
    k_per_split = triton.cdiv(triton.cdiv(d_in, cfg.block_k), cfg.split_k) * cfg.block_k
    num_parts = num_n * triton.cdiv(d_in, k_per_split)
    num_m = triton.cdiv(d_out, cfg.block_m)

    # Partial Gram sums and G stay within about d_out·r floats: at most d_out // r - 1 splits.
    gram_partial = _gram_partials(
        lora_A, _needs_upcast(lora_A.dtype, lora_A.dtype, interpreting), num_sms(device, default=4), interpreting,
        max_splits=max(1, min(64, d_out // r - 1)),
    )
    gram_splits = gram_partial.shape[0]
    finish_g = split_g or gram_splits > 1
    if split_g:
        gram = torch.empty((r, r), dtype=torch.bfloat16, device=device)
        gram_lo = torch.empty_like(gram)
    elif finish_g:
        gram, gram_lo = torch.empty((r, r), dtype=torch.float32, device=device), None
    else:
        gram, gram_lo = gram_partial[0], None
    single_part = num_parts == 1
    # Unused (and left unset) with a single part; never empty, so that every pointer is a real one.
    counters = torch.empty((num_m,), dtype=torch.int32, device=device)
    if finish_g or not single_part:
        block_s = min(32, triton.next_power_of_2(gram_splits))
        block = max(32, 4096 // block_s)
        n_counters = 0 if single_part else num_m
        grid = (max(triton.cdiv(r * r if finish_g else 0, block), triton.cdiv(n_counters, block)),)
        g_args = (gram_partial, gram, gram_lo) if finish_g else (None, None, None)  # no aliased arguments
        launchable(_prepare_kernel, counters)[grid](
            *g_args, counters, r * r, gram_splits, n_counters, gram_partial.stride(0),
            FINISH_G=finish_g, SPLIT_BF16=split_g, BLOCK_S=block_s, BLOCK=block, num_warps=4,
        )

    out = torch.empty((d_out,), dtype=torch.float32, device=device)
    partial = out.new_empty((2, num_parts, 1 if single_part else d_out))  # unused with a single part
    grid = (num_m * num_parts,)
    log.debug("weight_norm d_out=%d d_in=%d r=%d config=%s grid=%s", d_out, d_in, r, cfg, grid)
    launchable(_norm_kernel, weight)[grid](
        weight,
        lora_A,
        lora_B,
        gram,
        gram_lo,
        partial,
        counters,
        out,
        d_out,
        d_in,
        r,
        k_per_split,
        float(scaling),
        stride_wm,
        stride_wk,
        lora_A.stride(0),
        lora_A.stride(1),
        lora_B.stride(0),
        lora_B.stride(1),
        gram.stride(0),
        gram.stride(1),
        partial.stride(0),
        partial.stride(1),
        AMPLIFICATION_LIMIT=reference.AMPLIFICATION_LIMIT,
        DENSE_FALLBACK=cfg.dense_fallback,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        BLOCK_R=block_r,
        BLOCK_P=min(32, triton.next_power_of_2(num_parts)),
        DENSE_ROWS=min(16, cfg.block_m),
        EVEN_K=d_in % cfg.block_k == 0,
        UPCAST=upcast or (split_g and interpreting),
        DENSE_UPCAST=_needs_upcast(lora_B.dtype, lora_A.dtype, interpreting),
        SPLIT_G_BF16=split_g,
        ROUND_ROBIN_SQUARES=cfg.round_robin_squares,
        SQUARES_OWN_LOAD=cfg.squares_own_load,
        SINGLE_PART=single_part,
        num_warps=cfg.num_warps,
        num_stages=1 if interpreting else cfg.num_stages,
    )
    return out


# --------------------------------------------------------------------------------------------------
# The norm from cuBLAS GEMMs: U = W·Aᵀ and G = A·Aᵀ with float32 outputs, then one Triton pass over rows
# --------------------------------------------------------------------------------------------------


@triton.jit
def _norm_rows_kernel(
    u_ptr, bg_ptr, w_sq_ptr, out_ptr, w_ptr, a_ptr, b_ptr, d_out, d_in, r, scaling,
    stride_um, stride_ur, stride_bgm, stride_bgr, stride_wm, stride_wk, stride_ar, stride_ak, stride_bm, stride_br,
    AMPLIFICATION_LIMIT: tl.constexpr, DENSE_FALLBACK: tl.constexpr, BG_HALVES: tl.constexpr,
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
        AMPLIFICATION_LIMIT, DENSE_FALLBACK, BLOCK_M, BLOCK_K, BLOCK_R, DENSE_ROWS, DENSE_UPCAST,
    )


def _times_gram(lora_B: torch.Tensor, gram: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``(B·G, halves)`` in float32. For a bf16 ``B``, one GEMM against ``[G_hi | G_lo]``
    (``G = G_hi + G_lo``, both bf16: about 16 bits of ``G``; ``B`` exact) on the tensor cores on CUDA,
    so the result is ``[d_out, 2r]`` and ``halves`` is True; otherwise a float32 GEMM."""
    if lora_B.dtype == torch.bfloat16:
        g_hi = gram.to(torch.bfloat16)
        halves = torch.cat([g_hi, (gram - g_hi.float()).to(torch.bfloat16)], dim=1)  # [r, 2r]
        return reference.matmul_float32(lora_B, halves), True
    return lora_B.float() @ gram, False


def weight_norm(
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    fan_in_fan_out: bool,
    row_squares: torch.Tensor | None = None,
    *,
    dense_fallback: bool = True,
) -> torch.Tensor:
    """Row norms of ``W + s·B·A`` (float32 ``[d_out]``), as :func:`reference.weight_norm`: three GEMMs
    (``U = W Aᵀ``, ``G = A Aᵀ``, ``B G``; float32 outputs, cuBLAS on CUDA) and ``_norm_rows_kernel``.

    ``row_squares`` is ``||W_i||²`` in float32 when the caller has it (a frozen ``W``'s is computed
    once, :mod:`dora_fx.norm_cache`); otherwise it is computed here, one more read of ``W``.
    ``dense_fallback=False`` (tests only) keeps the factored value of cancelled rows. float64 inputs
    and empty shapes go to the reference math.
    """
    if reference.norm_dtype(weight, lora_A, lora_B) != torch.float32:
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
        AMPLIFICATION_LIMIT=reference.AMPLIFICATION_LIMIT, DENSE_FALLBACK=dense_fallback, BG_HALVES=halves,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=min(32, _pow2_at_least(r)), BLOCK_K=32 if interpreting else 64,
        DENSE_ROWS=16, DENSE_UPCAST=_needs_upcast(lora_B.dtype, lora_A.dtype, interpreting),
        num_warps=4, num_stages=1,
    )
    return out
