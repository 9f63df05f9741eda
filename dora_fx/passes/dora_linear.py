"""Rewrite PEFT's DoRA ``lora.Linear`` into dora_fx's factored norm and fused composition.

Matches (PEFT 0.21 ``DoraLinearLayer.forward`` as Dynamo traces it; ``.to``/``.detach`` looked through)::

    dense = linear(linear(eye(d_in), A), B).T            # [d_out, d_in]: the product we remove
    norm  = linalg_norm(W' + s * dense, dim=1)           # W' = W, or W.T when fan_in_fan_out
    g     = (m / norm).view(1, -1)
    lora  = linear(linear(x, A), B)                      # x is dropout(x) when dropout is active
    out   = result + ((g - 1) * base + g * lora * s)
    base  = result | result - bias | linear(x, W')       # reused base, without / with bias | dropout

Rewrite to::

    norm = dora_fx.cached_weight_norm(W, A, B, s, fan_in_fan_out)   # never forms dense; one per optimizer
                                                                    # step (.detach()ed in training graphs)
    out  = dora_fx.compose(result, base | None, bias | None, lora, m, norm, s)
    # where m needs a gradient (training), the variants whose backward keeps one activation, not two:
    # reused base, no bias, KEEP_OUTPUT_MIN_ROWS rows or more (s moved onto the r-wide LoRA activation):
    out  = dora_fx.compose_saving_output(result, B·(s·A·x), m, norm, s, x, W, A, B, fan_in_fan_out)
    out, _ = dora_fx.compose_with_adapted(result, base | None, bias | None, lora, m, norm, s)   # otherwise

The norm is ``cached_weight_norm`` whatever ``W`` is; :mod:`dora_fx.passes.quantized_norm` then
replaces it where ``W`` is a bitsandbytes dequantization. The nodes the rewrite no longer reads are left
to :mod:`dora_fx.passes.dead_code`.

Anything that matches only part of this (another scaling in the output than in the norm, a norm over
another dimension, a dense product that something else also reads, ...) is left alone and reported
as a near-miss with the reason.
"""

from __future__ import annotations

import dataclasses
import math
import operator

import torch
import torch.fx as fx

import dora_fx.ops  # noqa: F401  (registers torch.ops.dora_fx.*)
from dora_fx import dtypes
from dora_fx.passes import graph_view as gv
from dora_fx.passes import quantized_norm
from dora_fx.passes import recompute
from dora_fx.passes.records import GraphRewrites, PassResult, RewrittenRegion
from dora_fx.report import NearMiss, RegionCode, module_class, module_path

_NORM_INPUT_NODES = {
    "eye": gv.ANY, "A": gv.ANY, "B": gv.ANY, "W": gv.ANY, "a_eye": gv.LINEAR, "dense": gv.LINEAR,
    "dense_t": gv.TRANSPOSE, "scaled": gv.MUL, "summed": gv.ADD, "norm": gv.NORM,
}
_NORM_INPUT_EDGES = (
    ("eye", "a_eye", 0), ("A", "a_eye", 1), ("a_eye", "dense", 0), ("B", "dense", 1),
    ("dense", "dense_t", 0), ("dense_t", "scaled", None), ("W", "summed", None),
    ("scaled", "summed", None), ("summed", "norm", 0),
)
# Only the norm and what feeds it: tells a near-miss in the norm's input from one in its use.
NORM_INPUT_PATTERN = gv.Pattern(nodes=_NORM_INPUT_NODES, edges=_NORM_INPUT_EDGES)
NORM_PATTERN = gv.Pattern(
    nodes={**_NORM_INPUT_NODES, "m": gv.ANY, "g": gv.DIV, "g_row": gv.VIEW},
    edges=_NORM_INPUT_EDGES + (("m", "g", 0), ("norm", "g", 1), ("g", "g_row", 0)),
)

