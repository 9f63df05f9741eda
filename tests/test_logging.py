"""Logging as libraries do it: a ``NullHandler`` on the ``dora_fx`` logger, and at INFO one line per
compiled graph saying how many DoRA regions were rewritten and how long the pass took."""

from __future__ import annotations

import logging
import re

import torch
from torch import nn

import dora_fx
from dora_fx.examples import models


class _Deep(nn.Module):
    """``2 * half`` small Linears with a graph break between the halves: two graphs."""

    def __init__(self, half: int, width: int = 8):
        super().__init__()
        self.first = nn.Sequential(*(nn.Linear(width, width) for _ in range(half)))
        self.second = nn.Sequential(*(nn.Linear(width, width) for _ in range(half)))

    def forward(self, x):
        x = self.first(x)
        torch._dynamo.graph_break()
        return self.second(x)


def _deep_dora_model(half: int):
    from peft import get_peft_model

    torch.manual_seed(0)
    base = _Deep(half)
    targets = [f"{part}.{i}" for part in ("first", "second") for i in range(half)]
    model = get_peft_model(base, models.dora_config(targets, rank=2, dropout=0.0))
    models.randomize_adapters(model, torch.Generator().manual_seed(1))
    return model.eval()


def test_library_logger_has_only_a_null_handler():
    logger = logging.getLogger("dora_fx")
    assert any(isinstance(h, logging.NullHandler) for h in logger.handlers)
    assert all(isinstance(h, logging.NullHandler) for h in logger.handlers)
    assert logger.level == logging.NOTSET and logger.propagate  # the application decides


def test_info_line_per_graph_with_rewrite_count_and_pass_time(caplog):
    half = 10
    model = _deep_dora_model(half)
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(2))
    caplog.set_level(logging.INFO, logger="dora_fx")
    with torch.no_grad():
        expected = model(x)
        out = torch.compile(model, backend=dora_fx.DoraBackend(inner="eager"))(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    report = dora_fx.last_report()
    assert len(report.graphs) == 2 and len(report.rewrites) == 2 * half
    lines = [r for r in caplog.records if r.name.startswith("dora_fx") and r.levelno == logging.INFO]
    assert len(lines) == len(report.graphs)
    for record, graph in zip(lines, report.graphs):
        message = record.getMessage()
        assert f"graph {graph.graph_id}: {half} DoRA region(s) rewritten, 0 near-miss(es)" in message
        seconds = float(re.search(r"pass (\d+\.\d+) s", message).group(1))
        assert abs(seconds - graph.pass_seconds) < 1e-3


def test_quiet_below_info(caplog):
    example = models.build("mlp")
    caplog.set_level(logging.WARNING, logger="dora_fx")
    with torch.no_grad():
        torch.compile(example.model.eval(), backend=dora_fx.DoraBackend(inner="eager"))(
            **example.make_inputs(torch.Generator())
        )
    assert len(dora_fx.last_report().rewrites) == 2
    assert [r for r in caplog.records if r.name.startswith("dora_fx")] == []
