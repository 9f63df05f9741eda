"""The graph passes in order: match and rewrite DoRA regions (normalising op spellings on the way),
give the norms over quantized weights their own op, remove what became dead, and check the graph.

Dynamo puts the bodies of higher-order ops (``torch.utils.checkpoint`` regions, ``torch.cond``
branches, ...) into sub-GraphModules of the graph it hands over; each of them is rewritten as well,
so that a checkpointed layer's forward and its recomputation both use the factored norm.
"""

from __future__ import annotations

import logging
import time

import torch.fx as fx

from dora_fx.passes.dead_code import DeadCodePass
from dora_fx.passes.dora_linear import DoraLinearPass
from dora_fx.passes.quantized_norm import QuantizedNormPass
from dora_fx.passes.records import GraphRewrites, Pass
from dora_fx.report import GraphReport

log = logging.getLogger(__name__)

# The quantized norm replaces norms the DoRA pass emitted, and must run before the backend lifts the
# remaining cached_weight_norm nodes into graph inputs (dora_fx.passes.lift_norms).
PASSES: tuple[Pass, ...] = (DoraLinearPass(), QuantizedNormPass(), DeadCodePass())


def _graphs(gm: fx.GraphModule) -> list[fx.GraphModule]:
    """``gm`` and every GraphModule nested in it (higher-order-op bodies)."""
    return [m for m in gm.modules() if isinstance(m, fx.GraphModule)]


def run_passes(gm: fx.GraphModule, graph_id: int) -> GraphReport:
    """Rewrite ``gm`` (and the graphs nested in it) in place with :data:`PASSES`, in order, and report
    what was done."""
    start = time.perf_counter()
    report = GraphReport(graph_id, pass_counts=dict.fromkeys((p.name for p in PASSES), 0))
    for graph_module in _graphs(gm):
        rewrites = GraphRewrites()
        for graph_pass in PASSES:
            result = graph_pass.run(graph_module, rewrites)
            report.pass_counts[graph_pass.name] += result.matched
            report.near_misses += result.near_misses
        if rewrites.regions:
            graph_module.graph.lint()
            graph_module.recompile()
        for region in rewrites.regions:
            report.rewrites.append(region.report())
            log.debug("dora_fx: rewrote %s", report.rewrites[-1])
    report.pass_seconds = time.perf_counter() - start
    return report
