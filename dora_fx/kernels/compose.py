"""Triton kernels for the fused DoRA composition and its backward (DESIGN.md §4).

Notation: ``g = m / norm`` per feature (column), ``s`` the LoRA scaling, ``base`` the base-layer
output without bias (``result - bias`` when PEFT reuses the base layer's output), ``d = dL/dout``.

- ``_compose_kernel``: ``out = result + (g - 1)·base + g·s·lora``, one read of every input, one
  write, float32 math and one rounding; in training also ``adapted = base + s·lora`` (second write),
  the one activation the backward needs (``∂out/∂m = adapted / norm``), so that neither ``result``
  nor ``lora`` has to be kept for it.
- ``_compose_backward_kernel``: one pass over ``d`` and ``adapted`` writes ``grad_main`` and
  ``grad_lora`` and, per block of rows, the column sums ``Σ_rows d·adapted`` into a float32
  ``[row_blocks, N]`` buffer that ``_column_sum_kernel`` reduces and divides by ``norm`` (no atomics),
  or by ``m`` when the saved tensor is the output ``g·adapted``.
- ``_zero_magnitude_grad_kernel``: the magnitude's gradient from the output, completed at the
  features with ``m = 0``, where the output cannot give ``adapted`` back; programs without such
  features only copy theirs.

Inputs are ``[..., N]``; leading dimensions are flattened into rows addressed with int64 offsets
through a row stride, so row-strided views need no copy.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import torch
import triton
import triton.language as tl

from dora_fx import dtypes
from dora_fx.kernels import launch, reference
from dora_fx.kernels.launch import launchable, num_sms
from dora_fx.kernels.reductions import column_sums, mma, mma_upcast

log = logging.getLogger(__name__)


@triton.jit
def _column_factors(m_ptr, norm_ptr, cols, mask_n):
    """``g = m / norm`` and ``g - 1 = (m - norm) / norm`` (no cancellation when ``m ≈ norm``),
    correctly rounded (``div_rn``, as PyTorch divides; Triton's ``/`` is an approximate division)."""
    m = tl.load(m_ptr + cols, mask=mask_n, other=1.0).to(tl.float32)
    n = tl.load(norm_ptr + cols, mask=mask_n, other=1.0).to(tl.float32)
    return tl.div_rn(m, n), tl.div_rn(m - n, n)


@triton.jit
def _compose_kernel(
    result_ptr,
    base_ptr,
    bias_ptr,
    lora_ptr,
    m_ptr,
    norm_ptr,
    out_ptr,
    adapted_ptr,
    n_rows,
    n_cols,
    scaling,
    stride_result,
    stride_base,
    stride_lora,
    stride_out,
    stride_adapted,
    HAS_BASE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    EMIT_ADAPTED: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """``out = result + (g - 1)·base + (g·s)·lora`` on a ``[BLOCK_T, BLOCK_N]`` tile, in float32.

    ``base`` is read from ``base_ptr`` when ``HAS_BASE``, else it is ``result - bias`` (``result``
    without a bias). With ``EMIT_ADAPTED`` the tile of ``adapted = base + s·lora`` is written too.
    Each value is rounded once, to its destination's dtype, on the store.
    """
    pid = tl.program_id(0)
    num_col_blocks = tl.cdiv(n_cols, BLOCK_N)
    pid_t = pid // num_col_blocks
    pid_n = pid % num_col_blocks
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = (pid_t * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    mask_n = cols < n_cols
    mask = (rows < n_rows)[:, None] & mask_n[None, :]

    g, g_minus_1 = _column_factors(m_ptr, norm_ptr, cols, mask_n)
    res = tl.load(result_ptr + rows[:, None] * stride_result + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    lora = tl.load(lora_ptr + rows[:, None] * stride_lora + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_BASE:
        base = tl.load(base_ptr + rows[:, None] * stride_base + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    elif HAS_BIAS:
        base = res - tl.load(bias_ptr + cols, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    else:
        base = res
    # Inductor passes Python floats to user kernels as fp64 scalars: compute in fp32 all the same.
    s = tl.cast(scaling, tl.float32)
    out = res + g_minus_1[None, :] * base + (g * s)[None, :] * lora
    tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], out, mask=mask)
    if EMIT_ADAPTED:
        tl.store(adapted_ptr + rows[:, None] * stride_adapted + cols[None, :], base + s * lora, mask=mask)


@triton.jit
def _compose_backward_kernel(
    grad_ptr,
    adapted_ptr,
    m_ptr,
    norm_ptr,
    grad_main_ptr,
    grad_lora_ptr,
    partial_ptr,
    n_rows,
    n_cols,
    rows_per_program,
    scaling,
    stride_grad,
    stride_adapted,
    stride_grad_main,
    stride_grad_lora,
    stride_partial,
    BASE_GIVEN: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Gradients of ``out = result + (g - 1)·base + g·s·lora`` for a ``rows_per_program × BLOCK_N`` strip.

    - ``grad_main = g·d`` when ``result`` stands in for the base (``BASE_GIVEN`` false), else ``(g - 1)·d``;
    - ``grad_lora = (g·s)·d``;
    - ``P[pid_t, j] = Σ_{rows of the strip} d·adapted`` (``adapted = base + s·lora``, saved by the
      forward); ``grad_magnitude = Σ_t P[t] / norm`` afterwards.
    """
    pid_n = tl.program_id(0)
    pid_t = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = cols < n_cols
    g, g_minus_1 = _column_factors(m_ptr, norm_ptr, cols, mask_n)
    if BASE_GIVEN:
        main_factor = g_minus_1
    else:
        main_factor = g
    lora_factor = g * tl.cast(scaling, tl.float32)  # fp64 when Inductor launches the kernel

    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    row_start = pid_t * rows_per_program
    for t in range(row_start, tl.minimum(row_start + rows_per_program, n_rows), BLOCK_T):
        rows = (t + tl.arange(0, BLOCK_T)).to(tl.int64)
        mask = (rows < n_rows)[:, None] & mask_n[None, :]
        d = tl.load(grad_ptr + rows[:, None] * stride_grad + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        adapted = tl.load(adapted_ptr + rows[:, None] * stride_adapted + cols[None, :], mask=mask, other=0.0)
        tl.store(grad_main_ptr + rows[:, None] * stride_grad_main + cols[None, :], main_factor[None, :] * d, mask=mask)
        tl.store(grad_lora_ptr + rows[:, None] * stride_grad_lora + cols[None, :], lora_factor[None, :] * d, mask=mask)
        acc += tl.where(mask, d * adapted.to(tl.float32), 0.0)
    tl.store(partial_ptr + pid_t * stride_partial + cols, tl.sum(acc, axis=0), mask=mask_n)


@triton.jit
def _column_sum_kernel(
    partial_ptr, divisor_ptr, out_ptr, n_parts, n_cols, stride_partial, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr
):
    """``out[j] = (Σ_t P[t, j]) / divisor[j]`` in float32, rounded once to ``out``'s dtype."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    total = column_sums(partial_ptr, stride_partial, n_parts, cols, mask, BLOCK_P, BLOCK_N)
    n = tl.load(divisor_ptr + cols, mask=mask, other=1.0).to(tl.float32)
    tl.store(out_ptr + cols, tl.div_rn(total, n), mask=mask)


@dataclasses.dataclass(frozen=True)
class ComposeConfig:
    """Tile of the compose kernels: ``block_t`` rows × ``block_n`` features, ``num_warps`` warps."""

    block_t: int
    block_n: int
    num_warps: int
    programs_per_sm: int = 2  # backward: row strips are sized so that about this many programs run per SM


def compose_config(n_rows: int, n_cols: int, device: torch.device) -> ComposeConfig:
    """About 4096 elements per tile on the GPU (16-byte vectors along the features); bigger tiles
    and fewer programs under the interpreter, whose cost is per program and per operation."""
    if device.type != "cuda":
        block_n = min(128, triton.next_power_of_2(max(n_cols, 1)))
        return ComposeConfig(min(64, triton.next_power_of_2(max(n_rows, 1))), block_n, 4)
    block_n = min(256, triton.next_power_of_2(max(n_cols, 1)))
    return ComposeConfig(max(1, 4096 // block_n), block_n, 4)


def _rows(x: torch.Tensor, n_rows: int, n_cols: int) -> torch.Tensor:
    """A ``[n_rows, n_cols]`` view of ``x`` with unit feature stride (a copy only when none exists)."""
    x2 = x.reshape(n_rows, n_cols)
    return x2 if x2.stride(1) == 1 or n_cols == 1 else x2.contiguous()


def _output_like(like: torch.Tensor, dtype: torch.dtype, n_rows: int, n_cols: int):
    """``torch.empty_like(like, dtype=dtype)`` (the fake op's layout) and a ``[rows, N]`` view to write.

    When ``like`` is not contiguous the kernel writes a contiguous buffer that is copied over."""
    out = torch.empty_like(like, dtype=dtype)
    if out.is_contiguous():
        return out, out.view(n_rows, n_cols)
    return out, torch.empty((n_rows, n_cols), dtype=dtype, device=like.device)


def _finish(out: torch.Tensor, out2: torch.Tensor) -> torch.Tensor:
    """``out``, with the kernel's separate buffer copied in when it wrote one (a fake-tensor-safe test:
    ``out2`` is then not a view of ``out``)."""
    if out2._base is not out and out.numel():
        out.copy_(out2.view(out.shape))
    return out


def _vector(v: torch.Tensor | None) -> torch.Tensor | None:
    return None if v is None else v.contiguous()


def _uses_float64(*tensors: torch.Tensor | None) -> bool:
    return any(t is not None and t.dtype == torch.float64 for t in tensors)


def _launch_compose(result, base, bias, lora, magnitude, norm, scaling, config, emit_adapted):
    """``(out, adapted or None)``: one launch of ``_compose_kernel``."""
    n_cols = result.shape[-1]
    n_rows = result.numel() // n_cols if n_cols else 0
    dtype = dtypes.compose_dtype(result, base, lora, magnitude)
    out, out2 = _output_like(result, dtype, n_rows, n_cols)
    adapted, adapted2 = _output_like(result, dtype, n_rows, n_cols) if emit_adapted else (None, None)
    if out.numel() == 0:
        return out, adapted
    cfg = config or compose_config(n_rows, n_cols, result.device)
    result2 = _rows(result, n_rows, n_cols)
    lora2 = _rows(lora, n_rows, n_cols)
    base2 = None if base is None else _rows(base, n_rows, n_cols)
    grid = (triton.cdiv(n_rows, cfg.block_t) * triton.cdiv(n_cols, cfg.block_n),)
    launchable(_compose_kernel, result)[grid](
        result2,
        base2,
        _vector(bias),
        lora2,
        _vector(magnitude),
        _vector(norm),
        out2,
        adapted2,
        n_rows,
        n_cols,
        float(scaling),
        result2.stride(0),
        0 if base2 is None else base2.stride(0),
        lora2.stride(0),
        out2.stride(0),
        0 if adapted2 is None else adapted2.stride(0),
        HAS_BASE=base is not None,
        HAS_BIAS=bias is not None,
        EMIT_ADAPTED=emit_adapted,
        BLOCK_T=cfg.block_t,
        BLOCK_N=cfg.block_n,
        num_warps=cfg.num_warps,
    )
    return _finish(out, out2), None if adapted is None else _finish(adapted, adapted2)


def compose(
    result: torch.Tensor,
    base: torch.Tensor | None,
    bias: torch.Tensor | None,
    lora: torch.Tensor,
    magnitude: torch.Tensor,
    norm: torch.Tensor,
    scaling: float,
    *,
    config: ComposeConfig | None = None,
) -> torch.Tensor:
    """``result + (g - 1)·base + g·s·lora`` (``base = result - bias`` when ``None``), as :func:`reference.compose`.

    float64 inputs go to the reference math.
    """
    if _uses_float64(result, base, bias, lora, magnitude, norm):
        return reference.compose(result, base, bias, lora, magnitude, norm, scaling)
    return _launch_compose(result, base, bias, lora, magnitude, norm, scaling, config, emit_adapted=False)[0]


def compose_with_adapted(
    result: torch.Tensor,
    base: torch.Tensor | None,
    bias: torch.Tensor | None,
    lora: torch.Tensor,
    magnitude: torch.Tensor,
    norm: torch.Tensor,
    scaling: float,
    *,
    config: ComposeConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, adapted)`` as :func:`reference.compose_with_adapted`, from one read of the inputs."""
    if _uses_float64(result, base, bias, lora, magnitude, norm):
        return reference.compose_with_adapted(result, base, bias, lora, magnitude, norm, scaling)
    return _launch_compose(result, base, bias, lora, magnitude, norm, scaling, config, emit_adapted=True)


def compose_backward(
    grad_out: torch.Tensor,
    adapted: torch.Tensor,
    magnitude: torch.Tensor,
    norm: torch.Tensor,
    scaling: float,
    base_given: bool,
    main_dtype: torch.dtype,
    lora_dtype: torch.dtype,
    from_output: bool = False,
    *,
    config: ComposeConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(grad_main, grad_lora, grad_magnitude)`` as :func:`reference.compose_backward`, in one pass
    over ``grad_out`` and ``adapted`` (or the output, ``from_output``); float64 inputs go to the
    reference math."""
    if _uses_float64(grad_out, adapted, magnitude, norm):
        return reference.compose_backward(
            grad_out, adapted, magnitude, norm, scaling, base_given, main_dtype, lora_dtype, from_output
        )
    n_cols = grad_out.shape[-1]
    n_rows = grad_out.numel() // n_cols if n_cols else 0
    grad_main, grad_main2 = _output_like(grad_out, main_dtype, n_rows, n_cols)
    grad_lora, grad_lora2 = _output_like(grad_out, lora_dtype, n_rows, n_cols)
    if n_rows == 0 or n_cols == 0:
        return grad_main, grad_lora, torch.zeros_like(magnitude)
    device = grad_out.device
    cfg = config or compose_config(n_rows, n_cols, device)
    col_blocks = triton.cdiv(n_cols, cfg.block_n)
    row_tiles = triton.cdiv(n_rows, cfg.block_t)
    strips = max(1, min(row_tiles, triton.cdiv(cfg.programs_per_sm * num_sms(device, default=1), col_blocks)))
    rows_per_program = triton.cdiv(row_tiles, strips) * cfg.block_t
    strips = triton.cdiv(n_rows, rows_per_program)
    partial = torch.empty((strips, n_cols), dtype=torch.float32, device=device)

    grad2 = _rows(grad_out, n_rows, n_cols)
    adapted2 = _rows(adapted, n_rows, n_cols)
    launchable(_compose_backward_kernel, grad_out)[(col_blocks, strips)](
        grad2,
        adapted2,
        _vector(magnitude),
        _vector(norm),
        grad_main2,
        grad_lora2,
        partial,
        n_rows,
        n_cols,
        rows_per_program,
        float(scaling),
        grad2.stride(0),
        adapted2.stride(0),
        grad_main2.stride(0),
        grad_lora2.stride(0),
        partial.stride(0),
        BASE_GIVEN=base_given,
        BLOCK_T=cfg.block_t,
        BLOCK_N=cfg.block_n,
        num_warps=cfg.num_warps,
    )
    grad_magnitude = torch.empty_like(magnitude)
    block_p = min(32, triton.next_power_of_2(strips))
    block = min(max(32, 2048 // block_p), triton.next_power_of_2(n_cols))
    launchable(_column_sum_kernel, partial)[(triton.cdiv(n_cols, block),)](
        partial, _vector(magnitude if from_output else norm), grad_magnitude, strips, n_cols, partial.stride(0),
        BLOCK_P=block_p, BLOCK_N=block, num_warps=4,
    )
    return _finish(grad_main, grad_main2), _finish(grad_lora, grad_lora2), grad_magnitude


_ZERO_MAGNITUDE_BLOCK_N = 16


# Triton's dtype for each dtype a dequantized bitsandbytes weight may have.
_TRITON_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


@triton.jit
def _four_bit_tile(packed_ptr, absmax_ptr, code_ptr, element, mask, blocksize, W_DTYPE: tl.constexpr):
    """float32 values of the elements ``element`` (int64 offsets into the row-major ``W``) of a
    bitsandbytes 4-bit weight, as ``dequantize_4bit`` gives them in ``W_DTYPE``: code ``c`` from the
    high nibble of byte ``e // 2`` for even ``e``, the low one for odd, times ``absmax[e // blocksize]``
    (:class:`dora_fx.kernels.reference.FourBit`)."""
    byte = tl.load(packed_ptr + element // 2, mask=mask, other=0).to(tl.int32)
    code = tl.where(element % 2 == 0, byte >> 4, byte & 15)
    scale = tl.load(absmax_ptr + element // blocksize, mask=mask, other=0.0)
    value = tl.load(code_ptr + code, mask=mask, other=0.0) * scale
    if W_DTYPE == tl.bfloat16:
        return _rounded_to_bfloat16(value)
    return value.to(W_DTYPE).to(tl.float32)


@triton.jit
def _rounded_to_bfloat16(x):
    """Finite float32 ``x`` rounded to the nearest bfloat16, ties to even, as float32: by integer
    arithmetic on the bits, because Triton's interpreter truncates a bfloat16 cast (3.9 does)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    return bits.to(tl.float32, bitcast=True)


@triton.jit(  # unspecialized integers and pointers: one compiled form serves every layer (CompiledLaunches)
    do_not_specialize=("n_rows", "d_out", "d_in", "r", "stride_grad", "stride_x", "stride_wm", "stride_wk",
                       "stride_ar", "stride_ak", "stride_bm", "stride_br", "blocksize"),
    do_not_specialize_on_alignment=("grad_ptr", "x_ptr", "w_ptr", "a_ptr", "b_ptr", "m_ptr", "norm_ptr", "gm_ptr",
                                    "out_ptr", "absmax_ptr", "code_ptr"),
)
def _zero_magnitude_grad_kernel(
    grad_ptr, x_ptr, w_ptr, a_ptr, b_ptr, m_ptr, norm_ptr, gm_ptr, out_ptr, absmax_ptr, code_ptr, n_rows, d_out, d_in, r,
    stride_grad, stride_x, stride_wm, stride_wk, stride_ar, stride_ak, stride_bm, stride_br, blocksize, scaling,
    BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    UPCAST: tl.constexpr, FOUR_BIT: tl.constexpr, W_DTYPE: tl.constexpr,
):
    """``out[j] = Σ_t d[t, j]·((W + s·B·A)_j · x_t) / norm_j`` for the features ``j`` with ``m_j = 0``,
    the gradient from the output ``gm[j]`` for the others: the magnitude's gradient where the output
    (``g = 0``) cannot give back ``adapted = (W + s·B·A)·x``.

    A program owns ``BLOCK_N`` features and only copies ``gm`` when none of them has ``m_j = 0``, so
    the launch costs next to nothing without such features. Otherwise, tile by tile,
    ``adapted[T, N] = x[T, :]·(Wᵀ[:, N] + s·Aᵀ B[N]ᵀ)`` (float32, ``tf32x3``), never kept beyond a
    ``[BLOCK_T, BLOCK_N]`` tile, and summed against ``d``. With ``FOUR_BIT``, ``w_ptr`` holds a
    bitsandbytes 4-bit ``W``'s packed bytes, decoded tile by tile (:func:`_four_bit_tile`).
    """
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = cols < d_out
    zero = mask_n & (tl.load(m_ptr + cols, mask=mask_n, other=1.0) == 0.0)
    total = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if tl.sum(zero.to(tl.int32), axis=0) > 0:
        s = tl.cast(scaling, tl.float32)
        offs_t = tl.arange(0, BLOCK_T)
        offs_k = tl.arange(0, BLOCK_K)
        offs_r = tl.arange(0, BLOCK_R)
        for t in range(0, n_rows, BLOCK_T):
            rows = (t + offs_t).to(tl.int64)
            mask_t = rows < n_rows
            adapted = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
            for k in range(0, d_in, BLOCK_K):
                ks = (k + offs_k).to(tl.int64)
                mask_k = ks < d_in
                x = tl.load(x_ptr + rows[:, None] * stride_x + ks[None, :], mask=mask_t[:, None] & mask_k[None, :], other=0.0)
                mask_w = mask_k[:, None] & zero[None, :]
                if FOUR_BIT:
                    element = cols[None, :].to(tl.int64) * d_in + ks[:, None]  # [K, N] of the row-major W
                    w_t = _four_bit_tile(w_ptr, absmax_ptr, code_ptr, element, mask_w, blocksize, W_DTYPE)
                else:
                    w_t = tl.load(
                        w_ptr + cols[None, :] * stride_wm + ks[:, None] * stride_wk, mask=mask_w, other=0.0
                    ).to(tl.float32)  # [K, N]
                ba_t = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
                for j in range(0, r, BLOCK_R):
                    mask_r = (j + offs_r) < r
                    a_t = tl.load(
                        a_ptr + (j + offs_r)[None, :] * stride_ar + ks[:, None] * stride_ak,
                        mask=mask_k[:, None] & mask_r[None, :],
                        other=0.0,
                    )  # [K, R]
                    b_t = tl.load(
                        b_ptr + cols[None, :] * stride_bm + (j + offs_r)[:, None] * stride_br,
                        mask=mask_r[:, None] & zero[None, :],
                        other=0.0,
                    )  # [R, N]
                    ba_t = mma(a_t, b_t, ba_t, UPCAST)
                adapted = tl.dot(x.to(tl.float32), w_t + s * ba_t, adapted, input_precision="tf32x3")
            d = tl.load(grad_ptr + rows[:, None] * stride_grad + cols[None, :], mask=mask_t[:, None] & zero[None, :], other=0.0)
            total += tl.sum(d.to(tl.float32) * adapted, axis=0)
        n = tl.load(norm_ptr + cols, mask=mask_n, other=1.0).to(tl.float32)
        total = tl.div_rn(total, n)
    from_output = tl.load(gm_ptr + cols, mask=mask_n, other=0.0)
    tl.store(out_ptr + cols, tl.where(zero, total.to(from_output.dtype), from_output), mask=mask_n)


def zero_magnitude_grad(
    grad_magnitude: torch.Tensor,
    grad_out: torch.Tensor,
    lora_input: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    magnitude: torch.Tensor,
    norm: torch.Tensor,
    fan_in_fan_out: bool,
    four_bit: reference.FourBit | None = None,
) -> torch.Tensor:
    """``grad_magnitude`` with the exact gradient at the features with ``m = 0``, as
    :func:`reference.zero_magnitude_grad`, without a host synchronisation. With ``four_bit``,
    ``weight`` holds a bitsandbytes 4-bit ``W``'s packed bytes, decoded where a feature needs them.

    The training backward calls this once per layer, and at most features the kernel only copies
    ``grad_magnitude``, so the call's cost is host time: on CUDA it launches the kept compiled kernel
    (``_zero_magnitude_launches``; 54 against 119 µs a call through ``kernel[grid]`` on the H200
    machine's host)."""
    (d_out, r), d_in = lora_B.shape, lora_A.shape[1]
    out = torch.empty((d_out,), dtype=grad_magnitude.dtype, device=grad_out.device)
    grad2 = _rows(grad_out, grad_out.numel() // d_out, d_out)
    x2 = _rows(lora_input, lora_input.numel() // d_in, d_in)
    stride_wm, stride_wk = weight.stride()[::-1] if fan_in_fan_out else weight.stride()
    if four_bit is None:
        absmax, code, blocksize, w_dtype = out, out, 1, torch.float32  # absmax, code, W_DTYPE unused
    else:
        absmax, code, blocksize, w_dtype = four_bit.absmax, four_bit.code, four_bit.blocksize, four_bit.dtype
    tensors = (grad2, x2, weight, lora_A, lora_B, magnitude.contiguous(), norm.contiguous(), grad_magnitude.contiguous(),
               out, absmax, code)
    ints = (grad2.shape[0], d_out, d_in, r, grad2.stride(0), x2.stride(0), stride_wm, stride_wk,
            *lora_A.stride(), *lora_B.stride(), blocksize)
    grid = (triton.cdiv(d_out, _ZERO_MAGNITUDE_BLOCK_N), 1, 1)
    constexprs = (*_zero_magnitude_constexprs(lora_A.dtype, lora_B.dtype), four_bit is not None,
                  _TRITON_DTYPES[w_dtype])
    args = (*tensors, *ints, float(scaling), *constexprs)
    if launch.interpreting():
        _zero_magnitude_grad_kernel[grid](*args, num_warps=4)
    else:
        key = (out.device.index, *(t.dtype for t in tensors), four_bit is not None, w_dtype, launch.fits_int32(*ints))
        _zero_magnitude_launches.launch(key, grid, args, num_warps=4)
    return out


@functools.cache
def _zero_magnitude_constexprs(a_dtype: torch.dtype, b_dtype: torch.dtype) -> tuple:
    """``BLOCK_N, BLOCK_T, BLOCK_K, BLOCK_R, UPCAST`` of ``_zero_magnitude_grad_kernel``."""
    blocks = (32, 32) if launch.interpreting() else (64, 64)
    return (_ZERO_MAGNITUDE_BLOCK_N, *blocks, 16, mma_upcast(a_dtype, b_dtype))


_zero_magnitude_launches = launch.CompiledLaunches(_zero_magnitude_grad_kernel)
