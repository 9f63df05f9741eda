"""What the passes hand to each other and to the pipeline.

Each pass of :mod:`dora_fx.passes.pipeline` runs over one graph with a :class:`GraphRewrites` that
the passes before it filled: the DoRA regions rewritten so far (:class:`RewrittenRegion`, which a
later pass may refine) and the nodes that a rewrite stopped reading, which the dead-code pass erases
where nothing else reads them. A pass returns what it matched (:class:`PassResult`).
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import torch.fx as fx

from dora_fx.report import NearMiss, RegionCode, Rewrite


@dataclasses.dataclass
class PassResult:
    """How many places a pass rewrote (or, for the dead-code pass, how many nodes it erased), and the
    places that it left alone although they nearly matched."""

    matched: int
    near_misses: list[NearMiss] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class RewrittenRegion:
    """One rewritten DoRA region: the report's fields, the region's code as it was, and the new nodes
    (rendered as the code after the rewrite once every pass has run)."""

    module: str
    d_out: int
    d_in: int
    r: int
    scaling: float
    dtype: str
    variant: str
    dense_bytes_avoided: int
    before: RegionCode
    norm: fx.Node  # the node computing the norm, which a later pass may replace
    new_nodes: list[fx.Node]  # the norm among them
    output: fx.Node
    input_names: dict[fx.Node, str]

    def refine_norm(self, label: str, norm: fx.Node | None = None) -> None:
        """Record that a later pass replaced the norm node by ``norm`` (``None``: kept it), described
        by ``label`` in the report's variant."""
        if norm is not None:
            self.new_nodes = [norm if node is self.norm else node for node in self.new_nodes]
            self.norm = norm
        self.variant = f"{self.variant}, {label}"

    def report(self) -> Rewrite:
        """The report's record of this rewrite, with the new nodes' code as they are now."""
        return Rewrite(
            module=self.module,
            d_out=self.d_out,
            d_in=self.d_in,
            r=self.r,
            scaling=self.scaling,
            dtype=self.dtype,
            variant=self.variant,
            dense_bytes_avoided=self.dense_bytes_avoided,
            before=self.before,
            after=RegionCode.of(set(self.new_nodes), self.output, self.input_names),
        )


@dataclasses.dataclass
class GraphRewrites:
    """What the passes over one graph have done so far."""

    regions: list[RewrittenRegion] = dataclasses.field(default_factory=list)
    maybe_dead: list[fx.Node] = dataclasses.field(default_factory=list)


class Pass(Protocol):
    """One step of the pipeline: rewrites ``gm`` in place, and records what it did in ``rewrites``."""

    name: str

    def run(self, gm: fx.GraphModule, rewrites: GraphRewrites) -> PassResult: ...
