"""QDoRA: the DoRA norm over a bitsandbytes base weight, read from the quantized weight in row blocks.

With :mod:`dora_fx.compat`'s stand-in for PEFT's ``dequantize_module_weight``, Dynamo traces a DoRA
layer over a bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` base with the dequantization inline, and
:mod:`dora_fx.passes.dora_linear` rewrites the region with ``W`` being that dequantization. This pass
runs after it, on the norms it emitted.

Matches::

    norm = dora_fx.cached_weight_norm(W, A, B, s, False)
    W = bitsandbytes.dequantize_4bit(packed.data, absmax, blocksize, quant_type, shape, dtype)
    W = bitsandbytes.int8_vectorwise_dequant(weight.data, scales)

Rewrite to (reusing the norm while the weights are unchanged, like ``cached_weight_norm``)::

    norm = dora_fx.weight_norm_4bit(packed, absmax, blocksize, quant_type, shape, dtype, A, B, s, reuse=True)
    norm = dora_fx.weight_norm_int8(weight, scales, A, B, s, reuse=True)

so the norm never holds the dense ``[d_out, d_in]`` weight (:mod:`dora_fx.quantized`). The
dequantization stays only where something else reads it: the recomputed base GEMM of PEFT's dropout
path, ``linear(dropout(x), W)``; elsewhere :mod:`dora_fx.passes.dead_code` erases it.

A torchao weight (``W = weight.dequantize()``, traced through torchao's tensor subclass) keeps
``cached_weight_norm`` on the dequantized ``W``: the dense ``B·A`` is gone, the dense ``W`` is not.
The report says so in the rewrite's variant, as it names the bitsandbytes format of the others.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx

from dora_fx.passes.records import GraphRewrites, PassResult


@dataclasses.dataclass(frozen=True)
class QuantizedNorm:
    """The norm op for a quantized ``W``, its arguments before ``(A, B, s)``, and the report label."""

    op: torch._ops.OpOverload | None  # None: the plain norm on the dequantized weight
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


class QuantizedNormPass:
    """The pass that gives each rewritten region's norm over a bitsandbytes weight the op reading the
    quantized weight. It counts the norms it replaced (a torchao weight's norm is only labelled)."""

    name = "quantized_norm"

    def run(self, gm: fx.GraphModule, rewrites: GraphRewrites) -> PassResult:
        matched = 0
        for region in rewrites.regions:
            norm = region.norm
            if norm.target is not torch.ops.dora_fx.cached_weight_norm.default:
                continue
            weight, lora_A, lora_B, scaling, fan_in_fan_out = norm.args
            found = quantized_norm(weight, fan_in_fan_out)
            if found is None:
                continue
            if found.op is None:
                region.refine_norm(found.label)
                continue
            with gm.graph.inserting_before(norm):
                replacement = gm.graph.call_function(found.op, (*found.weight_args, lora_A, lora_B, scaling, True))
            value = norm.meta["val"]
            with value.fake_mode:  # the quantized ops compute in float32 whatever the weight's dtype
                new_value = value.new_empty(value.shape, dtype=torch.float32)
            replacement.meta.update(val=new_value, nn_module_stack=norm.meta.get("nn_module_stack", {}))
            for user in norm.users:
                if user.meta.get("val") is value:  # the .detach() of a training graph
                    user.meta["val"] = new_value
            norm.replace_all_uses_with(replacement)
            rewrites.maybe_dead += [norm, weight, *weight.all_input_nodes]
            region.refine_norm(found.label, replacement)
            matched += 1
        return PassResult(matched)
