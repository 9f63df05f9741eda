"""Plain-PyTorch math of the dora_fx ops: the CPU implementation and the oracle for the Triton kernels.

Notation (DESIGN.md §3, §4): frozen weight ``W [d_out, d_in]`` (stored ``[d_in, d_out]`` when
``fan_in_fan_out``), LoRA ``A [r, d_in]``, ``B [d_out, r]``, scaling ``s``, magnitude ``m [d_out]``,
``norm = ||W + s·B·A||_row`` and ``g = m / norm``.
"""

from __future__ import annotations

import dataclasses

import torch

from dora_fx.dtypes import compose_dtype, norm_dtype


def mm_to_float32_in_place(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Whether ``x @ y`` can run on its 16-bit operands with a float32 result (CUDA's ``mm.dtype``)."""
    same_16bit = x.dtype == y.dtype and x.dtype in (torch.bfloat16, torch.float16)
    return x.is_cuda and same_16bit and hasattr(torch.ops.aten.mm, "dtype")


def matmul_float32(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x @ y`` accumulated and returned in float32. On CUDA, 16-bit operands of one dtype go to the
    tensor cores as they are (exact products, fp32 sums, no float32 copies); elsewhere (and on a torch
    without that ``mm`` overload) the operands are upcast first."""
    if mm_to_float32_in_place(x, y):
        return torch.ops.aten.mm.dtype(x, y, torch.float32)
    return x.float() @ y.float()


# Rows whose factored sum amplifies rounding errors more than this get their squared norm recomputed
# densely, here and in the Triton kernel: fp32 keeps at least ``-log2(eps · limit)`` ≈ 13 bits of it.
AMPLIFICATION_LIMIT = 1024.0
# The reference recomputes at most this many rows per call (the most amplified ones): a fixed number,
# so that the math has static shapes and Inductor can trace it.
DENSE_FALLBACK_ROWS = 32


def weight_norm(
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    fan_in_fan_out: bool,
    row_squares: torch.Tensor | None = None,
) -> torch.Tensor:
    """Row norms of ``W + s·B·A`` in float32, without forming the ``[d_out, d_in]`` product.

    ``row_squares``: ``||W_i||²`` when the caller has it (:func:`dora_fx.norm_cache.row_squares`).

    ``||W_i + s(BA)_i||² = ||W_i||² + 2s<B_i, (W Aᵀ)_i> + s²<B_i, (B G)_i>`` with ``G = A Aᵀ``.
    Everything is accumulated in float32 (float64 inputs stay float64); the squared norm is clamped
    at zero before the square root because cancellation can push it slightly negative.

    Cancellation: with ``size_i = ||W_i||² + s²<B_i, (B G)_i>`` (non-negative), the terms' absolute
    values add up to ``size_i + |squared_i - size_i|``; over ``squared_i`` that is the amplification
    ``a_i`` of rounding errors. Of the rows with ``a_i > AMPLIFICATION_LIMIT``, the
    ``DENSE_FALLBACK_ROWS`` most amplified are recomputed in the dense form
    ``||W_i + s·B_i A||²`` (``r·d_in`` multiply-adds per row); further ones keep the factored value.
    """
    acc = norm_dtype(weight, lora_A, lora_B)
    w = weight.to(acc)
    a = lora_A.to(acc)
    b = lora_B.to(acc)
    w_rows = w.T if fan_in_fan_out else w  # [d_out, d_in] (a view when stored transposed)
    w_sq = w_rows.square().sum(dim=1) if row_squares is None else row_squares.to(acc)
    u = w_rows @ a.T  # [d_out, r]
    gram = a @ a.T  # [r, r]
    cross = (b * u).sum(dim=1)
    lora_sq = (b * (b @ gram)).sum(dim=1)
    size = w_sq + (scaling * scaling) * lora_sq
    squared = size + (2.0 * scaling) * cross
    squared = _dense_fallback(squared, size, w_rows, a, b, scaling)
    return squared.clamp_min(0.0).sqrt()


def cancelled_rows(squared: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """Rows to recompute densely: a positive ``size`` and a factored ``squared`` that is not positive
    (fully cancelled) or amplifies rounding errors more than :data:`AMPLIFICATION_LIMIT`. Zero rows
    (``size = 0``) and NaN sums are left as they are."""
    amplified = size + (squared - size).abs() > AMPLIFICATION_LIMIT * squared
    return (size > 0) & ((squared <= 0) | amplified)


def _dense_fallback(
    squared: torch.Tensor, size: torch.Tensor, w_rows: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float
) -> torch.Tensor:
    """``squared`` with its most amplified rows (see :func:`weight_norm`) recomputed densely.

    Static shapes throughout: a fixed number of candidate rows (``topk``), recomputed whether or not
    they need it, and written back only where they do.
    """
    flagged = cancelled_rows(squared, size)
    # Flagged rows first, the most amplified first (a row with squared <= 0 < size counts as infinite).
    amplification = torch.where(squared > 0, (size + (squared - size).abs()) / squared, torch.inf)
    score = torch.where(flagged, amplification, -1.0)
    rows = score.topk(min(DENSE_FALLBACK_ROWS, score.shape[0])).indices
    dense = (w_rows[rows] + scaling * (b[rows] @ a)).square().sum(dim=1)
    return squared.scatter(0, rows, torch.where(flagged[rows], dense, squared[rows]))


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _effective_base(
    result: torch.Tensor, base: torch.Tensor | None, bias: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """The base-layer output without bias, in ``dtype``: ``base`` when given, else ``result - bias``
    (or ``result``)."""
    if base is not None:
        return base.to(dtype)
    if bias is not None:
        return result.to(dtype) - bias.to(dtype)
    return result.to(dtype)


def compose(
    result: torch.Tensor,
    base: torch.Tensor | None,
    bias: torch.Tensor | None,
    lora: torch.Tensor,
    magnitude: torch.Tensor,
    norm: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """``result + (g - 1)·base + g·s·lora`` with ``g = m / norm``, computed in float32, rounded once.

    ``g - 1`` is evaluated as ``(m - norm) / norm`` so that it does not cancel when ``m ≈ norm``.
    ``base`` is ``None`` when PEFT reuses the base layer's output; then ``base = result - bias``.
    """
    out_dtype = compose_dtype(result, base, lora, magnitude)
    acc = _accumulation_dtype(out_dtype)
    m = magnitude.to(acc)
    n = norm.to(acc)
    g = m / n
    g_minus_1 = (m - n) / n
    base_eff = _effective_base(result, base, bias, acc)
    out = result.to(acc) + g_minus_1 * base_eff + (g * scaling) * lora.to(acc)
    return out.to(out_dtype)


def adapted(
    result: torch.Tensor,
    base: torch.Tensor | None,
    bias: torch.Tensor | None,
    lora: torch.Tensor,
    scaling: float,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``base + s·lora`` = ``(W + s·B·A)·x``: the adapted layer's output before normalisation, bias excluded.

    ``out = result + (g - 1)·base + g·s·lora`` has ``∂out/∂m = adapted / norm``, so this one tensor is
    all the magnitude's gradient needs from the forward. Computed in float32, rounded once to
    ``dtype`` (the output's, :func:`compose_dtype`: the precision PEFT's own output has).
    """
    acc = _accumulation_dtype(dtype)
    base_eff = _effective_base(result, base, bias, acc)
    return (base_eff + scaling * lora.to(acc)).to(dtype)


def compose_with_adapted(
    result: torch.Tensor,
    base: torch.Tensor | None,
    bias: torch.Tensor | None,
    lora: torch.Tensor,
    magnitude: torch.Tensor,
    norm: torch.Tensor,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(compose(...), adapted(...))``: the output, and what its backward keeps instead of ``result`` and ``lora``."""
    dtype = compose_dtype(result, base, lora, magnitude)
    return (
        compose(result, base, bias, lora, magnitude, norm, scaling),
        adapted(result, base, bias, lora, scaling, dtype),
    )


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`compose` (``norm`` is detached in PEFT and gets none), from ``adapted`` alone.

    Returns ``(grad_main, grad_lora, grad_magnitude)``:

    - ``grad_main``, in ``main_dtype``: ``g·d`` for ``result`` when no ``base`` was given (``result``
      also stands in for the base), else ``(g - 1)·d`` for ``base`` (``result`` then simply receives ``d``);
    - ``grad_lora = g·s·d``, in ``lora_dtype``;
    - ``grad_magnitude = Σ_tokens d·adapted / norm``, with ``adapted = base + s·lora``.

    ``from_output``: ``adapted`` holds the output ``out = g·adapted`` instead (PEFT's reused base
    without bias), so the last sum is ``Σ_tokens d·out / m``; it is not finite where ``m = 0`` (see
    :func:`zero_magnitude_grad`).
    """
    grad_main, grad_lora = input_gradients(grad_out, magnitude, norm, scaling, base_given, main_dtype, lora_dtype)
    acc = _accumulation_dtype(torch.promote_types(grad_out.dtype, adapted.dtype))
    per_token = grad_out.to(acc) * adapted.to(acc)
    divisor = magnitude if from_output else norm
    grad_magnitude = (per_token.reshape(-1, per_token.shape[-1]).sum(dim=0) / divisor.to(acc)).to(magnitude.dtype)
    return grad_main, grad_lora, grad_magnitude


@dataclasses.dataclass(frozen=True)
class FourBit:
    """How a bitsandbytes 4-bit weight ``W [d_out, d_in]`` is stored, besides its packed bytes: element
    ``e`` of the row-major ``W`` is code ``c`` in byte ``e // 2`` (the high nibble for even ``e``) and
    has the value ``code[c]·absmax[e // blocksize]``, rounded to ``dtype``, as bitsandbytes'
    ``dequantize_4bit`` computes it."""

    absmax: torch.Tensor  # float32 block scales (de-nested where the quant state is double-quantized)
    code: torch.Tensor  # float32 [16]: the value of each 4-bit code (NF4's or FP4's table)
    blocksize: int
    dtype: torch.dtype


def dequantize_4bit_rows(packed: torch.Tensor, form: FourBit, rows: torch.Tensor, d_in: int) -> torch.Tensor:
    """Rows ``rows`` of ``W [d_out, d_in]`` in ``form.dtype``, from its packed bytes (:class:`FourBit`)."""
    element = rows.to(torch.int64)[:, None] * d_in + torch.arange(d_in, device=rows.device)
    byte = packed.reshape(-1)[element // 2].to(torch.int32)
    code = torch.where(element % 2 == 0, byte >> 4, byte & 15)
    return (form.code.float()[code] * form.absmax.float()[element // form.blocksize]).to(form.dtype)


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
    four_bit: FourBit | None = None,
) -> torch.Tensor:
    """``grad_magnitude`` (the gradient from the output, ``Σ_tokens d·out / m``) with its features where
    ``m = 0`` replaced by ``Σ_tokens d·adapted / norm``, in ``grad_magnitude``'s dtype.

    There ``g = 0`` and the output says nothing of ``adapted``, so it is recomputed for those features
    only: ``adapted[:, j] = x·(W + s·B·A)_jᵀ``, one row of ``W + s·B·A`` per such feature. With
    ``four_bit``, ``weight`` holds a bitsandbytes 4-bit ``W``'s packed bytes (:class:`FourBit`).
    """
    zero = (magnitude == 0).nonzero().squeeze(1)
    out = grad_magnitude.clone()
    if zero.numel() == 0:
        return out
    d_in = lora_A.shape[1]
    if four_bit is None:
        w_rows = (weight.T if fan_in_fan_out else weight)[zero].float()
    else:
        w_rows = dequantize_4bit_rows(weight, four_bit, zero, d_in).float()
    adapted_rows = w_rows + scaling * (lora_B[zero].float() @ lora_A.float())  # [zeros, d_in]
    x = lora_input.reshape(-1, d_in).float()
    d = grad_out.reshape(-1, grad_out.shape[-1])[:, zero].float()
    out[zero] = ((d * (x @ adapted_rows.T)).sum(dim=0) / norm[zero].float()).to(out.dtype)
    return out


def input_gradients(
    grad_out: torch.Tensor,
    magnitude: torch.Tensor,
    norm: torch.Tensor,
    scaling: float,
    base_given: bool,
    main_dtype: torch.dtype,
    lora_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grad_main, grad_lora)`` of :func:`compose_backward`: they need no activation, only ``g``."""
    acc = _accumulation_dtype(grad_out.dtype)
    d = grad_out.to(acc)
    m = magnitude.to(acc)
    n = norm.to(acc)
    g = m / n
    main_factor = (m - n) / n if base_given else g
    return (main_factor * d).to(main_dtype), ((g * scaling) * d).to(lora_dtype)


def bias_gradient(
    grad_out: torch.Tensor, magnitude: torch.Tensor, norm: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """The bias's gradient where PEFT reuses the base output (``base = result - bias``), in ``dtype``.

    ``out = g·result - (g - 1)·bias + g·s·lora``, so ``∂out/∂bias = -(g - 1)`` per feature and the
    gradient is ``-(g - 1)·Σ_tokens d``.
    """
    g_minus_1 = (magnitude.float() - norm.float()) / norm.float()
    return (-(g_minus_1) * grad_out.float().reshape(-1, grad_out.shape[-1]).sum(0)).to(dtype)
