"""Which activation a training graph keeps for the magnitude's gradient, by the output's size, and
the Inductor settings of graphs whose every DoRA layer is below that size.

For PEFT's reused base without bias, ``compose_saving_output`` keeps the layer's output (which its
consumer usually keeps anyway) at the price of a ``zero_magnitude_grad`` call and an ``s·h`` kernel per
layer; ``compose_with_adapted`` keeps ``adapted``. The rewrite takes the first from
``dora_linear.KEEP_OUTPUT_MIN_ROWS`` rows of output on, and wherever the rows are symbolic. Either way
the outputs and gradients are eager PEFT's, features with ``m = 0`` included.
"""

from __future__ import annotations

import pytest
import torch
from torch._inductor.custom_graph_pass import CustomGraphPass

import dora_fx
from dora_fx.backend import HOST_PACED_INDUCTOR_CONFIG
from dora_fx.passes import dora_linear
from tests import single_layer as sl
from tests.helpers import RecordingBackend, op_counts

SAVING = torch.ops.dora_fx.compose_saving_output.default
ADAPTED = torch.ops.dora_fx.compose_with_adapted.default


def _compose_ops(model, x: torch.Tensor):
    """``(saving, adapted)``: how often the training graph of ``model(x)`` calls each compose."""
    backend = RecordingBackend()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    compiled(x).sum().backward()
    (gm,) = backend.graphs
    ops = op_counts(gm)
    return ops[SAVING], ops[ADAPTED]


@pytest.mark.parametrize("threshold, expected", [(14, (1, 0)), (15, (0, 1))])
def test_rows_of_every_leading_dimension_count(monkeypatch, threshold, expected):
    """A ``[2, 7, d]`` input gives 14 rows: the output is kept from a threshold of 14 down."""
    monkeypatch.setattr(dora_linear, "KEEP_OUTPUT_MIN_ROWS", threshold)
    model = sl.build(16, 24, bias=False).train()
    assert _compose_ops(model, torch.randn(2, 7, 16)) == expected


def test_default_keeps_adapted_below_1024_rows(monkeypatch):
    monkeypatch.undo()  # the library's own threshold, not the one tests/conftest.py sets
    model = sl.build(16, 24, bias=False).train()
    assert _compose_ops(model, torch.randn(1023, 16)) == (0, 1)
    torch._dynamo.reset()
    assert _compose_ops(model, torch.randn(1024, 16)) == (1, 0)


def test_symbolic_rows_keep_the_output(monkeypatch):
    """Under dynamic shapes the size is not known when the graph is rewritten: the output is kept,
    the choice that bounds memory."""
    monkeypatch.setattr(dora_linear, "KEEP_OUTPUT_MIN_ROWS", 1024)
    model = sl.build(16, 24, bias=False).train()
    x = torch.randn(9, 16)
    torch._dynamo.mark_dynamic(x, 0)
    assert _compose_ops(model, x) == (1, 0)


@pytest.mark.parametrize("threshold", [1, 10**9], ids=["keeps-output", "keeps-adapted"])
def test_both_paths_give_eager_gradients_with_zero_magnitudes(monkeypatch, threshold):
    monkeypatch.setattr(dora_linear, "KEEP_OUTPUT_MIN_ROWS", threshold)
    model = sl.build(16, 40, bias=False).train()
    _, _, _, _, magnitude, _ = sl.parts(model)
    with torch.no_grad():
        magnitude[[0, 3, 17, 39]] = 0
    ours, eager, backend = sl.eager_and_compiled(model, torch.randn(2, 7, 16))
    assert len(backend.report.rewrites) == 1
    grad_m = eager[1]["base_model.model.proj.lora_magnitude_vector.default.weight"]
    assert (grad_m[[0, 3, 17, 39]] != 0).all()
    sl.assert_matches(ours, eager)


class _SplitReductionsSpy(CustomGraphPass):
    """An Inductor post-grad pass that records the ``split_reductions`` setting each graph compiles under."""

    def __init__(self):
        self.seen: list[bool] = []

    def __call__(self, graph: torch.fx.Graph) -> None:
        self.seen.append(torch._inductor.config.split_reductions)

    def uuid(self) -> str:
        return "dora_fx-tests-split-reductions-spy"


def _inductor_step(model, x: torch.Tensor, options: dict | None = None):
    """A train step of ``model`` under ``backend="dora"`` with Inductor: ``(backend, spy, (out, grads))``."""
    spy = _SplitReductionsSpy()
    backend = dora_fx.DoraBackend(options={"post_grad_custom_post_pass": spy, "fx_graph_cache": False, **(options or {})})
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    return backend, spy, sl.step(compiled, model, x)


def test_host_paced_graphs_compile_without_split_reductions(monkeypatch):
    """Below the threshold (every DoRA layer), forward and backward compile with ``split_reductions``
    off, the report says so, and the gradients are eager PEFT's; at the threshold nothing changes."""
    monkeypatch.setattr(dora_linear, "KEEP_OUTPUT_MIN_ROWS", 1024)
    model = sl.build(16, 24, bias=False).train()
    x = torch.randn(2, 300, 16)
    backend, spy, ours = _inductor_step(model, x)
    assert spy.seen == [False, False]  # the forward, then the backward
    (graph,) = backend.report.graphs
    assert graph.inductor_config == HOST_PACED_INDUCTOR_CONFIG == {"split_reductions": False}
    assert "split_reductions" in backend.report.to_text()
    sl.assert_matches(ours, sl.step(model, model, x))
    torch._dynamo.reset()
    backend, spy, _ = _inductor_step(model, torch.randn(1024, 16))
    assert spy.seen == [True, True] and backend.report.graphs[0].inductor_config == {}


def test_users_options_override_the_host_paced_setting(monkeypatch):
    monkeypatch.setattr(dora_linear, "KEEP_OUTPUT_MIN_ROWS", 1024)
    model = sl.build(16, 24, bias=False).train()
    _, spy, _ = _inductor_step(model, torch.randn(8, 16), options={"split_reductions": True})
    assert spy.seen == [True, True]
