"""Shared test helpers: run eager PEFT and a compiled model side by side and compare."""

from __future__ import annotations

import collections
import copy
import unittest.mock

import torch
import torch.fx as fx

import dora_fx
from dora_fx.passes import pipeline
from dora_fx.examples.models import Example


def differentiable_inputs(example: Example, gen: torch.Generator) -> dict:
    """Fresh inputs whose activations require grad (LMs get ``inputs_embeds``), so x gets a gradient."""
    inputs = example.make_inputs(gen)
    if "input_ids" in inputs:
        embeds = example.model.get_input_embeddings()(inputs.pop("input_ids")).detach()
        inputs["inputs_embeds"] = embeds
    return {k: v.detach().requires_grad_() for k, v in inputs.items()}


def _output(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.logits


def step(model, inputs: dict, seed: int = 0):
    """One forward and backward from a fixed RNG state: ``(output, {name: grad})``.

    The loss is a fixed random projection of the output, so every output element matters.
    """
    torch.manual_seed(seed)
    out = _output(model(**inputs))
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 7)).to(out)
    (out.float() * cotangent.float()).sum().backward()
    grads = {f"input.{k}": v.grad for k, v in inputs.items()}
    grads |= {n.removeprefix("_orig_mod."): p.grad for n, p in model.named_parameters() if p.requires_grad}
    return out.detach(), grads


def fresh(inputs: dict) -> dict:
    return {k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in inputs.items()}


def zero_grads(model) -> None:
    for p in model.parameters():
        p.grad = None


def op_counts(gm: fx.GraphModule) -> collections.Counter:
    """How often each op (``call_function`` or ``call_method`` target) occurs in ``gm``'s own graph
    (not in the graphs nested in it)."""
    return collections.Counter(n.target for n in gm.graph.nodes if n.op in ("call_function", "call_method"))


class RecordingBackend:
    """A dora_fx backend that records graphs, as vLLM's pass tests do, then compiles with aot_eager.

    ``before[name]`` and ``after[name]``: a copy of each graph (and of each graph nested in it, in
    :func:`dora_fx.passes.pipeline.run_passes`'s order) just before and after the pass ``name`` of
    :data:`dora_fx.passes.pipeline.PASSES` ran on it. ``graphs``: each graph as the inner compiler
    gets it (rewritten, the reused norms lifted into inputs).
    """

    def __init__(self, **kwargs):
        self.graphs: list[fx.GraphModule] = []
        self.before: dict[str, list[fx.GraphModule]] = collections.defaultdict(list)
        self.after: dict[str, list[fx.GraphModule]] = collections.defaultdict(list)
        self.backend = dora_fx.DoraBackend(inner=self._inner, **kwargs)

    def _inner(self, gm, example_inputs):
        self.graphs.append(copy.deepcopy(gm))
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    def __call__(self, gm, example_inputs):
        recorded = tuple(_RecordedPass(graph_pass, self) for graph_pass in pipeline.PASSES)
        with unittest.mock.patch.object(pipeline, "PASSES", recorded):
            return self.backend(gm, example_inputs)

    @property
    def report(self):
        return self.backend.report


class _RecordedPass:
    """A pass of the pipeline that copies the graph into its recorder before and after running."""

    def __init__(self, graph_pass, recorder: RecordingBackend):
        self.graph_pass, self.recorder, self.name = graph_pass, recorder, graph_pass.name

    def run(self, gm: fx.GraphModule, rewrites):
        self.recorder.before[self.name].append(copy.deepcopy(gm))
        result = self.graph_pass.run(gm, rewrites)
        self.recorder.after[self.name].append(copy.deepcopy(gm))
        return result


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.double()
    return ((actual.double() - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def assert_close_all(actual: dict, expected: dict, **tol) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        assert actual[name] is not None and expected[name] is not None, name
        torch.testing.assert_close(actual[name], expected[name], msg=lambda m: f"{name}: {m}", **tol)
