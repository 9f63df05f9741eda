"""The audit API and CLI, and the demo."""

from __future__ import annotations

import json

import pytest
import torch

import dora_fx
from dora_fx.examples import models
from dora_fx.__main__ import main
from dora_fx.audit import audit
from tests.helpers import differentiable_inputs


def test_audit_from_python_on_any_model(tmp_path):
    example = models.build("gpt2")
    report = audit(example.model, dump_dir=tmp_path, **example.make_inputs(torch.Generator()))
    assert len(report.rewrites) == example.dora_layers
    assert report.rewrites[0].module == "base_model.model.transformer.h.0.attn.c_attn"
    before = sorted(tmp_path.glob("*.before.py"))
    after = sorted(tmp_path.glob("*.after.py"))
    assert len(before) == len(after) == example.dora_layers
    assert "torch.eye" in before[0].read_text() and "linalg_norm" in before[0].read_text()
    text = after[0].read_text()
    assert "dora_fx.cached_weight_norm" in text and "dora_fx.compose" in text and "eye" not in text


def test_audit_cli_prints_table_and_json(capsys, tmp_path):
    main(["audit", "--model", "llama", "--layers", "1", "--train", "--dropout", "0.1", "--dump", str(tmp_path)])
    text = capsys.readouterr().out
    assert "7 DoRA region(s) rewritten" in text
    assert "base_model.model.model.layers.0.mlp.down_proj" in text and "recomputed base (dropout)" in text
    main(["audit", "--model", "mlp", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert data["total_rewrites"] == 2 and data["total_near_misses"] == 0


def test_demo_runs_and_checks_outputs(capsys):
    main(["demo", "--model", "mlp", "--repeats", "1", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "2 DoRA region(s) rewritten" in out
    assert "outputs vs eager PEFT: relative error" in out and "speedup" in out


def _checkpointed_llama():
    example = models.build("llama")
    model = example.model.train()
    model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.base_model.model.config.use_cache = False
    return example, model


def test_audit_lists_dora_layers_dynamo_ran_outside_the_graphs():
    """Checkpointing without Dynamo's side-effect switch: every DoRA layer runs eagerly, unrewritten;
    the audit names each, with Dynamo's graph-break reason and its hint."""
    example, model = _checkpointed_llama()
    report = audit(model, **differentiable_inputs(example, torch.Generator().manual_seed(2)))
    assert report.rewrites == []
    unseen = [u.module for u in report.not_seen]
    assert len(unseen) == example.dora_layers
    assert "base_model.model.model.layers.1.mlp.down_proj" in unseen
    reason = report.not_seen[0].reason
    assert reason.startswith("not seen by the backend — Dynamo ran it outside a compiled graph; graph break reasons:")
    # Dynamo's own messages, whatever their wording: each break's first line and hint are in the reason.
    assert report.graph_breaks
    for message in report.graph_breaks:
        lines = [line.strip() for line in message.splitlines() if line.strip()]
        assert lines[0] in reason
        assert all(line in reason for line in lines if line.startswith("Hint:"))
    text = report.to_text()
    assert f"{example.dora_layers} DoRA layer(s) not seen by the backend" in text.splitlines()[0]
    assert "    base_model.model.model.layers.0.self_attn.q_proj" in text
    assert len(json.loads(report.to_json())["not_seen"]) == example.dora_layers


def test_audit_lists_none_when_dynamo_traces_them():
    example, model = _checkpointed_llama()
    with torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=True):
        report = audit(model, **differentiable_inputs(example, torch.Generator().manual_seed(2)))
    assert len(report.rewrites) == example.dora_layers
    assert report.not_seen == []
    assert "0 DoRA layer(s) not seen by the backend" in report.to_text()


def test_audit_follows_layers_into_graphs_compiled_for_an_inner_module():
    """transformers' checkpointing input hook breaks the graph before the decoder: the layers run in a
    graph Dynamo compiled for the inner LlamaModel (module paths relative to it). The audit tells the
    layers that ran compiled by the tensors the graphs were called with, not by names: none is unseen."""
    example, model = _checkpointed_llama()
    with torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=True):
        report = audit(model, **example.make_inputs(torch.Generator().manual_seed(2)))
    if all(r.module.startswith("base_model") for r in report.rewrites):
        pytest.skip("this torch/transformers traced the model without breaking before the decoder")
    assert len(report.rewrites) == example.dora_layers
    assert report.not_seen == []


def test_audit_skips_disabled_adapters():
    example = models.build("mlp")
    with example.model.disable_adapter():
        report = audit(example.model, **example.make_inputs(torch.Generator()))
    assert report.rewrites == [] and report.not_seen == []


def test_plain_backend_report_does_not_claim_a_check():
    """Only the audit knows the model; a backend's report says nothing about unseen layers."""
    example = models.build("mlp")
    backend = dora_fx.DoraBackend(inner="eager")
    torch.compile(example.model, backend=backend)(**example.make_inputs(torch.Generator()))
    assert backend.report.not_seen is None
    assert "not seen" not in backend.report.to_text()
