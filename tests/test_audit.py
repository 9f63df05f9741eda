"""The audit API and CLI, and the demo."""

from __future__ import annotations

import json

import torch

from dora_fx import models
from dora_fx.__main__ import main
from dora_fx.audit import audit


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
    assert "dora_fx.weight_norm" in text and "dora_fx.compose" in text and "eye" not in text


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
