"""Erase the nodes that the rewrites stopped reading, where nothing else reads them.

torch.fx's ``Graph.eliminate_dead_code`` is not used: it would erase any unused node it takes for
pure, and it takes every ``call_method`` node for pure (an unused in-place ``x.add_(1)`` would go),
and it runs over the bodies of higher-order ops with that default (it takes no ``is_impure_node``
there). Dynamo hands over graphs of torch functions and methods, not functional ones, and leaves
their dead code to the inner compiler. So only the nodes the rewrites listed
(:attr:`~dora_fx.passes.records.GraphRewrites.maybe_dead`) are candidates.
"""

from __future__ import annotations

import torch.fx as fx

from dora_fx.passes import graph_view as gv
from dora_fx.passes.records import GraphRewrites, PassResult


class DeadCodePass:
    """Erases the listed nodes nobody uses any more, consumers first; counts the nodes erased."""

    name = "dead_code"

    def run(self, gm: fx.GraphModule, rewrites: GraphRewrites) -> PassResult:
        erased = 0
        for node in reversed(gv.topological_order(set(rewrites.maybe_dead))):
            if not node.users and node.op not in ("placeholder", "output"):
                gm.graph.erase_node(node)
                erased += 1
        rewrites.maybe_dead.clear()
        return PassResult(erased)
