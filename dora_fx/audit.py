"""Audit what the dora backend does to a model, without running a full compile.

``audit(model, *args, **kwargs)`` traces ``model`` once with Dynamo, runs the dora_fx passes and
returns the :class:`~dora_fx.report.Report`; ``dump_dir`` writes each rewritten region's FX code
before and after the rewrite, for review. The graph runs eagerly afterwards (no Inductor), so this
is quick even on a CPU.

Because it knows the model, the audit also lists the PEFT DoRA layers that ran outside every
compiled graph (``report.not_seen``): where Dynamo breaks the graph around a layer, that layer runs
eagerly, unrewritten, and no backend ever hears of it. Each comes with the graph breaks Dynamo
recorded during the audit's run.
"""

from __future__ import annotations

import collections
import itertools
import pathlib
import re

import torch
import torch.fx as fx

from dora_fx.backend import DoraBackend, graph_break_counts
from dora_fx.report import Report, UnseenLayer


def audit(model: torch.nn.Module, *args, dump_dir: str | pathlib.Path | None = None, **kwargs) -> Report:
    """Trace ``model(*args, **kwargs)`` under the dora backend and return what it rewrote, what it
    nearly rewrote, and which DoRA layers of ``model`` ran outside every compiled graph."""
    graph_inputs = _StorageRecorder()
    backend = DoraBackend(inner=graph_inputs.run_eagerly)
    torch._dynamo.reset()
    breaks_before = graph_break_counts()
    try:
        torch.compile(model, backend=backend)(*args, **kwargs)
    finally:
        breaks_now = graph_break_counts() - breaks_before
        torch._dynamo.reset()
    report = backend.report
    report.graph_breaks = dict(breaks_now)  # also those after the last compiled graph
    reason = "not seen by the backend — Dynamo ran it outside a compiled graph; " + _describe(breaks_now)
    report.not_seen = [
        UnseenLayer(path, reason)
        for path, magnitudes in dora_layers(model).items()
        if not any(_storage(m) in graph_inputs.seen for m in magnitudes)
    ]
    if dump_dir is not None:
        write_region_code(report, pathlib.Path(dump_dir))
    return report


class _StorageRecorder:
    """An inner "compiler" that runs each graph as it is and notes the storages of the tensors every
    call of it reads (inputs at run time, attributes at compile time).

    Which DoRA layer a graph computed is known only at run time: with Dynamo's default
    ``inline_inbuilt_nn_modules`` one graph, compiled for the first decoder layer, serves every layer
    whose parameters it is called with. A layer whose magnitude reached no graph ran eagerly."""

    def __init__(self):
        self.seen: set[int] = set()

    def run_eagerly(self, gm: fx.GraphModule, example_inputs: list):
        self.seen.update(_storage(t) for t in itertools.chain(gm.parameters(), gm.buffers()))

        def run(*args):
            self.seen.update(_storage(a) for a in args if isinstance(a, torch.Tensor))
            return gm.forward(*args)

        return run


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def dora_layers(model: torch.nn.Module) -> dict[str, list[torch.Tensor]]:
    """``{path: magnitude vectors}`` of ``model``'s PEFT LoRA layers that compute DoRA in their current
    state (an active adapter with ``use_dora``, adapters enabled, not merged)."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return {}
    layers = {}
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or module.disable_adapters or module.merged:
            continue
        magnitudes = [
            module.lora_magnitude_vector[a].weight
            for a in module.active_adapters
            if module.use_dora.get(a, False) and a in module.lora_magnitude_vector
        ]
        if magnitudes:
            layers[name] = magnitudes
    return layers


def _describe(graph_breaks: collections.Counter) -> str:
    """Dynamo's graph-break messages, shortened to their first line, explanation and hint."""
    if not graph_breaks:
        return "Dynamo recorded no graph break (a skipped or disabled frame, or the recompile limit?)"
    parts = []
    for message, count in graph_breaks.items():
        lines = [line.strip() for line in message.splitlines() if line.strip()]
        detail = [line for line in lines[1:] if line.startswith(("Explanation:", "Hint:"))]
        parts.append(" ".join([f"{lines[0]} ({count}x)", *detail]) if lines else message)
    return "graph break reasons: " + "; ".join(parts)


def write_region_code(report: Report, directory: pathlib.Path) -> list[pathlib.Path]:
    """Write ``<n>_<module>.before.py`` and ``.after.py`` per rewrite; returns the paths written."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, rewrite in enumerate(report.rewrites):
        stem = f"{index:03d}_{re.sub(r'[^A-Za-z0-9_.-]', '_', rewrite.module)}"
        for suffix, code in (("before", rewrite.code_before), ("after", rewrite.code_after)):
            path = directory / f"{stem}.{suffix}.py"
            path.write_text(f"# {rewrite.module}: {rewrite.variant}\n{code}\n")
            paths.append(path)
    return paths
