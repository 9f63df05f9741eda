"""Triton kernels for the factored DoRA weight norm (DESIGN.md §3).

``||W_i + s(BA)_i||² = ||W_i||² + 2s<B_i, U_i> + s²<B_i, (B G)_i>`` with ``U = W Aᵀ [d_out, r]`` and
``G = A Aᵀ [r, r]``; the ``[d_out, d_in]`` product is never formed.

Launch plan (``weight_norm``):

1. ``G = A Aᵀ`` in float32: cuBLAS with float32 output for 16-bit ``A`` on CUDA, else
   ``_gram_kernel`` (split over ``d_in``; only the upper triangle of tiles is computed).
   ``_gram_finish_kernel`` sums the splits and, for a bf16 ``B``, stores ``G`` as two bf16 halves.
2. ``_norm_partial_kernel``: one pass over ``W``. A program owns ``BLOCK_M`` rows, ``BLOCK_N``
   columns of ``U`` and a slice of ``d_in`` (split-K when ``d_out·r`` alone gives too few programs;
   the cross term ``<B_i, U_i>`` is linear in ``U``, so slices add up). Its K loop accumulates ``U``
   with ``tl.dot`` (fp32 accumulation) and, for a round-robin share of the K steps, the row sums of
   ``W²`` from the same tile, so the column programs of one row block split that work evenly and
   ``W`` is read from HBM once. Its epilogue adds ``<B_i, 2s·U_i + s²·(B G)_i>`` over its columns
   (the ``B G`` term once, from the first slice) and writes one partial squared norm per row.
3. ``_norm_finalize_kernel``: sums the partials of each row, clamps at zero, takes the square root
   (skipped when a single program per row block already finished the job).

Triton 3.6 on an H200 gave run-to-run differences (a race) in two versions of the main kernel: one
that split ``G`` into bf16 halves in registers inside the epilogue loop, and one with 128×256 tiles.
The halves therefore come from memory (``_gram_finish_kernel``), and the tiles stay 128×128. The
CUDA test ``test_cuda_run_to_run_identical`` guards this.

Transient memory: the partial Gram sums, ``G`` and the ``[partials, d_out]`` squared norms, all
float32; ``U`` never leaves registers. The Gram split is capped so that the total stays under
``2·d_out·r·4`` bytes whenever ``r`` is well below ``d_out``.
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
from dora_fx.kernels.reductions import column_sums

log = logging.getLogger(__name__)


@triton.jit
def _mma(a, b, acc, UPCAST: tl.constexpr):
    """``acc + a @ b`` with fp32 accumulation.

    ``UPCAST`` runs the product on float32 operands with ``tf32x3`` (about fp32 accuracy); it is used
    for float32 or mixed-dtype inputs, and for bf16 under the Triton interpreter, whose ``tl.dot``
    multiplies the raw bf16 bit patterns as integers (bf16 products are exact in fp32, so the
    upcast changes nothing but the accumulation order).
    """
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="tf32x3")
    return tl.dot(a, b, acc)


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
        acc = _mma(ai, aj, acc, UPCAST)
        ai_ptrs += BLOCK_K * stride_ak
        aj_ptrs += BLOCK_K * stride_ak
    base = partial_ptr + pid_s * stride_ps
    mask = mask_i[:, None] & mask_j[None, :]
    tl.store(base + offs_i[:, None] * stride_pi + offs_j[None, :] * stride_pj, acc, mask=mask)
    if pid_i != pid_j:
        tl.store(base + offs_j[None, :] * stride_pi + offs_i[:, None] * stride_pj, acc, mask=mask)


@triton.jit
def _gram_finish_kernel(
    partial_ptr,
    g_ptr,
    g_lo_ptr,
    n_elements,
    splits,
    stride_ps,
    SPLIT_BF16: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """``G = Σ_s P[s]`` over the flattened ``r × r`` Gram matrix, in float32.

    With ``SPLIT_BF16`` it stores ``G_hi = bf16(G)`` to ``g_ptr`` and ``G_lo = bf16(G - G_hi)`` to
    ``g_lo_ptr`` (``G_hi + G_lo`` carries about 16 bits of ``G``), else ``G`` itself to ``g_ptr``.
    """
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
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
def _norm_partial_kernel(
    w_ptr,
    a_ptr,
    b_ptr,
    g_ptr,
    g_lo_ptr,
    partial_ptr,
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
    stride_pn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    EVEN_K: tl.constexpr,
    UPCAST: tl.constexpr,
    SPLIT_G_BF16: tl.constexpr,
    ROUND_ROBIN_SQUARES: tl.constexpr,
    SQUARES_OWN_LOAD: tl.constexpr,
    FINAL: tl.constexpr,
):
    """Partial squared row norms of ``W + s·B·A`` for a tile of rows ``M``, LoRA columns ``N`` and
    a slice ``K`` of ``d_in``.

    With ``U_K = W[:, K] A[:, K]ᵀ`` accumulated by ``tl.dot`` (``W`` read in its stored layout
    through ``stride_wm``/``stride_wk``), the program writes, for each row ``i`` of its block,

        P[(k, n), i] = Σ_{K steps t of its share} W[i, t]²  +  Σ_{j ∈ N} B[i, j]·(2s·U_K[i, j] + [k = 0]·s²·(B G)[i, j])

    Each of the ``cdiv(r, BLOCK_N)`` column programs of a ``(M, K)`` tile squares every
    ``num_n``-th K step of ``W`` (``ROUND_ROBIN_SQUARES``; otherwise column block 0 squares all of
    them), so the sum of ``P`` over ``(k, n)`` is ``||W_i + s(BA)_i||²``. ``(B G)[:, N]`` runs on
    tensor cores: with ``SPLIT_G_BF16``, ``G = G_hi + G_lo`` (``g_ptr``, ``g_lo_ptr``, both bf16, about
    16 bits of ``G``) against the bf16 ``B``; otherwise fp32 ``G`` at ``g_ptr`` in a ``tf32x3`` product.
    ``SQUARES_OWN_LOAD`` squares a second load of the ``W`` tile instead of the one fed to ``tl.dot``.
    ``FINAL`` (a single partial per row) stores ``sqrt(max(P, 0))`` directly.
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
        acc = _mma(w, a, acc, UPCAST)
        if ROUND_ROBIN_SQUARES:
            if it % num_n == pid_n:
                w_sq += _row_squares(w, w_ptrs, w_mask, SQUARES_OWN_LOAD)
        else:
            w_sq += _row_squares(w, w_ptrs, w_mask, SQUARES_OWN_LOAD)
        w_ptrs += BLOCK_K * stride_wk
        a_ptrs += BLOCK_K * stride_ak
    if not ROUND_ROBIN_SQUARES:
        w_sq = tl.where(pid_n == 0, w_sq, 0.0)

    # Epilogue: 2s·U_K, plus s²·(B G)[M, N] = s²·Σ_j B[M, j] G[j, N] once per (M, N) tile.
    s = tl.cast(scaling, tl.float32)  # fp64 when Inductor launches the kernel
    contrib = (2.0 * s) * acc
    if pid_k == 0:
        bg = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        offs_r = tl.arange(0, BLOCK_R)
        for j in range(0, r, BLOCK_R):
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
                bg = _mma(b, g, bg, UPCAST)
                bg = _mma(b, tl.load(g_lo_ptr + g_offs, mask=g_mask, other=0.0), bg, UPCAST)
            else:
                bg = tl.dot(b.to(tl.float32), g, bg, input_precision="tf32x3")
        contrib += (s * s) * bg
    b_n = tl.load(
        b_ptr + rows[:, None] * stride_bm + offs_n[None, :] * stride_br,
        mask=mask_m[:, None] & mask_n[None, :],
        other=0.0,
    ).to(tl.float32)
    squared = w_sq + tl.sum(b_n * contrib, axis=1)
    if FINAL:
        squared = tl.sqrt_rn(tl.maximum(squared, 0.0))
    tl.store(partial_ptr + (pid_k * num_n + pid_n) * stride_pn + offs_m, squared, mask=mask_m)


