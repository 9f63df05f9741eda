"""The dora_fx custom ops that rewritten graphs call (registered with ``torch.library``).

``dora_fx::weight_norm``
    Row norms of ``W + s·B·A`` from the factored form, float32, ``[d_out]``. No gradient: PEFT
    detaches the norm.
``dora_fx::cached_weight_norm``
    The same, reused while W, A and B are unchanged (:mod:`dora_fx.norm_cache`). The rewrite emits it
    for every region (detached where the graph computes gradients); the backend then makes each one
    over graph inputs a slice of one input of the compiled graph (:mod:`dora_fx.passes.lift_norms`,
    :mod:`dora_fx.norm_inputs`), so it stays an op only inside higher-order-op bodies and where the
    scaling is symbolic.
``dora_fx::weight_norm_4bit``, ``dora_fx::weight_norm_int8``
    The same norm over a bitsandbytes 4-bit (NF4/FP4) or 8-bit base weight, read in bounded blocks
    of dequantized rows (:mod:`dora_fx.quantized`); never a dense ``[d_out, d_in]`` weight. With
    ``reuse=True`` (graphs without gradients) the whole norm is kept like ``cached_weight_norm``'s,
    keyed on the packed weight, A and B.
``dora_fx::compose``
    ``result + (g - 1)·base + g·s·lora`` with ``g = m / norm``; ``base = result - bias`` when ``base``
    is ``None`` (PEFT reuses the base layer's output). Differentiable in ``result``, ``base``, ``bias``,
    ``lora`` and ``magnitude``; its backward is ``dora_fx::compose_backward``. The rewrite uses it
    where the magnitude needs no gradient (inference, a frozen magnitude): then its backward keeps no
    activation at all.
``dora_fx::compose_saving_output``
    ``out = g·(result + scaled_lora)`` for PEFT's reused base without bias, where the rewrite has
    moved ``s`` onto the ``r``-wide LoRA activation (``scaled_lora = B·(s·A·x)``). Both inputs then
    have the same gradient, ``g·d``: one tensor serves the base GEMM's and ``lora_B``'s backward.
    The backward keeps the output itself, which the layer's consumer usually keeps anyway, in place of
    ``adapted = out / g``: no activation of its own. Where ``m = 0`` (``g = 0``) the magnitude's
    gradient comes from ``dora_fx::zero_magnitude_grad`` instead, which takes the gradient from the
    output and replaces it at those features, recomputing ``adapted`` there from the LoRA input (kept
    for ``lora_A``'s gradient anyway), ``W``, ``A``, ``B`` and ``s``. Over a bitsandbytes 4-bit base, ``W`` is the packed weight with its block scales
    (``absmax``, ``blocksize``, ``quant_type``, ``weight_dtype``), decoded only for those features.
``dora_fx::compose_with_adapted``
    The same output, and ``adapted = base + s·lora`` from the same read of the inputs: the one
    activation the magnitude's gradient needs (``∂out/∂m = adapted / norm``). Its autograd keeps
    ``adapted`` instead of ``result`` and ``lora``, one activation-sized tensor per layer instead of
    two; the rewrite uses it where the magnitude needs a gradient (training).

Called on real tensors, the ops launch the Triton kernels of :mod:`dora_fx.kernels` on CUDA and run
the reference math of :mod:`dora_fx.kernels.reference` elsewhere. ``weight_norm``, the compose ops
and ``compose_backward`` are ``torch.library.triton_op``s: ``torch.compile`` traces through them. For
the compose ops it traces the reference math (``dispatch.TRACED_AS_REFERENCE``), which Inductor fuses
with the neighbouring ops; ``weight_norm`` traced on CUDA leaves its kernel in Inductor's generated
code. ``cached_weight_norm`` (where it is not made a graph input) and ``zero_magnitude_grad`` stay
ops of their own in compiled graphs (a cache lookup; a kernel Inductor would analyse at every call
site, see below).
Each op validates its inputs, in eager calls and when traced with fake tensors, so a bad call fails
with a message naming the problem.
"""