_COMPOSE_NODES = {
    "g_row": gv.ANY, "A": gv.ANY, "B": gv.ANY, "x": gv.ANY, "result": gv.ANY,
    "a_x": gv.LINEAR, "lora": gv.LINEAR, "g_m1": gv.SUB, "t_base": gv.MUL, "t_lora": gv.MUL,
    "t_lora_s": gv.MUL, "dora": gv.ADD, "out": gv.ADD,
}
_COMPOSE_EDGES = (
    ("x", "a_x", 0), ("A", "a_x", 1), ("a_x", "lora", 0), ("B", "lora", 1), ("g_row", "g_m1", 0),
    ("g_m1", "t_base", None), ("g_row", "t_lora", None), ("lora", "t_lora", None),
    ("t_lora", "t_lora_s", None), ("t_base", "dora", None), ("t_lora_s", "dora", None),
    ("result", "out", None), ("dora", "out", None),
)
# PEFT passes a separate base term (result - bias, or a second GEMM on dropout(x)) ...
COMPOSE_PATTERN = gv.Pattern(
    nodes={**_COMPOSE_NODES, "base": gv.ANY}, edges=_COMPOSE_EDGES + (("base", "t_base", None),)
)
# ... or, without bias and dropout, the base layer's output itself.
COMPOSE_REUSED_RESULT_PATTERN = gv.Pattern(nodes=_COMPOSE_NODES, edges=_COMPOSE_EDGES + (("result", "t_base", None),))

# Pattern nodes whose values the rewrite replaces: each must feed only the region (or be ``out``).
_INTERIOR = ("eye", "a_eye", "dense", "dense_t", "scaled", "summed", "norm", "g", "g_row",
             "g_m1", "t_base", "t_lora", "t_lora_s", "dora")
_DENSE_PRODUCT = ("eye", "a_eye", "dense", "dense_t", "scaled", "summed", "norm")


# Readable placeholder names for the audit's code dumps (FX lower-cases placeholder names).
_ROLE_NAMES = {"A": "lora_a", "B": "lora_b", "m": "magnitude", "W": "weight_operand"}


class NoMatch(Exception):
    """A candidate is not a rewritable DoRA region; ``report`` says whether it is worth a near-miss."""

    def __init__(self, reason: str, report: bool = True):
        super().__init__(reason)
        self.reason = reason
        self.report = report


def _require(condition: bool, reason: str) -> None:
    if not condition:
        raise NoMatch(reason)


@dataclasses.dataclass
class Region:
    """A matched DoRA Linear: pattern nodes plus what the rewrite needs."""

    nodes: dict[str, fx.Node]
    weight: fx.Node
    fan_in_fan_out: bool
    scaling: float | fx.Node  # a node when Dynamo made PEFT's scaling a symbolic graph input
    base: fx.Node | None
    bias: fx.Node | None
    variant: str
    d_out: int
    d_in: int
    r: int


def _shape(node: fx.Node) -> tuple | None:
    val = gv.value(node)
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _has_no_bias(linear: fx.Node) -> bool:
    bias = linear.args[2] if len(linear.args) > 2 else linear.kwargs.get("bias")
    return bias is None


def _norm_arguments(node: fx.Node) -> tuple[object, object, bool, object]:
    """``(ord, dim, keepdim, dtype)`` of a norm call in any of its spellings."""
    if node.op == "call_function" and node.target in (torch.linalg.norm, torch.linalg.vector_norm):
        names = ("ord", "dim", "keepdim")
        default_ord = None if node.target is torch.linalg.norm else 2
    else:  # torch.norm / Tensor.norm
        names = ("p", "dim", "keepdim")
        default_ord = "fro"
    values = dict(zip(names, node.args[1:]))
    values.update({k: v for k, v in node.kwargs.items() if k in names})
    return (
        values.get(names[0], default_ord),
        values.get("dim"),
        bool(values.get("keepdim", False)),
        node.kwargs.get("dtype"),
    )


def _is_row_l2_norm(node: fx.Node) -> bool:
    order, dim, keepdim, dtype = _norm_arguments(node)
    return order in (None, 2, 2.0, "fro") and dim in (1, -1, (1,), (-1,), [1], [-1]) and not keepdim and dtype is None


def _require_row_l2_norm(node: fx.Node) -> None:
    order, dim, keepdim, dtype = _norm_arguments(node)
    _require(
        _is_row_l2_norm(node),
        f"the norm is not the row-wise L2 norm (dim=1): ord={order!r}, dim={dim!r}, keepdim={keepdim}, dtype={dtype}",
    )


