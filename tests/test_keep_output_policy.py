"""Which activation a training graph keeps for the magnitude's gradient, by the output's size.

For PEFT's reused base without bias, ``compose_saving_output`` keeps the layer's output (which its
consumer usually keeps anyway) at the price of a ``zero_magnitude_grad`` call and an ``s·h`` kernel per
layer; ``compose_with_adapted`` keeps ``adapted``. The rewrite takes the first from
``dora_linear.KEEP_OUTPUT_MIN_ROWS`` rows of output on, and wherever the rows are symbolic. Either way
the outputs and gradients are eager PEFT's, features with ``m = 0`` included.
"""

from __future__ import annotations

import pytest
import torch

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
