"""Recompute in the backward what is cheaply derived from the DoRA outputs the backward keeps anyway.

Where the magnitude is trained, the magnitude's gradient needs each DoRA layer's output (or
``adapted``, the same size): ``∂L/∂m = Σ_tokens grad_out · out / m``. The backward keeps it. Inductor's
partitioner never recomputes a tensor that an op it cannot fuse reads in the backward (its
``ban_recompute_materialized_backward`` rule), so it also keeps such tensors when they are only a
cheap function of that output. In a Llama layer these are:

- the attention inputs: ``q`` and ``k`` after RoPE, ``k`` and ``v`` repeated for grouped-query
  attention, all read by the attention backward;
- the down projection's input ``silu(gate) · up``, read by its LoRA matmuls.

Plain LoRA keeps those tensors too, but DoRA keeps the projections' outputs as well. This pass
recomputes them in the backward instead, from the kept outputs and from small tensors (RoPE's
``cos`` and ``sin``, a norm's weight): one pointwise pass each, in place of keeping an
activation-sized tensor.

The pass runs on AOTAutograd's joint graph, before Inductor partitions it (Inductor's
``joint_custom_pre_pass``). It marks the nodes to recompute with the checkpoint policy
``PREFER_RECOMPUTE``, which the partitioner honours. The rewrite tags the compose nodes whose
backward keeps an output (:func:`tag_kept_output`). Tracing copies the tag (``meta["custom"]``)
onto every aten node of the op's decomposition. From the tagged nodes the pass follows forward
users that are views or pointwise ops, and stops at the first user with a large input from
elsewhere (the residual add, for example). Nodes that already carry a checkpoint policy, such as
those of ``torch.utils.checkpoint`` regions, keep theirs.
"""

from __future__ import annotations

import hashlib
import logging

import torch
import torch.fx as fx
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch.utils.checkpoint import CheckpointPolicy

log = logging.getLogger(__name__)

TAG = "dora_fx_kept_output"
# A tensor at most this fraction of a node's size counts as small beside it (RoPE's cos and sin are
# 1/heads of q; a norm's weight is 1/tokens of its input).
SMALL_FRACTION = 4

aten = torch.ops.aten
prims = torch.ops.prims
# Layout ops that are not tagged pointwise: a recomputation through them costs one pass at most.
_LAYOUT_OPS = frozenset(
    {
        aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.alias.default,
        aten.permute.default, aten.transpose.int, aten.t.default, aten.expand.default,
        aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.select.int, aten.slice.Tensor,
        aten.cat.default, aten.clone.default, aten._to_copy.default, prims.convert_element_type.default,
    }
)


def tag_kept_output(node: fx.Node, region: int) -> None:
    """Mark ``node`` (a compose op of the Dynamo graph, or its output) as a DoRA output that the
    backward keeps, for region number ``region``."""
    node.meta["custom"] = {**node.meta.get("custom", {}), TAG: region}


def has_kept_outputs(gm: fx.GraphModule) -> bool:
    """Whether ``gm`` (or a graph nested in it) has a node :func:`tag_kept_output` marked."""
    return any(
        TAG in node.meta.get("custom", {})
        for module in gm.modules()
        if isinstance(module, fx.GraphModule)
        for node in module.graph.nodes
    )


def _is_cheap(node: fx.Node) -> bool:
    """A view, layout or deterministic pointwise aten op: recomputing it costs one pass at most."""
    target = node.target
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
        return False
    if target in _LAYOUT_OPS:
        return True
    return torch.Tag.pointwise in target.tags and torch.Tag.nondeterministic_seeded not in target.tags


def _numel(node: fx.Node):
    value = node.meta.get("val")
    return value.numel() if isinstance(value, torch.Tensor) else None


def _is_small_beside(node: fx.Node, user: fx.Node) -> bool:
    small, large = _numel(node), _numel(user)
    if small is None or large is None:
        return False
    return statically_known_true(small * SMALL_FRACTION <= large)


def _backward_nodes(graph: fx.Graph) -> set[fx.Node]:
    """The nodes of a joint graph that depend on a tangent (the backward)."""
    backward: set[fx.Node] = set()
    for node in graph.nodes:
        if (node.op == "placeholder" and node.name.startswith("tangents")) or any(
            arg in backward for arg in node.all_input_nodes
        ):
            backward.add(node)
    return backward


def kept_outputs(graph: fx.Graph) -> set[fx.Node]:
    """The forward nodes of the tagged regions whose region the backward reads: kept anyway."""
    backward = _backward_nodes(graph)
    regions: dict[object, set[fx.Node]] = {}
    for node in graph.nodes:
        region = node.meta.get("custom", {}).get(TAG)
        if region is not None and node not in backward:
            regions.setdefault(region, set()).add(node)
    return {
        node
        for nodes in regions.values()
        if any(user in backward for member in nodes for user in member.users)
        for node in nodes
    }


def recomputable_from_kept(graph: fx.Graph) -> list[fx.Node]:
    """The forward nodes cheaply computed from kept DoRA outputs and small tensors, in graph order.

    Starting at the kept outputs, a user joins when it is cheap (:func:`_is_cheap`), is not a
    graph output and has no policy of its own, and every other input it reads is kept, already
    joined, or small beside it."""
    kept = kept_outputs(graph)
    if not kept:
        return []
    backward = _backward_nodes(graph)
    joined: set[fx.Node] = set()
    frontier = list(kept)
    while frontier:
        node = frontier.pop()
        for user in node.users:
            if user in kept or user in joined or user in backward or not _is_cheap(user):
                continue
            if "recompute" in user.meta or any(u.op == "output" for u in user.users):
                continue
            if all(arg in kept or arg in joined or _is_small_beside(arg, user) for arg in user.all_input_nodes):
                joined.add(user)
                frontier.append(user)
    return [node for node in graph.nodes if node in joined]


class RecomputeFromKeptOutputs(CustomGraphPass):
    """The joint-graph pass (see the module docstring); ``then`` is a pass to run after it, such as a
    ``joint_custom_pre_pass`` the user set."""

    def __init__(self, then=None):
        self.then = then

    def __call__(self, graph: fx.Graph) -> None:
        marked = recomputable_from_kept(graph)
        for node in marked:
            node.meta["recompute"] = CheckpointPolicy.PREFER_RECOMPUTE
        log.debug("dora_fx: %d node(s) derived from kept DoRA outputs marked for recomputation", len(marked))
        if self.then is not None:
            self.then(graph)

    def uuid(self) -> bytes | None:
        """Keyed on this file's source and on the pass it hands on to: Inductor's caches need both."""
        own = get_hash_for_files((__file__,))
        if self.then is None:
            return own
        then = self.then.uuid() if isinstance(self.then, CustomGraphPass) else None
        if then is None:
            return None  # a pass Inductor cannot key: no caching, as without dora_fx
        return hashlib.sha256(own + repr(then).encode()).digest()