def _canonical_weight(node: fx.Node) -> tuple[fx.Node, bool]:
    """``(stored weight, transposed?)`` for a weight operand ``W`` or ``W.T`` (through casts)."""
    node = gv.producer(node)
    if gv.kind_of(node) == gv.TRANSPOSE:
        return gv.producer(node.args[0]), True
    return node, False


def _require_identity_from_this_graph(eye: fx.Node, d_in: int) -> None:
    """PEFT builds the dense product from ``torch.eye(d_in)``. An identity-shaped graph input there
    means the graph was split between the two (a DDP bucket boundary, say): its values cannot be
    checked, so the region is reported, not rewritten."""
    if gv.kind_of(eye) == gv.EYE:
        return
    if eye.op == "placeholder" and _shape(eye) == (d_in, d_in):
        raise NoMatch(
            f"the [{d_in}, {d_in}] matrix that lora_A is applied to ({eye.name}) comes from another graph: "
            "the graph was split between PEFT's torch.eye and the norm (under DDP, at a gradient-bucket "
            "boundary; torch._dynamo.config.optimize_ddp='no_optimization' or 'python_reducer' keeps it whole)"
        )
    raise NoMatch(f"the dense product is built from {eye.name}, not from torch.eye({d_in})")


def _check_norm(nodes: dict[str, fx.Node]) -> dict:
    eye, A, B, m = nodes["eye"], nodes["A"], nodes["B"], nodes["m"]
    a_shape, b_shape, m_shape = _shape(A), _shape(B), _shape(m)
    _require(a_shape is not None and len(a_shape) == 2, "lora_A is not a 2-D tensor")
    r, d_in = a_shape
    _require(b_shape is not None and len(b_shape) == 2 and b_shape[1] == r, "lora_B does not chain with lora_A")
    d_out = b_shape[0]
    _require_identity_from_this_graph(eye, d_in)
    eye_n = eye.args[0] if eye.args else eye.kwargs.get("n")
    eye_m = eye.args[1] if len(eye.args) > 1 else eye.kwargs.get("m")
    _require(eye_n == d_in and eye_m in (None, d_in), f"eye({eye_n}) is not the identity of lora_A's {d_in} inputs")
    _require(_has_no_bias(nodes["a_eye"]) and _has_no_bias(nodes["dense"]), "a LoRA linear has a bias (lora_bias)")
    scaling = gv.scale_factor(nodes["scaled"], nodes["dense_t"])
    _require(scaling is not None, "the scaling of the dense product is not a number")
    _require_row_l2_norm(nodes["norm"])
    weight, fan_in_fan_out = _canonical_weight(nodes["W"])
    w_shape = _shape(weight)
    expected = (d_in, d_out) if fan_in_fan_out else (d_out, d_in)
    _require(w_shape == expected, f"base weight shape {w_shape} does not match the LoRA shapes {expected}")
    _require(m_shape == (d_out,), f"magnitude shape {m_shape} is not ({d_out},)")
    row = nodes["g_row"]
    _require(tuple(row.args[1:]) in ((1, -1), ((1, -1),)), "g = m / norm is not reshaped with .view(1, -1)")
    return dict(weight=weight, fan_in_fan_out=fan_in_fan_out, scaling=scaling, d_out=d_out, d_in=d_in, r=r)


def _classify_base(nodes: dict[str, fx.Node], weight: fx.Node, fan_in_fan_out: bool, d_out: int):
    """``(base, bias, variant)`` arguments of dora_fx.compose for PEFT's base term."""
    base, result = nodes.get("base"), nodes["result"]
    if base is None:
        return None, None, "reused base"
    kind = gv.kind_of(base)
    if kind == gv.SUB and len(base.args) == 2 and all(isinstance(a, fx.Node) for a in base.args):
        _require(gv.producer(base.args[0]) is result, "base = a - b where a is not the base layer's result")
        bias = gv.producer(base.args[1])
        _require(_shape(bias) == (d_out,), f"base = result - b where b has shape {_shape(bias)}, not ({d_out},)")
        return None, bias, "reused base, bias"
    if kind == gv.LINEAR:
        _require(_has_no_bias(base), "the recomputed base GEMM has a bias")
        _require(
            gv.producer(base.args[0]) is gv.producer(nodes["a_x"].args[0]),
            "the recomputed base GEMM reads another input than the LoRA path",
        )
        _require(
            _canonical_weight(base.args[1]) == (weight, fan_in_fan_out),
            "the recomputed base GEMM uses another weight than the norm",
        )
        return base, None, "recomputed base (dropout)"
    raise NoMatch(f"the base term is {base.name} ({kind}), not result, result - bias or linear(x, W)")


