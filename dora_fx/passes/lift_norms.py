"""Make the rewritten graph's reused norms inputs of the graph.

A ``dora_fx::cached_weight_norm`` node whose ``W``, ``A`` and ``B`` are inputs of the graph (Dynamo
passes a module's parameters as inputs) is replaced by a slice of a new input, appended after the
graph's own: one flat buffer holds every lifted norm of one dtype and device, each at its offset, so
a graph with many DoRA layers gets one more input, not one per layer (every input costs host time at
every call, in AOTAutograd's and Inductor's wrappers). :class:`dora_fx.norm_inputs.NormInputs`
computes the norms from ``W``, ``A`` and ``B`` into that buffer before each call of the compiled
graph and reuses them while those are unchanged. The compiled graph then does no work of its own for
the norm: no op call per layer (the slices are views), and under CUDA graphs the buffer is a static
input that lives outside the graph's memory pool, refreshed before the replay.

Norm nodes inside higher-order-op bodies (checkpointed layers), those over weights that are not graph
inputs and those whose scaling is a value of the graph (Dynamo makes it one with ``dynamic=True``)
keep the op.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.fx as fx

NAME_PREFIX = "dora_fx_norm_"


@dataclass(frozen=True)
class LiftedNorm:
    """One norm made part of a graph input: where its tensors are among the graph's inputs, its
    constants, and where it lies: ``[offset, offset + d_out)`` of the ``buffer``-th lifted input."""

    weight: int
    lora_A: int
    lora_B: int
    scaling: float
    fan_in_fan_out: bool
    d_out: int
    dtype: torch.dtype
    buffer: int = 0
    offset: int = 0


def buffer_sizes(specs: list[LiftedNorm]) -> list[tuple[int, torch.dtype]]:
    """``(elements, dtype)`` of each lifted input that ``specs`` lie in, in order."""
    sizes: dict[int, tuple[int, torch.dtype]] = {}
    for spec in specs:
        end = spec.offset + spec.d_out
        sizes[spec.buffer] = (max(end, sizes.get(spec.buffer, (0,))[0]), spec.dtype)
    return [sizes[i] for i in range(len(sizes))]


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
    """``gm`` with its liftable norm nodes replaced by slices of new trailing placeholders (one per
    dtype and device of the norms), and their specs in order; ``gm`` itself when there is none (``gm``
    is never changed)."""
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
    groups: dict[tuple, list[fx.Node]] = {}
    for node in liftable:
        value = node.meta["val"]
        groups.setdefault((value.dtype, value.device), []).append(node)
    fake_mode = torch._guards.detect_fake_mode([node.meta["val"] for node in liftable]) or contextlib.nullcontext()
    last = env[next(reversed(position))]
    lifted: list[LiftedNorm] = []
    for buffer, ((dtype, device), nodes) in enumerate(groups.items()):
        total = sum(node.meta["val"].shape[0] for node in nodes)
        with fake_mode:
            flat_value = torch.empty(total, dtype=dtype, device=device)
        with graph.inserting_after(last):
            last = graph.placeholder(f"{NAME_PREFIX}{buffer}")
        last.meta.update(val=flat_value, example_value=flat_value)
        # AOTAutograd reads these off Dynamo's placeholders: no user-code source; a static input for
        # CUDA graphs (NormInputs keeps each buffer at one address).
        last._dynamo_source = None
        last.meta["tensor_dict"] = {"_dynamo_static_input_type": "unguarded"}
        offset = 0
        for original in nodes:
            node = env[original]
            weight, lora_A, lora_B, scaling, fan_in_fan_out = original.args
            d_out = node.meta["val"].shape[0]
            with graph.inserting_before(node):
                norm = graph.call_function(torch.narrow, (last, 0, offset, d_out))
            with fake_mode:
                norm.meta.update(val=flat_value.narrow(0, offset, d_out))
            node.replace_all_uses_with(norm)
            graph.erase_node(node)
            lifted.append(
                LiftedNorm(
                    position[weight], position[lora_A], position[lora_B], float(scaling), bool(fan_in_fan_out),
                    d_out, dtype, buffer, offset,
                )
            )
            offset += d_out
    graph.lint()
    gm.recompile()
    return gm, lifted
