"""The audit report: what each backend call rewrote, where, what it saved, and the near-misses."""

from __future__ import annotations

import dataclasses
import functools
import json
import re

import torch.fx as fx

from dora_fx.passes.graph_view import topological_order

_PATH_PART = re.compile(r"\['([^']+)'\]|\[(\d+)\]|\.(\w+)|^(\w+)")
_NOT_PATH = {"L", "self", "__dict__", "_modules", "fn"}


def module_path(node: fx.Node) -> str:
    """Dotted path of the innermost module that ``node`` was traced in (from ``nn_module_stack``)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "<top>"
    raw = list(stack.values())[-1][0]
    parts = ["".join(groups) for groups in _PATH_PART.findall(raw)]
    return ".".join(p for p in parts if p and p not in _NOT_PATH) or "<top>"


def module_class(node: fx.Node) -> str:
    """Class name of the innermost module that ``node`` was traced in ("" when unknown)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    cls = list(stack.values())[-1][1]
    return getattr(cls, "__name__", str(cls).rsplit(".", 1)[-1].strip("'>"))


@dataclasses.dataclass(frozen=True, eq=False)
class RegionCode:
    """A few nodes of a graph as a stand-alone FX graph, rendered as Python source when first read.

    The nodes are copied when the passes run, because the graph changes afterwards (the dead-code
    pass erases the replaced region, the backend lifts norms, the inner compiler runs). Rendering is
    left for later: it costs more than the copy (together about 3 ms a region, a quarter of the
    passes' time on a tiny Llama), and only the audit's code dump reads the code.
    """

    graph: fx.Graph

    @classmethod
    def of(cls, nodes: set[fx.Node], output: fx.Node, input_names: dict[fx.Node, str]) -> RegionCode:
        """``nodes`` as a graph that returns ``output``. Values flowing in from outside ``nodes`` become
        placeholders, named by ``input_names`` where it has them (Dynamo's own names for parameters
        run to a hundred characters). The copies keep no ``meta``, so that no example value of the
        compiled graph stays alive with the report."""
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}

        def lookup(node: fx.Node) -> fx.Node:
            if node not in env:
                env[node] = graph.placeholder(input_names.get(node, node.name))
            return env[node]

        for node in topological_order(nodes):
            env[node] = graph.node_copy(node, lookup)
        graph.output(env[output])
        for node in graph.nodes:
            node.meta = {}
        return cls(graph)

    @functools.cached_property
    def code(self) -> str:
        return self.graph.python_code("self").src.strip()