def _check_compose(nodes: dict[str, fx.Node], norm_info: dict) -> tuple[fx.Node | None, fx.Node | None, str]:
    _require(_has_no_bias(nodes["a_x"]) and _has_no_bias(nodes["lora"]), "a LoRA linear has a bias (lora_bias)")
    g_m1 = nodes["g_m1"]
    _require(gv.scalar_operand(g_m1) == 1.0 and g_m1.args[1] == 1, "the base factor is not g - 1")
    out_scaling = gv.scale_factor(nodes["t_lora_s"], nodes["t_lora"])
    _require(
        out_scaling is not None and out_scaling == norm_info["scaling"],
        f"the output's scaling {out_scaling} differs from the norm's scaling {norm_info['scaling']}",
    )
    result_shape = _shape(nodes["result"])
    _require(
        result_shape is not None and result_shape[-1] == norm_info["d_out"] and _shape(nodes["lora"]) == result_shape,
        f"result {result_shape} and lora {_shape(nodes['lora'])} are not [..., {norm_info['d_out']}]",
    )
    return _classify_base(nodes, norm_info["weight"], norm_info["fan_in_fan_out"], norm_info["d_out"])


# Replaced nodes that compute the DoRA output from its inputs: dora_fx.compose differentiates each
# input it reads, so none of them may reach these nodes through a .detach().
_COMPOSITION = ("g", "g_row", "g_m1", "t_base", "t_lora", "t_lora_s", "dora", "out")


def _requires_grad(node: fx.Node) -> bool:
    val = gv.value(node)
    return isinstance(val, torch.Tensor) and val.requires_grad


def _check_gradients(nodes: dict[str, fx.Node]) -> None:
    """The rewrite keeps every gradient of the graph: ``.detach()`` is looked through when matching,
    so check here that detaching happens exactly where the rewritten ops assume it.

    The rewritten norm has no gradient (PEFT detaches the norm), so the norm that ``g`` reads must not
    require one; and the compose ops give each of their inputs a gradient, so none may be detached on
    its way into the composition.
    """
    norm_as_read = nodes["g"].args[1]
    _require(
        not _requires_grad(norm_as_read),
        "the weight norm is not detached: it would receive a gradient, which dora_fx's norm does not give",
    )
    region = set(nodes.values())
    for name in _COMPOSITION:
        for arg in nodes[name].all_input_nodes:
            source = gv.producer(arg)
            if arg is norm_as_read or source not in region:
                continue
            _require(
                _requires_grad(arg) or not _requires_grad(source),
                f"{source.name} is detached where the DoRA output reads it ({arg.name}): "
                "the rewrite would give it a gradient",
            )


def _check_exclusive(nodes: dict[str, fx.Node]) -> None:
    """Each replaced value must feed only the region; else the rewrite would not remove it."""
    region = set(nodes.values())
    for name in _INTERIOR:
        node = nodes.get(name)
        if node is None:
            continue
        outside = [u for u in gv.real_users(node) if u not in region]
        if outside:
            what = "the dense product" if name in _DENSE_PRODUCT else "an intermediate of the DoRA output"
            raise NoMatch(f"{what} ({node.name}) is also used by {outside[0].name} outside the DoRA region")
    if "base" in nodes and gv.kind_of(nodes["base"]) == gv.SUB:
        outside = [u for u in gv.real_users(nodes["base"]) if u not in region]
        if outside:
            raise NoMatch(f"result - bias ({nodes['base'].name}) is also used by {outside[0].name}")


