"""QDoRA: the DoRA norm over a bitsandbytes base weight, read from the quantized weight in row blocks.

With :mod:`dora_fx.compat`'s stand-in for PEFT's ``dequantize_module_weight``, Dynamo traces a DoRA
layer over a bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` base with the dequantization inline, and
:mod:`dora_fx.passes.dora_linear` matches the region with ``W`` being that dequantization.

Matches (the norm's ``W``, found by :mod:`dora_fx.passes.dora_linear`)::

    W = bitsandbytes.dequantize_4bit(packed.data, absmax, blocksize, quant_type, shape, dtype)
    W = bitsandbytes.int8_vectorwise_dequant(weight.data, scales)

Rewrite to::

    norm = dora_fx.weight_norm_4bit(packed, absmax, blocksize, quant_type, shape, dtype, A, B, s)
    norm = dora_fx.weight_norm_int8(weight, scales, A, B, s)

so the norm never holds the dense ``[d_out, d_in]`` weight (:mod:`dora_fx.quantized`). The
dequantization stays only where something else reads it: the recomputed base GEMM of PEFT's dropout
path, ``linear(dropout(x), W)``.

A torchao weight (``W = weight.dequantize()``, traced through torchao's tensor subclass) keeps
``dora_fx.weight_norm`` on the dequantized ``W``: the dense ``B·A`` is gone, the dense ``W`` is not.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx


@dataclasses.dataclass(frozen=True)
class QuantizedNorm:
    """The norm op for a quantized ``W``, its arguments before ``(A, B, s)``, and the report label."""

    op: torch._ops.OpOverload | None  # None: the plain weight_norm on the dequantized weight
    weight_args: tuple
    label: str


def _argument(node: fx.Node, index: int, name: str):
    return node.args[index] if len(node.args) > index else node.kwargs[name]


def _stored_tensor(node: fx.Node) -> fx.Node:
    """The parameter behind ``param.data`` (Dynamo: ``_get_data_attr``), so that the op receives the
    parameter itself, whose identity and version counter key the ``||W||²`` cache."""
    if node.op == "call_function" and node.target is torch._C._autograd._get_data_attr:
        return node.args[0]
    return node


def quantized_norm(weight: fx.Node, fan_in_fan_out: bool) -> QuantizedNorm | None:
    """The quantized norm for the norm's ``W`` node, or None when ``W`` is not a dequantization.

    A torchao weight's ``weight.dequantize()`` keeps the plain norm on the dense dequantized weight
    (still without the dense ``B·A``); the report says so.
    """
    if weight.op == "call_method" and weight.target == "dequantize":
        return QuantizedNorm(None, (), "torchao base, norm on the dequantized weight")
    if weight.op != "call_function" or fan_in_fan_out:
        return None
    ops = getattr(torch.ops, "bitsandbytes", None)
    if ops is None:
        return None
    if weight.target is ops.dequantize_4bit.default:
        quant_type = _argument(weight, 3, "quant_type")
        return QuantizedNorm(
            torch.ops.dora_fx.weight_norm_4bit.default,
            (
                _stored_tensor(_argument(weight, 0, "A")),
                _argument(weight, 1, "absmax"),
                _argument(weight, 2, "blocksize"),
                quant_type,
                list(_argument(weight, 4, "shape")),
                _argument(weight, 5, "dtype"),
            ),
            f"{quant_type} base",
        )
    if weight.target is ops.int8_vectorwise_dequant.default:
        return QuantizedNorm(
            torch.ops.dora_fx.weight_norm_int8.default,
            (_stored_tensor(_argument(weight, 0, "A")), _argument(weight, 1, "stats")),
            "int8 base",
        )
    return None