@triton.jit
def _norm_finalize_kernel(partial_ptr, out_ptr, d_out, num_parts, stride_pn, BLOCK_P: tl.constexpr, BLOCK: tl.constexpr):
    """``out[i] = sqrt(max(Σ_n P[n, i], 0))``: the clamp absorbs cancellation below zero."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < d_out
    total = column_sums(partial_ptr, stride_pn, num_parts, offs, mask, BLOCK_P, BLOCK)
    tl.store(out_ptr + offs, tl.sqrt_rn(tl.maximum(total, 0.0)), mask=mask)


@dataclasses.dataclass(frozen=True)
class NormConfig:
    """Tile shape and launch options of ``_norm_partial_kernel``.

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
    """Whether ``_mma`` must take float32 operands: mixed or float32 inputs, or bf16 when interpreting."""
    native = a == b and a in (torch.float16, torch.bfloat16)
    return not native or (interpreting and a == torch.bfloat16)


_MM_OUT_DTYPE_WORKS = True  # ``torch.mm(..., out_dtype=torch.float32)`` (cuBLAS, CUDA only)


def _gram_partials(lora_A: torch.Tensor, upcast: bool, n_sm: int, interpreting: bool, max_splits: int) -> torch.Tensor:
    """``[splits, r, r]`` float32 partial sums of ``A Aᵀ``.

    16-bit ``A`` on CUDA: one cuBLAS product with float32 output (exact products, fp32 sums), where
    this PyTorch has ``torch.mm(..., out_dtype=)``. Otherwise ``_gram_kernel``, split over ``d_in``.
    """
    global _MM_OUT_DTYPE_WORKS
    if _MM_OUT_DTYPE_WORKS and lora_A.is_cuda and not interpreting and lora_A.dtype in (torch.float16, torch.bfloat16):
        try:
            return torch.mm(lora_A, lora_A.T, out_dtype=torch.float32).unsqueeze(0)
        except (TypeError, RuntimeError, NotImplementedError) as exc:
            _MM_OUT_DTYPE_WORKS = False
            log.info("torch.mm(out_dtype=float32) unavailable (%s); using _gram_kernel", exc)
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