def match_region(anchor: fx.Node) -> Region:
    """The DoRA region around norm node ``anchor``; raises :class:`NoMatch` with the reason."""
    norm_area = gv.neighbourhood(anchor, up=6, down=2)
    candidates = list(gv.match(NORM_PATTERN, norm_area, {"norm": anchor}))
    if not candidates:
        if next(gv.match(NORM_INPUT_PATTERN, norm_area, {"norm": anchor}), None) is not None:
            _require_row_l2_norm(anchor)
            users = ", ".join(sorted(u.name for u in gv.real_users(anchor))) or "nothing"
            raise NoMatch(f"the norm of W + s * (B A) is used by {users}, not as (m / norm).view(1, -1)")
        has_eye = any(gv.kind_of(n) == gv.EYE for n in norm_area)
        raise NoMatch("the norm's input is not W + s * linear(linear(eye, A), B).T", report=has_eye)
    failures = []
    for norm_nodes in candidates:
        try:
            norm_info = _check_norm(norm_nodes)
        except NoMatch as exc:
            failures.append(exc)
            continue
        pinned = {k: norm_nodes[k] for k in ("g_row", "A", "B")}
        compose_area = gv.neighbourhood(norm_nodes["g_row"], up=3, down=4)
        found = False
        for pattern in (COMPOSE_PATTERN, COMPOSE_REUSED_RESULT_PATTERN):
            for compose_nodes in gv.match(pattern, compose_area, pinned):
                found = True
                nodes = {**norm_nodes, **compose_nodes}
                try:
                    base, bias, variant = _check_compose(nodes, norm_info)
                    _check_exclusive(nodes)
                    _check_gradients(nodes)
                except NoMatch as exc:
                    failures.append(exc)
                    continue
                if norm_info["fan_in_fan_out"]:
                    variant += ", fan_in_fan_out"
                return Region(nodes=nodes, base=base, bias=bias, variant=variant, **norm_info)
        if not found:
            failures.append(NoMatch("g = m / norm is not used as result + (g - 1) * base + g * lora * s"))
    raise failures[0]


def _norm_value(region: Region) -> torch.Tensor:
    """``meta["val"]`` of the new norm node: what the op's fake implementation returns, built directly
    (running the op under fake mode would trace its autograd and reference math, ~5 ms a region)."""
    weight, lora_A, lora_B = (gv.value(n) for n in (region.weight, region.nodes["A"], region.nodes["B"]))
    with weight.fake_mode:
        return weight.new_empty((region.d_out,), dtype=dtypes.norm_dtype(weight, lora_A, lora_B))


def _compose_value(region: Region) -> torch.Tensor:
    """``meta["val"]`` of the composed output (see :func:`_norm_value`)."""
    result, lora, magnitude = (gv.value(region.nodes[k]) for k in ("result", "lora", "m"))
    base = None if region.base is None else gv.value(region.base)
    with result.fake_mode:
        return torch.empty_like(result, dtype=dtypes.compose_dtype(result, base, lora, magnitude))


def _region_nodes(region: Region) -> set[fx.Node]:
    """Every node the rewrite replaces, casts between them included (for the audit's code dump)."""
    nodes = {region.nodes[n] for n in (*_INTERIOR, "out") if n in region.nodes}
    if region.bias is not None:
        nodes.add(region.nodes["base"])
    for node in list(nodes):
        for arg in node.all_input_nodes:
            nodes.update(gv.transparent_chain(arg))
    return nodes


# The fewest rows (tokens in the batch) at which a training graph keeps the layer's output for the
# magnitude's gradient (``compose_saving_output``) rather than ``adapted`` (``compose_with_adapted``).
# Keeping the output saves an activation of rows x d_out per layer, but costs each layer's backward one
# ``zero_magnitude_grad`` call (about 40 µs of host time on the H200 machine) and two more kernel
# launches (``s·h`` and its gradient). Where the host sets the pace of the step, that host time is
# the step's time, and the activation is small: at 512 tokens of the 8B-shaped stack (4 layers) the
# 28 ``adapted`` tensors are 168 MiB, and keeping them took the train step from 1.60x to 1.35-1.38x
# plain LoRA's (benchmarks/README.md, session 11). Its step takes about 7 ms of GPU time at 512 tokens
# and 44 ms at 4096, against some 12 ms of host time: the GPU sets the pace from about 1024 tokens on
# (an estimate, not measured there), where the host time is hidden and the memory counts. Rows that
# are symbolic (dynamic shapes) count as many. Tests lower it to exercise the other path.
KEEP_OUTPUT_MIN_ROWS = 1024


