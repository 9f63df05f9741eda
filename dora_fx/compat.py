"""Keep Dynamo from breaking the graph inside PEFT's DoRA layers, without patching PEFT.

Two PEFT helpers stop Dynamo; each gets a traceable stand-in through
``torch._dynamo.substitute_in_graph``, which changes what Dynamo traces, never what PEFT runs eagerly.

``dequantize_module_weight`` asks ``type(module.weight).__module__.startswith("torchao.")``,
which Dynamo (torch 2.13) cannot trace: it breaks the graph in every DoRA layer, and the dense
``B·A`` product lands in a graph of its own, out of the rewrite's reach. The stand-in returns, for
a plain ``nn.Parameter`` weight, the weight, exactly what PEFT returns. For bitsandbytes weights it
computes what PEFT's ``dequantize_bnb_weight`` computes by calling bitsandbytes' own
``torch.library`` ops with the quant state's tensors (:mod:`dora_fx.quantized`), which Dynamo
traces, where PEFT's path goes through Python wrappers and re-creates the parameter (``.data``
writes that Dynamo refuses: six graph breaks per 4-bit layer). Every other case (HQQ, torchao,
FSDP shards, a weight that bitsandbytes repacked for its CPU inference kernel) runs PEFT's own
function eagerly, as before.

``transpose(weight, fan_in_fan_out)`` wraps ``weight.T`` of a Parameter in a new ``nn.Parameter``,
a constructor Dynamo refuses (every GPT-2 ``Conv1D`` DoRA layer). The new Parameter is a fresh leaf:
the same values, and no gradient reaches the original weight through it. The stand-in returns
``weight.T.detach()``, which has both properties.
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import nn

from dora_fx import quantized

log = logging.getLogger(__name__)


@functools.cache
def install() -> bool:
    """Register the stand-ins once; returns whether PEFT was found and the stand-ins registered.

    Called when a dora_fx backend is first used (:mod:`dora_fx.backend`), not at import: from then
    on they apply to every backend in the process."""
    try:
        from peft.utils import integrations
    except ImportError:
        return False
    original = integrations.dequantize_module_weight
    eager = torch._dynamo.disable(original)

    @torch._dynamo.substitute_in_graph(original)
    def dequantize_module_weight(module: nn.Module) -> nn.Parameter:
        if not hasattr(module, "W_q"):
            weight = getattr(module, "weight", None)
            if type(weight) is nn.Parameter:
                return weight
            if quantized.traceable_bnb_weight(module):
                return quantized.dequantize_bnb(module)
            if quantized.is_torchao_tensor(weight):
                return weight.dequantize()
        return eager(module)

    from peft.utils import other

    @torch._dynamo.substitute_in_graph(other.transpose)
    def transpose(weight: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
        if not fan_in_fan_out:
            return weight
        if isinstance(weight, nn.Parameter):
            return weight.T.detach()
        return weight.T

    log.debug("dora_fx: registered traceable stand-ins for peft's dequantize_module_weight and transpose")
    return True
