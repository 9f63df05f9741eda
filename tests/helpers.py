"""Shared test helpers: run eager PEFT and a compiled model side by side and compare."""

from __future__ import annotations

import copy

import torch
import torch.fx as fx

import dora_fx
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


class RecordingBackend:
    """A dora_fx backend whose inner compiler records each rewritten graph, then runs aot_eager."""

    def __init__(self, **kwargs):
        self.graphs: list[fx.GraphModule] = []
        self.backend = dora_fx.DoraBackend(inner=self._inner, **kwargs)

    def _inner(self, gm, example_inputs):
        self.graphs.append(copy.deepcopy(gm))
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    def __call__(self, gm, example_inputs):
        return self.backend(gm, example_inputs)

    @property
    def report(self):
        return self.backend.report


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.double()
    return ((actual.double() - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def assert_close_all(actual: dict, expected: dict, **tol) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        assert actual[name] is not None and expected[name] is not None, name
        torch.testing.assert_close(actual[name], expected[name], msg=lambda m: f"{name}: {m}", **tol)