def _keeps_output_pays(region: Region) -> bool:
    """Whether this layer's output has enough rows (all dimensions but the last) that keeping it in
    place of ``adapted`` saves more than the host time it costs (:data:`KEEP_OUTPUT_MIN_ROWS`)."""
    leading = gv.value(region.nodes["out"]).shape[:-1]
    symbolic = not all(isinstance(size, int) for size in leading)
    return symbolic or math.prod(leading) >= KEEP_OUTPUT_MIN_ROWS


_COMPOSE_OPS = (
    torch.ops.dora_fx.compose.default,
    torch.ops.dora_fx.compose_with_adapted.default,
    torch.ops.dora_fx.compose_saving_output.default,
)


def host_paced(gm: fx.GraphModule) -> bool:
    """Whether ``gm`` (with the graphs nested in it) has DoRA compositions and every one of them has
    static rows fewer than :data:`KEEP_OUTPUT_MIN_ROWS`: a step whose pace the host's kernel launches
    set, not the GPU."""
    rows = [
        gv.value(node.args[0]).shape[:-1]
        for graph_module in gm.modules()
        if isinstance(graph_module, fx.GraphModule)
        for op in _COMPOSE_OPS
        for node in graph_module.graph.find_nodes(op="call_function", target=op)
    ]
    return bool(rows) and all(
        all(isinstance(size, int) for size in leading) and math.prod(leading) < KEEP_OUTPUT_MIN_ROWS
        for leading in rows
    )


def _is_graph_input(node: fx.Node) -> bool:
    """Whether ``node`` is a tensor the graph receives (an input, or a parameter of ``gm``), as
    opposed to one it computes (a dequantized weight, say)."""
    return node.op in ("placeholder", "get_attr")


def _compose_call(graph: fx.Graph, region: Region, norm: fx.Node) -> tuple[object, tuple]:
    """``(op, args)`` of the composition, inserting what its arguments need into ``graph``.

    Where the magnitude gets no gradient, ``compose``: its backward keeps no activation. Where it
    does, for PEFT's reused base without bias (``out = g·adapted``) over a weight the graph receives
    and a LoRA output that only the region reads, ``compose_saving_output``: its backward keeps
    ``out``, which the layer's consumer usually keeps anyway, and ``W`` (for the magnitude's gradient
    where ``m = 0``), which then costs nothing. It takes the LoRA output with ``s`` moved onto the
    ``r``-wide activation (:func:`_scaled_lora`), so that the base GEMM and ``lora_B`` get one
    gradient tensor between them. Over a bitsandbytes 4-bit base it keeps the packed weight in place
    of ``W`` (:func:`_kept_weight`). Any other ``W`` the graph computes (an 8-bit or torchao
    dequantization) would be kept as a dense activation of its own, so there, as otherwise and for
    outputs of fewer than :data:`KEEP_OUTPUT_MIN_ROWS` rows, ``compose_with_adapted``, which keeps
    ``adapted = base + s·lora``.
    """
    nodes = region.nodes
    compose_args = (nodes["result"], region.base, region.bias, nodes["lora"], nodes["m"], norm, region.scaling)
    if not _magnitude_needs_grad(region):
        return torch.ops.dora_fx.compose.default, compose_args
    kept_weight = _kept_weight(region)
    if (
        region.base is None
        and region.bias is None
        and kept_weight is not None
        and set(gv.real_users(nodes["lora"])) <= set(nodes.values())
        and _keeps_output_pays(region)
    ):
        lora_input = nodes["a_x"].args[0]  # as lora_A reads it: kept for lora_A's gradient anyway
        return torch.ops.dora_fx.compose_saving_output.default, (
            nodes["result"], _scaled_lora(graph, region), nodes["m"], norm, region.scaling,
            lora_input, kept_weight[0], nodes["A"], nodes["B"], region.fan_in_fan_out, *kept_weight[1:],
        )
    return torch.ops.dora_fx.compose_with_adapted.default, compose_args