@dataclasses.dataclass(frozen=True)
class Rewrite:
    """One rewritten DoRA region; ``before`` and ``after`` hold its FX code before and after the
    rewrite (``code_before`` and ``code_after`` render it)."""

    module: str
    d_out: int
    d_in: int
    r: int
    scaling: float
    dtype: str
    variant: str
    dense_bytes_avoided: int
    before: RegionCode | None = dataclasses.field(default=None, repr=False, compare=False)
    after: RegionCode | None = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def code_before(self) -> str:
        return "" if self.before is None else self.before.code

    @property
    def code_after(self) -> str:
        return "" if self.after is None else self.after.code

    def to_dict(self, code: bool = False) -> dict:
        """Plain data; ``code=True`` adds the FX code before and after."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("before", "after")}
        if code:
            data.update(code_before=self.code_before, code_after=self.code_after)
        return data


@dataclasses.dataclass(frozen=True)
class NearMiss:
    where: str
    reason: str


@dataclasses.dataclass(frozen=True)
class UnseenLayer:
    """A PEFT DoRA layer of the model that no graph handed to the backend contained (so it ran eagerly)."""

    module: str
    reason: str


@dataclasses.dataclass
class GraphReport:
    """One graph handed to the backend."""

    graph_id: int
    rewrites: list[Rewrite] = dataclasses.field(default_factory=list)
    near_misses: list[NearMiss] = dataclasses.field(default_factory=list)
    pass_seconds: float = 0.0
    # {pass name: places it rewrote (nodes erased, for the dead-code pass)}, in the order the passes ran
    pass_counts: dict[str, int] = dataclasses.field(default_factory=dict)
    # Inductor settings dora_fx chose for this graph (dora_fx.backend.HOST_PACED_INDUCTOR_CONFIG);
    # the user's mode and options, applied over them, are not listed
    inductor_config: dict[str, object] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Report:
    """All graphs one backend has compiled, in order, and the graph breaks Dynamo reported meanwhile.

    ``graph_breaks`` maps each of Dynamo's graph-break reasons to how often it occurred (Dynamo's
    ``counters["graph_break"]``, counted from the report's start). A break inside a DoRA layer also
    shows as a near-miss of that layer; the others (a base layer's own code, hooks) are only listed.

    ``not_seen`` lists the model's DoRA layers that were in none of these graphs. Only
    :func:`dora_fx.audit.audit` fills it, because only it knows the model (a backend sees graphs,
    never the modules Dynamo ran outside them); ``None`` means that nobody checked.
    """

    graphs: list[GraphReport] = dataclasses.field(default_factory=list)
    graph_breaks: dict[str, int] = dataclasses.field(default_factory=dict)
    not_seen: list[UnseenLayer] | None = None

    @property
    def rewrites(self) -> list[Rewrite]:
        return [r for g in self.graphs for r in g.rewrites]

    @property
    def near_misses(self) -> list[NearMiss]:
        return [m for g in self.graphs for m in g.near_misses]

    def to_dict(self, code: bool = False) -> dict:
        """Plain data for programs; ``code=True`` keeps each rewrite's FX code before and after."""
        graphs = [
            {
                "graph_id": g.graph_id,
                "rewrites": [r.to_dict(code) for r in g.rewrites],
                "near_misses": [dataclasses.asdict(m) for m in g.near_misses],
                "pass_seconds": g.pass_seconds,
                "inductor_config": dict(g.inductor_config),
            }
            for g in self.graphs
        ]
        return {
            "graphs": graphs,
            "total_rewrites": len(self.rewrites),
            "total_near_misses": len(self.near_misses),
            "total_dense_bytes_avoided": sum(r.dense_bytes_avoided for r in self.rewrites),
            "not_seen": None if self.not_seen is None else [dataclasses.asdict(u) for u in self.not_seen],
            "graph_breaks": dict(self.graph_breaks),
        }

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def __str__(self) -> str:
        return self.to_text()

    def to_text(self) -> str:
        rewrites, misses = self.rewrites, self.near_misses
        saved = sum(r.dense_bytes_avoided for r in rewrites)
        unseen = "" if self.not_seen is None else f"; {len(self.not_seen)} DoRA layer(s) not seen by the backend"
        lines = [
            f"dora_fx: {len(rewrites)} DoRA region(s) rewritten, {len(misses)} near-miss(es) "
            f"in {len(self.graphs)} graph(s){unseen}; dense B·A products avoided: {_mib(saved)} per forward"
        ]
        if rewrites:
            header = ("module", "d_out", "d_in", "r", "scaling", "dtype", "variant", "dense avoided")
            rows = [
                (r.module, r.d_out, r.d_in, r.r, f"{r.scaling:g}", r.dtype, r.variant, _mib(r.dense_bytes_avoided))
                for r in rewrites
            ]
            lines += ["", "rewritten:", *_table(header, rows)]
        chosen = [g for g in self.graphs if g.inductor_config]
        if chosen:
            lines += ["", "Inductor settings chosen for host-paced graphs (every DoRA layer under 1024 rows):"]
            lines += [f"  graph {g.graph_id}: {g.inductor_config}" for g in chosen]
        if misses:
            lines += ["", "near-misses (left to the inner compiler unchanged):"]
            lines += [f"  {m.where}: {m.reason}" for m in misses]
        if self.not_seen:
            lines += ["", "not rewritten, ran eagerly (grouped by reason):"]
            for reason in dict.fromkeys(u.reason for u in self.not_seen):
                lines += [f"  {reason}:", *(f"    {u.module}" for u in self.not_seen if u.reason == reason)]
        if self.graph_breaks:
            lines += ["", "graph breaks (Dynamo):"]
            lines += [f"  {count} x {reason.splitlines()[0]}" for reason, count in self.graph_breaks.items()]
        return "\n".join(lines)


def _mib(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _table(header: tuple, rows: list[tuple]) -> list[str]:
    cells = [tuple(map(str, header))] + [tuple(map(str, r)) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    fmt = "  " + "  ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*c).rstrip() for c in cells]
