"""Make the rewritten graph's reused norms inputs of the graph.

A ``dora_fx::cached_weight_norm`` node whose ``W``, ``A`` and ``B`` are inputs of the graph (Dynamo
passes a module's parameters as inputs) is replaced by a new input, appended after the graph's own;
:class:`dora_fx.norm_inputs.NormInputs` computes its value from ``W``, ``A`` and ``B`` before each call
of the compiled graph and reuses it while they are unchanged. The compiled graph then does no work of
its own for the norm: no op call per layer, and under CUDA graphs the norm is a static input that lives
outside the graph's memory pool, refreshed before the replay.

Norm nodes inside higher-order-op bodies (checkpointed layers), those over weights that are not graph
inputs and those whose scaling is a value of the graph (Dynamo makes it one with ``dynamic=True``)
keep the op.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

NAME_PREFIX = "dora_fx_norm_"


@dataclass(frozen=True)
class LiftedNorm:
    """One norm made a graph input: where its tensors are among the graph's inputs, and its constants."""

    weight: int
    lora_A: int
    lora_B: int
    scaling: float
    fan_in_fan_out: bool
    d_out: int
    dtype: torch.dtype


# What Dynamo keeps on its graph module and placeholder nodes outside ``meta`` (AOTAutograd reads them).
_MODULE_ATTRIBUTES = ("_param_name_to_source", "_source_to_user_stacks")


def _copy(gm: fx.GraphModule) -> tuple[fx.GraphModule, dict[fx.Node, fx.Node]]:
    """A new GraphModule over a copy of ``gm``'s graph (sharing its modules and parameters), with what
    Dynamo keeps on the module and the placeholders, and the map from old nodes to new. Dynamo reads
    its own graph's placeholders after the backend returns, so new inputs go into a copy."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    graph.output(graph.graph_copy(gm.graph, env))
    for old, new in env.items():
        if hasattr(old, "_dynamo_source"):
            new._dynamo_source = old._dynamo_source
    copied = fx.GraphModule(gm, graph)
    copied.meta.update(gm.meta)
    for name in _MODULE_ATTRIBUTES:
        if hasattr(gm, name):
            setattr(copied, name, getattr(gm, name))
    return copied, env


def lift_norms(gm: fx.GraphModule) -> tuple[fx.GraphModule, list[LiftedNorm]]:
    """``gm`` with its liftable norm nodes replaced by new trailing placeholders, and their specs in
    order; ``gm`` itself when there is none (``gm`` is never changed)."""
    position = {node: i for i, node in enumerate(gm.graph.find_nodes(op="placeholder"))}
    liftable = [
        node
        for node in gm.graph.find_nodes(op="call_function", target=torch.ops.dora_fx.cached_weight_norm.default)
        if all(arg in position for arg in node.args[:3]) and not isinstance(node.args[3], fx.Node)
    ]
    if not liftable:
        return gm, []
    gm, env = _copy(gm)
    graph = gm.graph
    last = env[next(reversed(position))]
    lifted: list[LiftedNorm] = []
    for original in liftable:
        node = env[original]
        weight, lora_A, lora_B, scaling, fan_in_fan_out = original.args
        value = node.meta["val"]
        with graph.inserting_after(last):
            last = graph.placeholder(f"{NAME_PREFIX}{len(lifted)}")
        last.meta.update(val=value, example_value=value)
        # AOTAutograd reads these off Dynamo's placeholders: no user-code source; a static input for
        # CUDA graphs (NormInputs keeps each norm at one address).
        last._dynamo_source = None
        last.meta["tensor_dict"] = {"_dynamo_static_input_type": "unguarded"}
        node.replace_all_uses_with(last)
        graph.erase_node(node)
        lifted.append(
            LiftedNorm(
                position[weight], position[lora_A], position[lora_B], float(scaling), bool(fan_in_fan_out),
                value.shape[0], value.dtype,
            )
        )
    graph.lint()
    gm.recompile()
    return gm, lifted