def _kept_weight(region: Region) -> tuple | None:
    """What ``compose_saving_output`` keeps of ``W`` for the features with ``m = 0``, as its arguments
    from ``weight`` on: ``W`` itself where the graph receives it; for a bitsandbytes 4-bit ``W`` the
    graph dequantizes, the packed weight and its block scales (the dequantization is then left
    unread and erased). None for any other computed ``W``, which would be kept as a dense activation."""
    if _is_graph_input(region.weight):
        return (region.weight,)
    found = quantized_norm.quantized_norm(region.weight, region.fan_in_fan_out)
    if found is None or found.op is not torch.ops.dora_fx.weight_norm_4bit.default:
        return None
    packed, absmax, blocksize, quant_type, _shape, dtype = found.weight_args
    return packed, absmax, blocksize, quant_type, dtype


def _scaled_lora(graph: fx.Graph, region: Region) -> fx.Node:
    """``B·(s·h)`` for PEFT's ``lora = B·h`` (``h = A·x``), inserted at the insertion point.

    ``g·s·lora = g·(B·(s·h))``: with ``s`` applied to the ``r``-wide ``h`` rather than in the
    composition, the LoRA output's gradient is ``g·d``, the base output's. The cost is one more
    rounding of ``h`` in its dtype (none where ``s`` is a power of two, as with PEFT's default
    ``lora_alpha = 2r``).
    """
    lora = region.nodes["lora"]
    h = lora.args[0]
    scaled_h = graph.call_function(operator.mul, (h, region.scaling))
    scaled = graph.call_function(lora.target, (scaled_h, *lora.args[1:]), dict(lora.kwargs))
    for node, like in ((scaled_h, h), (scaled, lora)):
        value = gv.value(like)
        with value.fake_mode:
            node.meta.update(val=torch.empty_like(value), nn_module_stack=lora.meta.get("nn_module_stack", {}))
    return scaled


def _magnitude_needs_grad(region: Region) -> bool:
    """Whether this graph differentiates the output with respect to the magnitude (``False`` under
    ``torch.no_grad()`` even though the parameter requires grad)."""
    return gv.value(region.nodes["out"]).requires_grad and gv.value(region.nodes["m"]).requires_grad


