"""DoRA's weight norm over a bitsandbytes-quantized base weight, without the dense weight (QDoRA).

PEFT dequantizes the whole frozen base weight ``W [d_out, d_in]`` in every forward to compute
``||W + s·B·A||_row``. The norm is row-separable (DESIGN.md §3): rows ``i ∈ [a, b)`` need only
``W[a:b]``, ``B[a:b]`` and the small ``G = A·Aᵀ``::

    ||W_i + s(BA)_i||² = ||W_i||² + 2s·<B_i, (W_i·Aᵀ)> + s²·<B_i, (B_i·G)>

:func:`weight_norm` therefore dequantizes ``W`` a bounded block of rows at a time, with
bitsandbytes' own ``torch.library`` ops on a slice of the packed weight, and keeps only ``[rows, r]``
of each block: its transient memory is ``O(CHUNK_ELEMENTS + r²)`` plus the ``[d_out]`` result,
never ``O(d_out·d_in)``. The slices are cut where a row starts a new quantization block, so each
slice dequantizes exactly as the whole weight does.

``||W_i||²`` depends on the frozen weight only: it is computed once and reused while the packed
weight is the same tensor with the same storage and version counter (:func:`row_squares`).

The module also holds the traceable dequantization that :mod:`dora_fx.compat` gives Dynamo in place
of PEFT's ``dequantize_module_weight`` for bitsandbytes weights (:func:`dequantize_bnb`).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch

from dora_fx import norm_cache
from dora_fx.kernels import reference

Tensor = torch.Tensor

# Elements of W dequantized at once: 8 Mi, 16 MiB in bf16 (32 MiB where the CPU path upcasts them).
CHUNK_ELEMENTS = 1 << 23


def _bnb_ops():
    return torch.ops.bitsandbytes


def traceable_bnb_weight(module: torch.nn.Module) -> bool:
    """Whether :func:`dequantize_bnb` gives PEFT's dequantized weight for ``module``: a bitsandbytes
    4-bit weight with its quant state in bitsandbytes' canonical packed layout, or an 8-bit one with
    its scales."""
    weight = getattr(module, "weight", None)
    name = type(weight).__name__
    if name == "Params4bit":
        state = getattr(weight, "quant_state", None)
        return (
            state is not None
            and not getattr(state, "packing_format_for_cpu", False)  # repacked for bnb's CPU inference kernel
            and weight.dim() == 2
            and weight.shape[1] == 1
        )
    if name == "Int8Params":
        return _int8_scales(module) is not None and weight.dtype == torch.int8
    return False


def is_torchao_tensor(weight) -> bool:
    """Whether ``weight`` is a torchao tensor subclass (PEFT then calls its ``dequantize()``)."""
    try:
        from torchao.utils import TorchAOBaseTensor
    except ImportError:
        return False
    return isinstance(weight, TorchAOBaseTensor)


def _int8_scales(module: torch.nn.Module) -> Tensor | None:
    state = getattr(module, "state", None)
    scales = getattr(state, "SCB", None)
    return scales if scales is not None else getattr(module.weight, "SCB", None)


def absmax_float(state) -> Tensor:
    """The float32 block scales of a 4-bit quant state (de-nested under double quantization)."""
    if not state.nested:
        return state.absmax
    inner = state.state2
    absmax = _bnb_ops().dequantize_blockwise.default(
        state.absmax, inner.absmax, inner.code.to(state.absmax.device), inner.blocksize, torch.float32
    )
    return absmax + state.offset


def dequantize_bnb(module: torch.nn.Module) -> Tensor:
    """``W`` in the quant state's dtype, as PEFT's ``dequantize_bnb_weight`` computes it, through
    bitsandbytes' ``torch.library`` ops (which Dynamo traces)."""
    weight = module.weight
    if type(weight).__name__ == "Params4bit":
        state = weight.quant_state
        return _bnb_ops().dequantize_4bit.default(
            weight.data, absmax_float(state), state.blocksize, state.quant_type, list(state.shape), state.dtype
        )
    scales = _int8_scales(module)
    return _bnb_ops().int8_vectorwise_dequant.default(weight.data, scales.to(weight.device))


@functools.cache
def four_bit_code(quant_type: str, device: torch.device) -> Tensor:
    """float32 ``[16]``: the value of each 4-bit code of ``quant_type`` (``nf4``, ``fp4``), read off
    bitsandbytes' own dequantization of the sixteen codes with a block scale of 1."""
    codes = torch.arange(16, dtype=torch.uint8, device=device)
    packed = ((codes[0::2] << 4) | codes[1::2]).repeat(4).reshape(-1, 1)  # one 64-element block
    scale = torch.ones(1, dtype=torch.float32, device=device)
    values = _bnb_ops().dequantize_4bit.default(packed, scale, 64, quant_type, [1, 64], torch.float32)
    return values.reshape(-1)[:16].contiguous()