from __future__ import annotations

import torch

from dora_fx import dtypes, norm_cache, quantized
from dora_fx.kernels import dispatch, reference

Tensor = torch.Tensor


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(f"dora_fx: {message}")


def _check_same_device(op: str, *tensors: Tensor | None) -> None:
    devices = {t.device for t in tensors if t is not None}
    _require(len(devices) <= 1, f"{op}: all tensors must be on one device, got {sorted(map(str, devices))}")


def _check_adapters_chain(op: str, d_out: int, d_in: int, lora_A: Tensor, lora_B: Tensor, weight: str) -> None:
    """``lora_A [r, d_in]`` and ``lora_B [d_out, r]`` fit a ``[d_out, d_in]`` weight (described by ``weight``)."""
    _require(lora_A.dim() == 2 and lora_B.dim() == 2, f"{op}: lora_A and lora_B must be 2-D")
    r = lora_A.shape[0]
    _require(
        lora_A.shape[1] == d_in and tuple(lora_B.shape) == (d_out, r),
        f"{op}: shapes do not chain: weight {weight}, lora_A {tuple(lora_A.shape)}, lora_B {tuple(lora_B.shape)}",
    )


def _check_norm_inputs(weight: Tensor, lora_A: Tensor, lora_B: Tensor, fan_in_fan_out: bool) -> tuple[int, int]:
    _require(weight.dim() == 2, f"weight_norm: weight must be 2-D, got shape {tuple(weight.shape)}")
    d_out, d_in = (weight.shape[1], weight.shape[0]) if fan_in_fan_out else weight.shape
    _check_adapters_chain(
        "weight_norm", d_out, d_in, lora_A, lora_B, f"{tuple(weight.shape)} (fan_in_fan_out={fan_in_fan_out})"
    )
    for name, t in (("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)):
        _require(t.dtype.is_floating_point, f"weight_norm: {name} must be floating point, got {t.dtype}")
    _check_same_device("weight_norm", weight, lora_A, lora_B)
    return d_out, d_in


def _check_compose_inputs(
    result: Tensor, base: Tensor | None, bias: Tensor | None, lora: Tensor, magnitude: Tensor, norm: Tensor
) -> None:
    features = result.shape[-1] if result.dim() else -1
    _require(result.dim() >= 1, "compose: result must have at least one dimension")
    _require(lora.shape == result.shape, f"compose: lora {tuple(lora.shape)} and result {tuple(result.shape)} differ")
    _require(base is None or base.shape == result.shape, "compose: base and result shapes differ")
    _require(base is None or bias is None, "compose: pass bias only when base is None (base = result - bias)")
    for name, vec in (("magnitude", magnitude), ("norm", norm), ("bias", bias)):
        _require(
            vec is None or tuple(vec.shape) == (features,),
            f"compose: {name} must have shape ({features},), got {None if vec is None else tuple(vec.shape)}",
        )
    _check_same_device("compose", result, base, bias, lora, magnitude, norm)


def _check_four_bit_weight(op: str, packed: Tensor, absmax: Tensor, blocksize: int, lora_A: Tensor, lora_B: Tensor) -> None:
    """``packed`` and ``absmax`` hold a bitsandbytes 4-bit ``W [d_out, d_in]`` for these adapters."""
    elements = lora_B.shape[0] * lora_A.shape[1]
    _require(packed.dtype == torch.uint8 and packed.numel() * 2 >= elements,
             f"{op}: a 4-bit weight is {(elements + 1) // 2} packed bytes (uint8), got {packed.dtype} "
             f"{tuple(packed.shape)}")
    _require(blocksize > 0 and absmax.numel() * blocksize >= elements and absmax.dtype == torch.float32,
             f"{op}: absmax must hold float32 scales of {blocksize}-element blocks, got {absmax.dtype} "
             f"{tuple(absmax.shape)}")


@torch.library.triton_op("dora_fx::weight_norm", mutates_args=())
def weight_norm(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float, fan_in_fan_out: bool) -> Tensor:
    _check_norm_inputs(weight, lora_A, lora_B, fan_in_fan_out)
    return dispatch.weight_norm(weight, lora_A, lora_B, scaling, fan_in_fan_out)


def _no_gradient(ctx, *grads):
    return None, None, None, None, None


weight_norm.register_autograd(_no_gradient)


# ``cached_weight_norm`` is defined with the plain ``torch.library.Library`` API rather than
# ``custom_op``: on a cache hit the op's own work is a dict lookup and a copy, and custom_op's Python
# layers (autograd wrapper, Dynamo guard, aliasing checks) cost more than that on every call.
# It has no autograd kernel: the rewrite calls it only in graphs that compute no gradients. Called
# with gradients enabled on inputs that require them, its output gets PyTorch's autograd fallback
# (no gradient flows through it; differentiating it warns), as PEFT's detached norm gets none.
_lib = torch.library.Library("dora_fx", "FRAGMENT")
_lib.define(
    "cached_weight_norm(Tensor weight, Tensor lora_A, Tensor lora_B, float scaling, bool fan_in_fan_out) -> Tensor"
)


def recomputed_weight_norm(
    weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float, fan_in_fan_out: bool,
    row_squares: Tensor | None = None,
) -> Tensor:
    """The norm of a reuse that missed: computed now, without gradient, from the frozen ``W``'s kept
    ``||W||²`` (``row_squares``, or :func:`dora_fx.norm_cache.row_squares`)."""
    with torch.no_grad():
        if row_squares is None:
            row_squares = norm_cache.row_squares(weight, fan_in_fan_out)
        return dispatch.weight_norm(weight, lora_A, lora_B, scaling, fan_in_fan_out, row_squares)


def cached_weight_norm(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float, fan_in_fan_out: bool) -> Tensor:
    hit = norm_cache.lookup(weight, lora_A, lora_B, scaling, fan_in_fan_out)
    if hit is not None:
        return hit
    _check_norm_inputs(weight, lora_A, lora_B, fan_in_fan_out)
    norm = recomputed_weight_norm(weight, lora_A, lora_B, scaling, fan_in_fan_out)
    return norm_cache.store(weight, lora_A, lora_B, scaling, fan_in_fan_out, norm)


_lib.impl("cached_weight_norm", cached_weight_norm, "CompositeExplicitAutograd")


@torch.library.register_fake("dora_fx::cached_weight_norm", lib=_lib)
def _cached_weight_norm_fake(weight, lora_A, lora_B, scaling, fan_in_fan_out):
    d_out, _ = _check_norm_inputs(weight, lora_A, lora_B, fan_in_fan_out)
    return weight.new_empty((d_out,), dtype=dtypes.norm_dtype(weight, lora_A, lora_B))


@torch.library.custom_op("dora_fx::weight_norm_4bit", mutates_args=())
def weight_norm_4bit(
    packed: Tensor,
    absmax: Tensor,
    blocksize: int,
    quant_type: str,
    shape: list[int],
    dtype: torch.dtype,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    reuse: bool = False,
) -> Tensor:
    _check_adapters_chain("weight_norm_4bit", *shape, lora_A, lora_B, f"{tuple(shape)} (4-bit)")
    _check_same_device("weight_norm_4bit", packed, absmax, lora_A, lora_B)
    weight = quantized.Packed4bit(packed, absmax, blocksize, quant_type, tuple(shape), dtype)
    return _quantized_norm(weight, packed, lora_A, lora_B, scaling, reuse)


@weight_norm_4bit.register_fake
def _weight_norm_4bit_fake(packed, absmax, blocksize, quant_type, shape, dtype, lora_A, lora_B, scaling, reuse=False):
    _check_adapters_chain("weight_norm_4bit", *shape, lora_A, lora_B, f"{tuple(shape)} (4-bit)")
    return lora_A.new_empty((shape[0],), dtype=torch.float32)


weight_norm_4bit.register_autograd(lambda ctx, grad: (None,) * 10)


@torch.library.custom_op("dora_fx::weight_norm_int8", mutates_args=())
def weight_norm_int8(
    weight: Tensor, scales: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float, reuse: bool = False
) -> Tensor:
    _check_adapters_chain("weight_norm_int8", *weight.shape, lora_A, lora_B, f"{tuple(weight.shape)} (int8)")
    _check_same_device("weight_norm_int8", weight, scales, lora_A, lora_B)
    return _quantized_norm(quantized.Int8Rows(weight, scales), weight, lora_A, lora_B, scaling, reuse)


@weight_norm_int8.register_fake
def _weight_norm_int8_fake(weight, scales, lora_A, lora_B, scaling, reuse=False):
    _check_adapters_chain("weight_norm_int8", *weight.shape, lora_A, lora_B, f"{tuple(weight.shape)} (int8)")
    return lora_A.new_empty((weight.shape[0],), dtype=torch.float32)


weight_norm_int8.register_autograd(lambda ctx, grad: (None,) * 6)


def _quantized_norm(weight, stored: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float, reuse: bool) -> Tensor:
    if not reuse:
        return quantized.weight_norm(weight, lora_A, lora_B, scaling)
    # The quant state belongs to the stored (packed) tensor: it keys the entry with A and B.
    cached = norm_cache.lookup(stored, lora_A, lora_B, scaling, False)
    if cached is not None:
        return cached
    norm = quantized.weight_norm(weight, lora_A, lora_B, scaling)
    return norm_cache.store(stored, lora_A, lora_B, scaling, False, norm)


@torch.library.triton_op("dora_fx::compose", mutates_args=())
def compose(
    result: Tensor,
    base: Tensor | None,
    bias: Tensor | None,
    lora: Tensor,
    magnitude: Tensor,
    norm: Tensor,
    scaling: float,
) -> Tensor:
    _check_compose_inputs(result, base, bias, lora, magnitude, norm)
    return dispatch.compose(result, base, bias, lora, magnitude, norm, scaling)


@torch.library.triton_op("dora_fx::compose_with_adapted", mutates_args=())
def compose_with_adapted(
    result: Tensor,
    base: Tensor | None,
    bias: Tensor | None,
    lora: Tensor,
    magnitude: Tensor,
    norm: Tensor,
    scaling: float,
) -> tuple[Tensor, Tensor]:
    _check_compose_inputs(result, base, bias, lora, magnitude, norm)
    return dispatch.compose_with_adapted(result, base, bias, lora, magnitude, norm, scaling)


@torch.library.triton_op("dora_fx::compose_backward", mutates_args=())
def compose_backward(
    grad_out: Tensor,
    adapted: Tensor,
    magnitude: Tensor,
    norm: Tensor,
    scaling: float,
    base_given: bool,
    main_dtype: torch.dtype,
    lora_dtype: torch.dtype,
    from_output: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    return dispatch.compose_backward(
        grad_out, adapted, magnitude, norm, scaling, base_given, main_dtype, lora_dtype, from_output
    )


def _remember_form(ctx, inputs) -> tuple[Tensor, Tensor]:
    """Keep what the backward needs besides tensors; returns ``(magnitude, norm)``."""
    result, base, bias, lora, magnitude, norm, scaling = inputs
    ctx.scaling = scaling
    ctx.base_given = base is not None
    ctx.main_dtype = (result if base is None else base).dtype
    ctx.lora_dtype = lora.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype
    return magnitude, norm


def _input_gradients(ctx, grad_out, adapted, magnitude, norm):
    """Gradients for ``(result, base, bias, lora, magnitude, norm, scaling)``; ``adapted`` is ``None``
    when the magnitude needs no gradient."""
    if grad_out is None:
        return (None,) * 7
    form = (ctx.scaling, ctx.base_given, ctx.main_dtype, ctx.lora_dtype)
    grad_magnitude = None
    if adapted is None:
        grad_main, grad_lora = reference.input_gradients(grad_out, magnitude, norm, *form)
    else:
        grad_main, grad_lora, grad_magnitude = torch.ops.dora_fx.compose_backward(
            grad_out, adapted, magnitude, norm, *form
        )
    if ctx.base_given:
        return grad_out, grad_main, None, grad_lora, grad_magnitude, None, None
    grad_bias = None
    if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
        grad_bias = reference.bias_gradient(grad_out, magnitude, norm, ctx.bias_dtype)
    return grad_main, None, grad_bias, grad_lora, grad_magnitude, None, None


def _compose_setup_context(ctx, inputs, output):
    magnitude, norm = _remember_form(ctx, inputs)
    result, base, bias, lora = inputs[:4]
    # Only the magnitude's gradient reads activations: keep them only when it is needed.
    main = result if base is None else base
    activations = (main, bias, lora) if ctx.needs_input_grad[4] else (None, None, None)
    ctx.save_for_backward(magnitude, norm, *activations)


def _compose_backward(ctx, grad_out):
    magnitude, norm, main, bias, lora = ctx.saved_tensors
    adapted = None
    if lora is not None:
        dtype = dtypes.compose_dtype(main, None, lora, magnitude)
        adapted = reference.adapted(main, None, bias, lora, ctx.scaling, dtype)
    return _input_gradients(ctx, grad_out, adapted, magnitude, norm)


compose.register_autograd(_compose_backward, setup_context=_compose_setup_context)


def _compose_with_adapted_setup_context(ctx, inputs, output):
    magnitude, norm = _remember_form(ctx, inputs)
    adapted = output[1]
    ctx.mark_non_differentiable(adapted)
    ctx.set_materialize_grads(False)  # adapted gets no gradient: no zero tensor for it
    ctx.save_for_backward(magnitude, norm, adapted if ctx.needs_input_grad[4] else None)


def _compose_with_adapted_backward(ctx, grad_out, _grad_adapted):
    magnitude, norm, adapted = ctx.saved_tensors
    return _input_gradients(ctx, grad_out, adapted, magnitude, norm)


compose_with_adapted.register_autograd(
    _compose_with_adapted_backward, setup_context=_compose_with_adapted_setup_context
)


@torch.library.triton_op("dora_fx::compose_saving_output", mutates_args=())
def compose_saving_output(
    result: Tensor,
    scaled_lora: Tensor,
    magnitude: Tensor,
    norm: Tensor,
    scaling: float,
    lora_input: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    fan_in_fan_out: bool,
    absmax: Tensor | None = None,
    blocksize: int = 0,
    quant_type: str = "",
    weight_dtype: torch.dtype | None = None,
) -> Tensor:
    _check_compose_inputs(result, None, None, scaled_lora, magnitude, norm)
    if absmax is not None:
        _check_four_bit_weight("compose_saving_output", weight, absmax, blocksize, lora_A, lora_B)
    return dispatch.compose(result, None, None, scaled_lora, magnitude, norm, 1.0)


_FOUR_BIT_DEFAULTS = (None, 0, "", None)  # absmax, blocksize, quant_type, weight_dtype: a dense W


def _compose_saving_output_setup_context(ctx, inputs, output):
    result, scaled_lora, magnitude, norm, scaling, lora_input, weight, lora_A, lora_B, fan_in_fan_out, *four_bit = inputs
    _remember_form(ctx, (result, None, None, scaled_lora, magnitude, norm, scaling))
    ctx.fan_in_fan_out = fan_in_fan_out
    absmax, *ctx.four_bit = (*four_bit, *_FOUR_BIT_DEFAULTS[len(four_bit):])
    kept = (output, lora_input, weight, lora_A, lora_B, absmax) if ctx.needs_input_grad[2] else (None,) * 6
    ctx.save_for_backward(magnitude, norm, *kept)


def _compose_saving_output_backward(ctx, grad_out):
    """``g·d`` for ``result`` and ``scaled_lora`` (one tensor where their dtypes agree) and the
    magnitude's gradient ``Σ_tokens d·out / m``, or ``zero_magnitude_grad``'s where ``m = 0``."""
    magnitude, norm, output, lora_input, weight, lora_A, lora_B, absmax = ctx.saved_tensors
    form = (1.0, False, ctx.main_dtype, ctx.lora_dtype)
    grad_magnitude = None
    if output is None:
        grad_main, grad_lora = reference.input_gradients(grad_out, magnitude, norm, *form)
    else:
        grad_main, grad_lora, grad_magnitude = torch.ops.dora_fx.compose_backward(
            grad_out, output, magnitude, norm, *form, True
        )
        grad_magnitude = torch.ops.dora_fx.zero_magnitude_grad(
            grad_magnitude, grad_out, lora_input, weight, lora_A, lora_B, ctx.scaling, magnitude, norm,
            ctx.fan_in_fan_out, absmax, *ctx.four_bit,
        )
    if ctx.lora_dtype == ctx.main_dtype:
        grad_lora = grad_main
    return grad_main, grad_lora, grad_magnitude, *(None,) * 11


compose_saving_output.register_autograd(
    _compose_saving_output_backward, setup_context=_compose_saving_output_setup_context
)


# ``zero_magnitude_grad`` stays an op of its own in compiled graphs, defined with the plain Library
# API (a light call). As a ``triton_op`` its kernel would be launched from Inductor's code, but
# Inductor then analyses the kernel (Triton's TTIR) at every call site: about 0.2 s of compile per
# layer (5.6 s of the 4-layer Llama stack's 32.5 s first call on an H200), for a kernel that at most
# features only copies the gradient from the output. The op launches the kernel through the compiled form
# Triton returned on its first launch (``launch.CompiledLaunches``): 54 µs of host time a call on the
# H200 machine, against 119 µs through ``JITFunction.run``.
# With ``absmax``, ``weight`` holds a bitsandbytes 4-bit weight's packed bytes (``blocksize``,
# ``quant_type`` and ``weight_dtype`` as ``dequantize_4bit`` takes them), which the op reads in place.
# It takes the gradient from the output (``grad_magnitude``) and returns it completed, rather than
# leaving a ``where`` to the graph: that ``where`` would need this op's result inside the column sum's
# kernel, which then could not be fused with the pass that produces ``grad_out`` (this op reads
# ``grad_out``). ``flexible_layout``: Inductor passes its inputs as they are laid out; with fixed
# strides it wrote a second copy of ``lora_input`` for the op next to the one the GEMMs read.
_lib.define(
    "zero_magnitude_grad(Tensor grad_magnitude, Tensor grad_out, Tensor lora_input, Tensor weight, Tensor lora_A, Tensor lora_B, "
    "float scaling, Tensor magnitude, Tensor norm, bool fan_in_fan_out, Tensor? absmax=None, int blocksize=0, "
    "str quant_type='', ScalarType? weight_dtype=None) -> Tensor",
    tags=(torch.Tag.flexible_layout,),
)


def _zero_magnitude_grad(
    grad_magnitude, grad_out, lora_input, weight, lora_A, lora_B, scaling, magnitude, norm, fan_in_fan_out,
    absmax=None, blocksize=0, quant_type="", weight_dtype=None,
):
    """Called on real tensors: the Triton kernel on CUDA, the reference math elsewhere."""
    four_bit = None
    if absmax is not None:
        _check_four_bit_weight("zero_magnitude_grad", weight, absmax, blocksize, lora_A, lora_B)
        four_bit = quantized.four_bit_form(absmax, blocksize, quant_type, weight_dtype)
    return dispatch.zero_magnitude_grad(
        grad_magnitude, grad_out, lora_input, weight, lora_A, lora_B, scaling, magnitude, norm, fan_in_fan_out, four_bit
    )


_lib.impl("zero_magnitude_grad", _zero_magnitude_grad, "CompositeExplicitAutograd")


@torch.library.register_fake("dora_fx::zero_magnitude_grad", lib=_lib)
def _zero_magnitude_grad_fake(grad_magnitude, grad_out, lora_input, weight, lora_A, lora_B, scaling, magnitude, norm,
                              fan_in_fan_out, absmax=None, blocksize=0, quant_type="", weight_dtype=None):
    return torch.empty_like(grad_magnitude, memory_format=torch.contiguous_format)
