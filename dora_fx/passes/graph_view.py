"""Normalise Dynamo's FX graph into op *kinds* and match small patterns on it with networkx.

Dynamo spells one operation many ways across torch releases and call styles: ``torch._C._nn.linear``
and ``F.linear``, ``x.T`` as ``getattr(x, "T")`` or ``x.t()``, ``a * b`` as ``operator.mul`` or
``torch.mul``. :func:`kind_of` maps each spelling onto one kind. Value-preserving steps (``.detach()``,
``.to(dtype)``, ``.contiguous()``) are *transparent*: the view skips them, so ``x.to(f32).detach()``
feeding ``mul`` reads as an edge ``x -> mul``.

Matching is local: :func:`neighbourhood` collects the nodes a few hops around an anchor, and
:func:`match` runs networkx's subgraph monomorphism of a :class:`Pattern` on that view only, so the
cost grows with the number of anchors, not with their product.
"""

from __future__ import annotations

import dataclasses
import graphlib
import operator
from collections.abc import Iterator

import networkx as nx
import torch
import torch.fx as fx
import torch.nn.functional as F

ANY = "any"
EYE = "eye"
LINEAR = "linear"
TRANSPOSE = "transpose"
MUL = "mul"
ADD = "add"
SUB = "sub"
DIV = "div"
VIEW = "view"
NORM = "norm"
DROPOUT = "dropout"
OTHER = "other"

_FUNCTION_KINDS = {
    torch.eye: EYE,
    F.linear: LINEAR,
    torch.ops.aten.linear.default: LINEAR,
    torch.t: TRANSPOSE,
    torch.transpose: TRANSPOSE,
    operator.mul: MUL,
    torch.mul: MUL,
    operator.add: ADD,
    torch.add: ADD,
    operator.sub: SUB,
    torch.sub: SUB,
    operator.truediv: DIV,
    torch.div: DIV,
    torch.linalg.norm: NORM,
    torch.linalg.vector_norm: NORM,
    torch.norm: NORM,
    F.dropout: DROPOUT,
    torch.dropout: DROPOUT,
}
_METHOD_KINDS = {
    "t": TRANSPOSE,
    "transpose": TRANSPOSE,
    "mul": MUL,
    "add": ADD,
    "sub": SUB,
    "div": DIV,
    "view": VIEW,
    "reshape": VIEW,
    "norm": NORM,
}
_TRANSPARENT_METHODS = {"detach", "contiguous", "to", "type"}
_TRANSPARENT_FUNCTIONS = {torch.detach}


def _transpose_dims_are_last_two(node: fx.Node) -> bool:
    """``x.transpose(a, b)`` on a 2-D tensor is a plain transpose for dims {0, 1} / {-2, -1}."""
    dims = [a for a in node.args[1:3]] if len(node.args) >= 3 else [node.kwargs.get("dim0"), node.kwargs.get("dim1")]
    return sorted(d % 2 for d in dims if isinstance(d, int)) == [0, 1]


def kind_of(node: fx.Node) -> str:
    """The normalised kind of ``node``: one of the module's kind constants."""
    if node.op == "call_function":
        if node.target is getattr and len(node.args) == 2 and node.args[1] in ("T", "mT"):
            return TRANSPOSE
        kind = _FUNCTION_KINDS.get(node.target, OTHER)
    elif node.op == "call_method":
        kind = _METHOD_KINDS.get(node.target, OTHER)
    else:
        return OTHER
    if kind == TRANSPOSE and (node.target == "transpose" or node.target is torch.transpose):
        return TRANSPOSE if _transpose_dims_are_last_two(node) else OTHER
    if kind in (ADD, SUB) and "alpha" in node.kwargs:
        return OTHER
    if kind == DIV and node.kwargs.get("rounding_mode") is not None:
        return OTHER
    return kind


def _is_dtype_cast(node: fx.Node) -> bool:
    """``.to(dtype)`` / ``.type(dtype)`` with nothing else: no device move, no copy flag."""
    extra = [a for a in node.args[1:]] + [v for k, v in node.kwargs.items() if k != "dtype"]
    given_dtype = node.kwargs.get("dtype") is not None
    return all(isinstance(a, torch.dtype) for a in extra) and (len(extra) + given_dtype) == 1


def is_transparent(node: fx.Node) -> bool:
    """True for ops that keep the value (up to a dtype cast) and can be looked through."""
    if node.op == "call_method" and node.target in _TRANSPARENT_METHODS:
        return node.target in ("detach", "contiguous") or _is_dtype_cast(node)
    return node.op == "call_function" and node.target in _TRANSPARENT_FUNCTIONS


def producer(node: fx.Node) -> fx.Node:
    """The first non-transparent node that ``node``'s value comes from."""
    while is_transparent(node):
        node = node.args[0]
    return node


def transparent_chain(node: fx.Node) -> list[fx.Node]:
    """The transparent nodes between ``node`` and :func:`producer` of it (``node`` first)."""
    chain = []
    while is_transparent(node):
        chain.append(node)
        node = node.args[0]
    return chain


def tensor_inputs(node: fx.Node) -> list[tuple[object, fx.Node]]:
    """``(position, producer)`` for each Node argument: positional index or keyword name."""
    inputs = [(i, a) for i, a in enumerate(node.args) if isinstance(a, fx.Node)]
    inputs += [(k, v) for k, v in node.kwargs.items() if isinstance(v, fx.Node)]
    return [(pos, producer(a)) for pos, a in inputs]


