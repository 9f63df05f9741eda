"""The graph passes in order: match and rewrite DoRA regions (normalising op spellings on the way),
then remove what became dead, and check the graph."""

from __future__ import annotations

import time

import torch.fx as fx

from dora_fx.passes import dora_linear
from dora_fx.report import GraphReport


def run_passes(gm: fx.GraphModule, graph_id: int) -> GraphReport:
    """Rewrite ``gm`` in place and report what was done."""
    start = time.perf_counter()
    rewrites, near_misses = dora_linear.run(gm)
    if rewrites:
        gm.graph.lint()
        gm.recompile()
    return GraphReport(graph_id, rewrites, near_misses, pass_seconds=time.perf_counter() - start)