def rewrite(gm: fx.GraphModule, region: Region) -> tuple[RewrittenRegion, list[fx.Node]]:
    """Replace ``region`` in ``gm`` by the dora_fx ops: returns the record of the rewrite and the
    nodes it stopped reading (erased later where nothing else reads them)."""
    graph = gm.graph
    nodes = region.nodes
    out = nodes["out"]
    roles = {node: _ROLE_NAMES.get(role, role) for role, node in nodes.items()} | {region.weight: "weight"}
    if region.bias is not None:
        roles[region.bias] = "bias"
    before = RegionCode.of(_region_nodes(region), out, roles)
    # The norm is reused while W, A and B are unchanged: every eval call, every gradient-accumulation
    # micro-batch and activation-checkpoint recomputation between two optimizer steps.
    norm_args = (region.weight, nodes["A"], nodes["B"], region.scaling, region.fan_in_fan_out)
    norm_value = _norm_value(region)
    with graph.inserting_before(nodes["norm"]):
        norm_call = new_norm = graph.call_function(torch.ops.dora_fx.cached_weight_norm.default, norm_args)
        if gv.value(out).requires_grad:  # PEFT's norm is detached; the cached op has no autograd of its own
            new_norm = graph.call_method("detach", (norm_call,))
    for node in {norm_call, new_norm}:
        node.meta.update(val=norm_value, nn_module_stack=nodes["norm"].meta.get("nn_module_stack", {}))
    meta = {"nn_module_stack": out.meta.get("nn_module_stack", {}), "stack_trace": out.meta.get("stack_trace")}
    out_value = _compose_value(region)
    with graph.inserting_before(out):
        composed = graph.call_function(*_compose_call(graph, region, new_norm))
        if composed.target is torch.ops.dora_fx.compose_with_adapted.default:
            with out_value.fake_mode:  # adapted: the output's shape, dtype and layout
                composed.meta.update(val=(out_value, torch.empty_like(out_value)), **meta)
            new_out = graph.call_function(operator.getitem, (composed, 0))
        else:
            new_out = composed
    new_out.meta.update(val=out_value, **meta)
    if composed.target is not torch.ops.dora_fx.compose.default:  # its backward keeps the output or adapted
        for node in {composed, new_out}:
            recompute.tag_kept_output(node, region=f"{module_path(new_out)}:{composed.name}")
    out.replace_all_uses_with(new_out)
    unread = [
        *_region_nodes(region), nodes["lora"], nodes["W"], *gv.transparent_chain(nodes["W"]),
        *region.weight.all_input_nodes,
    ]
    inserted = [norm_call, new_norm]
    if composed.target is torch.ops.dora_fx.compose_saving_output.default:
        scaled_lora = composed.args[1]
        inserted += [scaled_lora.args[0], scaled_lora]
    inserted += [composed, new_out]
    dense = gv.value(nodes["dense"])
    record = RewrittenRegion(
        module=module_path(new_out),
        d_out=region.d_out,
        d_in=region.d_in,
        r=region.r,
        scaling=gv.number_hint(region.scaling),
        dtype=str(gv.value(nodes["result"]).dtype).removeprefix("torch."),
        variant=region.variant,
        dense_bytes_avoided=region.d_out * region.d_in * dense.element_size(),
        before=before,
        norm=norm_call,
        new_nodes=list(dict.fromkeys(inserted)),
        output=new_out,
        input_names=roles,
    )
    return record, unread


def _compose_dtype_matches(region: Region) -> bool:
    """dora_fx.compose promotes like PEFT; guard against a graph whose output dtype says otherwise."""
    nodes = region.nodes
    want = gv.value(nodes["out"]).dtype
    vals = [gv.value(nodes[k]) for k in ("result", "lora", "m")]
    base = gv.value(region.base) if region.base is not None else None
    return dtypes.compose_dtype(vals[0], base, vals[1], vals[2]) == want


class DoraLinearPass:
    """The pass that rewrites every PEFT DoRA Linear region of a graph (see the module's docstring)."""

    name = "dora_linear"

    def run(self, gm: fx.GraphModule, rewrites: GraphRewrites) -> PassResult:
        near_misses = []
        explained_eyes: set[fx.Node] = set()
        matched = 0
        for anchor in [n for n in gm.graph.nodes if gv.kind_of(n) == gv.NORM]:
            where = f"{module_path(anchor)} ({anchor.name})"
            try:
                region = match_region(anchor)
                _require(_compose_dtype_matches(region), "the output dtype differs from dora_fx.compose's promotion")
            except NoMatch as exc:
                layer = module_class(anchor)
                if not exc.report and layer.startswith("Dora") and layer != "DoraLinearLayer":
                    exc = NoMatch(f"PEFT's {layer} is not rewritten (only DoRA Linear layers are): {exc.reason}")
                if exc.report:
                    near_misses.append(NearMiss(where, exc.reason))
                    explained_eyes |= {n for n in gv.neighbourhood(anchor, up=6, down=0) if gv.kind_of(n) == gv.EYE}
                continue
            record, unread = rewrite(gm, region)
            rewrites.regions.append(record)
            rewrites.maybe_dead += unread
            explained_eyes.add(region.nodes["eye"])  # replaced, erased by the dead-code pass
            matched += 1
        for eye in [n for n in gm.graph.nodes if gv.kind_of(n) == gv.EYE and n not in explained_eyes]:
            if any(gv.kind_of(u) == gv.LINEAR for u in gv.real_users(eye)):
                near_misses.append(
                    NearMiss(
                        f"{module_path(eye)} ({eye.name})",
                        "eye() feeds a LoRA linear but no matched DoRA norm (a graph break between them?)",
                    )
                )
        return PassResult(matched, near_misses)