def real_users(node: fx.Node) -> list[fx.Node]:
    """Consumers of ``node`` seen through transparent nodes."""
    users = []
    for user in node.users:
        users.extend(real_users(user) if is_transparent(user) else [user])
    return users


def neighbourhood(anchor: fx.Node, up: int, down: int) -> set[fx.Node]:
    """Non-transparent nodes within ``up`` producer hops of ``anchor`` or of one of its consumers
    within ``down`` hops, plus those consumers."""
    below = {anchor}
    frontier = {anchor}
    for _ in range(down):
        frontier = {u for n in frontier for u in real_users(n)}
        below |= frontier
    region = set(below)
    frontier = set(below)
    for _ in range(up):
        frontier = {p for n in frontier for _, p in tensor_inputs(n)}
        region |= frontier
    return region


def view(nodes: set[fx.Node]) -> nx.DiGraph:
    """networkx view of ``nodes``: node attribute ``kind``, edge attribute ``pos`` (set of positions)."""
    graph = nx.DiGraph()
    for node in nodes:
        graph.add_node(node, kind=kind_of(node))
    for node in nodes:
        for pos, src in tensor_inputs(node):
            if src in nodes:
                if graph.has_edge(src, node):
                    graph.edges[src, node]["pos"].add(pos)
                else:
                    graph.add_edge(src, node, pos={pos})
    return graph


@dataclasses.dataclass(frozen=True)
class Pattern:
    """A small DAG of kinds. ``edges`` are ``(src, dst, position)``; position ``None`` matches any
    argument slot (commutative ops). ``pinned`` maps pattern names to FX nodes they must be."""

    nodes: dict[str, str]
    edges: tuple[tuple[str, str, object], ...]

    def graph(self, pinned: dict[str, fx.Node]) -> nx.DiGraph:
        graph = nx.DiGraph()
        for name, kind in self.nodes.items():
            graph.add_node(name, kind=kind, pin=pinned.get(name))
        for src, dst, pos in self.edges:
            graph.add_edge(src, dst, pos=pos)
        return graph


def _node_match(graph_attrs: dict, pattern_attrs: dict) -> bool:
    pin = pattern_attrs["pin"]
    if pin is not None:
        return graph_attrs["fx"] is pin
    return pattern_attrs["kind"] == ANY or pattern_attrs["kind"] == graph_attrs["kind"]


def _edge_match(graph_attrs: dict, pattern_attrs: dict) -> bool:
    return pattern_attrs["pos"] is None or pattern_attrs["pos"] in graph_attrs["pos"]


def match(pattern: Pattern, nodes: set[fx.Node], pinned: dict[str, fx.Node]) -> Iterator[dict[str, fx.Node]]:
    """Every embedding of ``pattern`` in the view of ``nodes``, as ``{pattern name: fx node}``."""
    graph = view(nodes)
    for node in graph.nodes:
        graph.nodes[node]["fx"] = node
    matcher = nx.algorithms.isomorphism.DiGraphMatcher(
        graph, pattern.graph(pinned), node_match=_node_match, edge_match=_edge_match
    )
    for mapping in matcher.subgraph_monomorphisms_iter():
        yield {name: node for node, name in mapping.items()}


def scalar_operand(node: fx.Node) -> float | None:
    """The Python-number operand of a binary op (``2.0 * x``, ``x - 1``), or None."""
    scalars = [a for a in node.args if isinstance(a, (int, float)) and not isinstance(a, bool)]
    return float(scalars[0]) if len(scalars) == 1 and len(node.args) == 2 else None


def scale_factor(node: fx.Node, tensor: fx.Node) -> float | fx.Node | None:
    """The factor that binary ``node`` multiplies ``tensor`` by: a Python number, or a node holding a
    symbolic number (with ``dynamic=True`` Dynamo turns float attributes such as PEFT's scaling into
    graph inputs). None when the other operand is a tensor or there is no single other operand."""
    if len(node.args) != 2 or node.kwargs:
        return None
    others = [a for a in node.args if not (isinstance(a, fx.Node) and producer(a) is tensor)]
    if len(others) != 1 or isinstance(others[0], bool):
        return None
    other = others[0]
    if isinstance(other, (int, float)):
        return float(other)
    if isinstance(other, fx.Node) and isinstance(value(other), (torch.SymFloat, torch.SymInt, float, int)):
        return other
    return None


def number_hint(x: float | fx.Node) -> float:
    """A plain number for ``x``: the number itself, or the example value behind a symbolic one."""
    if not isinstance(x, fx.Node):
        return x
    val = value(x)
    return float(val.node.hint if isinstance(val, (torch.SymFloat, torch.SymInt)) else val)


def value(node: fx.Node):
    """The example value Dynamo recorded for ``node`` (a fake tensor), or None."""
    return node.meta.get("val", node.meta.get("example_value"))


def topological_order(nodes: set[fx.Node]) -> list[fx.Node]:
    """``nodes`` producers first, in time proportional to their number (not the graph's)."""
    inside = {n: [p for p in n.all_input_nodes if p in nodes] for n in nodes}
    return list(graphlib.TopologicalSorter(inside).static_order())