def four_bit_form(absmax: Tensor, blocksize: int, quant_type: str, dtype: torch.dtype) -> reference.FourBit:
    """What the kernels need besides the packed bytes to read a bitsandbytes 4-bit weight in place."""
    return reference.FourBit(absmax, four_bit_code(quant_type, absmax.device), blocksize, dtype)


@dataclasses.dataclass(frozen=True)
class Packed4bit:
    """A bitsandbytes 4-bit weight: the packed bytes and what ``dequantize_4bit`` needs with them."""

    packed: Tensor
    absmax: Tensor
    blocksize: int
    quant_type: str
    shape: tuple[int, int]
    dtype: torch.dtype

    @property
    def stored(self) -> Tensor:
        return self.packed

    @property
    def layout(self) -> tuple:
        return ("4bit", self.quant_type, self.blocksize, self.shape, self.dtype)

    def rows(self, start: int, stop: int) -> Tensor:
        """``W[start:stop]`` dequantized; ``start·d_in`` must be a multiple of the block size."""
        d_in = self.shape[1]
        first, last = start * d_in, stop * d_in
        flat = self.packed.reshape(-1)
        absmax = self.absmax[first // self.blocksize : math.ceil(last / self.blocksize)]
        return _bnb_ops().dequantize_4bit.default(
            flat[first // 2 : (last + 1) // 2].reshape(-1, 1), absmax, self.blocksize, self.quant_type,
            [stop - start, d_in], self.dtype,
        )

    def row_step(self) -> int:
        """Smallest row count whose elements fill whole quantization blocks (and whole bytes)."""
        return self.blocksize // math.gcd(self.shape[1], self.blocksize)


@dataclasses.dataclass(frozen=True)
class Int8Rows:
    """A bitsandbytes 8-bit weight ``[d_out, d_in]`` with one scale per row."""

    weight: Tensor
    scales: Tensor
    dtype = torch.float32  # what bitsandbytes' int8_vectorwise_dequant returns

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)

    @property
    def stored(self) -> Tensor:
        return self.weight

    @property
    def layout(self) -> tuple:
        return ("int8", self.shape)

    def rows(self, start: int, stop: int) -> Tensor:
        return _bnb_ops().int8_vectorwise_dequant.default(self.weight[start:stop], self.scales[start:stop])

    def row_step(self) -> int:
        return 1


def chunk_rows(weight: Packed4bit | Int8Rows) -> int:
    """Rows dequantized at once: about :data:`CHUNK_ELEMENTS` elements, a multiple of the row step."""
    step = weight.row_step()
    return max(step, CHUNK_ELEMENTS // max(weight.shape[1], 1) // step * step)


def weight_norm(weight: Packed4bit | Int8Rows, lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    """Row norms of ``W + s·B·A`` in float32, reading ``W`` a block of rows at a time.

    The squared norm is clamped at zero before the square root (cancellation can make it slightly
    negative), as in :func:`dora_fx.kernels.reference.weight_norm`.
    """
    d_out, _ = weight.shape
    w_squared = row_squares(weight)
    gram = reference.matmul_float32(lora_A, lora_A.T)  # [r, r]
    a_t = lora_A.T
    if lora_A.dtype != weight.dtype or not reference.mm_to_float32_in_place(lora_A, a_t):
        a_t = a_t.float()  # upcast once, not per chunk
    out = torch.empty(d_out, dtype=torch.float32, device=lora_A.device)
    step = chunk_rows(weight)
    for start in range(0, d_out, step):
        stop = min(start + step, d_out)
        u = reference.matmul_float32(weight.rows(start, stop), a_t)  # [rows, r]: (W·Aᵀ)_i
        b = lora_B[start:stop].float()
        # <B_i, 2s·U_i + s²·(B G)_i>: the cross and LoRA terms in one product
        terms = torch.addmm(u, b, gram, beta=2.0 * scaling, alpha=scaling * scaling)
        torch.add(w_squared[start:stop], (b * terms).sum(dim=1), out=out[start:stop])
    return out.clamp_min_(0.0).sqrt_()


def _compute_row_squares(weight: Packed4bit | Int8Rows) -> Tensor:
    d_out, _ = weight.shape
    squares = torch.empty(d_out, dtype=torch.float32, device=weight.stored.device)
    step = chunk_rows(weight)
    for start in range(0, d_out, step):
        stop = min(start + step, d_out)
        # vector_norm upcasts element by element: no float32 copy of the chunk
        squares[start:stop] = torch.linalg.vector_norm(weight.rows(start, stop), dim=1, dtype=torch.float32).square()
    return squares


def row_squares(weight: Packed4bit | Int8Rows) -> Tensor:
    """``||W_i||²`` in float32, computed once per frozen weight.

    Reused while the packed weight is the same tensor with the same storage and autograd version
    counter (bitsandbytes re-quantizing makes a new parameter; an in-place write bumps the version).
    Not cached for inference tensors (no version counter) or during CUDA graph capture. Writes
    through ``.data`` bypass the version counter: call :func:`dora_fx.norm_cache.clear` after them.
    """
    return norm_cache.kept_row_squares(weight.stored, weight.layout, lambda: _compute_row_squares(weight))
