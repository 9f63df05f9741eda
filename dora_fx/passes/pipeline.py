"""The graph passes in order: match and rewrite DoRA regions (normalising op spellings on the way),
then remove what became dead, and check the graph.

Dynamo puts the bodies of higher-order ops (``torch.utils.checkpoint`` regions, ``torch.cond``
branches, ...) into sub-GraphModules of the graph it hands over; each of them is rewritten as well,
so that a checkpointed layer's forward and its recomputation both use the factored norm.
"""

from __future__ import annotations

import time

import torch.fx as fx

from dora_fx.passes import dora_linear
from dora_fx.report import GraphReport


def _graphs(gm: fx.GraphModule) -> list[fx.GraphModule]:
    """``gm`` and every GraphModule nested in it (higher-order-op bodies)."""
    return [m for m in gm.modules() if isinstance(m, fx.GraphModule)]


def run_passes(gm: fx.GraphModule, graph_id: int) -> GraphReport:
    """Rewrite ``gm`` (and the graphs nested in it) in place and report what was done."""
    start = time.perf_counter()
    report = GraphReport(graph_id)
    for graph_module in _graphs(gm):
        rewrites, near_misses = dora_linear.run(graph_module)
        if rewrites:
            graph_module.graph.lint()
            graph_module.recompile()
        report.rewrites += rewrites
        report.near_misses += near_misses
    report.pass_seconds = time.perf_counter() - start
    return report