def _gram(
    lora_A: torch.Tensor, upcast: bool, split_bf16: bool, n_sm: int, interpreting: bool, max_splits: int = 64
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``G = A Aᵀ``, finished by ``_gram_finish_kernel``: ``(G_hi, G_lo)`` in bf16 when ``split_bf16``,
    else ``(G, None)`` in float32. At most ``max_splits`` partial sums are held at once."""
    partial = _gram_partials(lora_A, upcast, n_sm, interpreting, max_splits)
    splits, r, _ = partial.shape
    device = lora_A.device
    if split_bf16:
        gram = torch.empty((r, r), dtype=torch.bfloat16, device=device)
        gram_lo = torch.empty_like(gram)
    else:
        if splits == 1:
            return partial[0], None
        gram, gram_lo = torch.empty((r, r), dtype=torch.float32, device=device), None
    block_s = min(32, triton.next_power_of_2(splits))
    block = max(32, 4096 // block_s)
    launchable(_gram_finish_kernel, partial)[(triton.cdiv(r * r, block),)](
        partial, gram, gram_lo, r * r, splits, partial.stride(0),
        SPLIT_BF16=split_bf16, BLOCK_S=block_s, BLOCK=block, num_warps=4,
    )
    return gram, gram_lo


def weight_norm(
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    fan_in_fan_out: bool,
    *,
    config: NormConfig | None = None,
) -> torch.Tensor:
    """Row norms of ``W + s·B·A`` (float32 ``[d_out]``), as :func:`reference.weight_norm`.

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
    # Partial Gram sums and G stay within about d_out·r floats: at most d_out // r - 1 splits.
    gram, gram_lo = _gram(
        lora_A, _needs_upcast(lora_A.dtype, lora_A.dtype, interpreting), split_g, num_sms(device, default=4), interpreting,
        max_splits=min(64, d_out // r - 1),
    )

    num_n = triton.cdiv(r, cfg.block_n)
    k_per_split = triton.cdiv(triton.cdiv(d_in, cfg.block_k), cfg.split_k) * cfg.block_k
    num_k = triton.cdiv(d_in, k_per_split)
    out = torch.empty((d_out,), dtype=torch.float32, device=device)
    num_parts = num_n * num_k
    partial = out.view(1, d_out) if num_parts == 1 else torch.empty((num_parts, d_out), dtype=torch.float32, device=device)
    grid = (triton.cdiv(d_out, cfg.block_m) * num_parts,)
    log.debug("weight_norm d_out=%d d_in=%d r=%d config=%s grid=%s", d_out, d_in, r, cfg, grid)
    launchable(_norm_partial_kernel, weight)[grid](
        weight,
        lora_A,
        lora_B,
        gram,
        gram_lo,
        partial,
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
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        BLOCK_R=block_r,
        EVEN_K=d_in % cfg.block_k == 0,
        UPCAST=upcast or (split_g and interpreting),
        SPLIT_G_BF16=split_g,
        ROUND_ROBIN_SQUARES=cfg.round_robin_squares,
        SQUARES_OWN_LOAD=cfg.squares_own_load,
        FINAL=num_parts == 1,
        num_warps=cfg.num_warps,
        num_stages=1 if interpreting else cfg.num_stages,
    )
    if num_parts > 1:
        block_p = min(32, triton.next_power_of_2(num_parts))
        block = max(32, 2048 // block_p)
        launchable(_norm_finalize_kernel, partial)[(triton.cdiv(d_out, block),)](
            partial, out, d_out, num_parts, partial.stride(0), BLOCK_P=block_p, BLOCK=block, num_warps=4
        )
    return out
