"""What else PEFT DoRA users run: dynamic shapes, several adapters, Embedding/Conv DoRA, merging."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dora_fx
from dora_fx.examples import models
from tests.helpers import RecordingBackend, op_counts


@pytest.mark.parametrize("how", ["automatic", "dynamic=True", "mark_dynamic"])
def test_ten_sequence_lengths_compile_at_most_twice_and_stay_rewritten(how):
    example = models.build("llama")
    model = example.model.eval()
    backend = RecordingBackend()
    compiled = torch.compile(model, backend=backend, dynamic=True if how == "dynamic=True" else None)
    with torch.no_grad():
        for length in range(3, 13):
            ids = torch.randint(0, 128, (2, length))
            if how == "mark_dynamic":
                torch._dynamo.mark_dynamic(ids, 1)
            torch.testing.assert_close(compiled(input_ids=ids).logits, model(input_ids=ids).logits)
    assert 1 <= len(backend.graphs) <= 2
    assert all(len(g.rewrites) == example.dora_layers for g in backend.report.graphs)


def _two_adapter_mlp():
    example = models.build("mlp")
    model = example.model
    model.add_adapter("second", models.dora_config(["fc1", "fc2"], rank=3, dropout=0.0))
    models.randomize_adapters(model, torch.Generator().manual_seed(3))
    return model, example.make_inputs(torch.Generator().manual_seed(4))["x"]


def test_set_adapter_and_disable_adapter_match_eager():
    model, x = _two_adapter_mlp()
    backend = RecordingBackend()
    compiled = torch.compile(model.eval(), backend=backend)
    with torch.no_grad():
        for adapter in ("default", "second", "default"):
            model.set_adapter(adapter)
            torch.testing.assert_close(compiled(x), model(x))
        with model.disable_adapter():
            torch.testing.assert_close(compiled(x), model(x))
    ranks = {r.r for r in backend.report.rewrites}
    assert ranks == {4, 3}  # both adapters were rewritten in their graphs
    assert backend.report.near_misses == []


def test_two_active_dora_adapters_match_eager():
    model, x = _two_adapter_mlp()
    model.base_model.set_adapter(["default", "second"])
    backend = RecordingBackend()
    compiled = torch.compile(model.train(), backend=backend, fullgraph=True)
    out = compiled(x)
    torch.testing.assert_close(out, model(x))
    assert len(backend.report.rewrites) == 4


class EmbedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        self.conv2d = nn.Conv2d(16, 8, 3, padding=1)
        self.conv1d = nn.Conv1d(16, 8, 3)
        self.fc = nn.Linear(8, 4)

    def forward(self, ids):
        h = self.emb(ids).transpose(1, 2)
        a = self.conv2d(h[..., None]).flatten(2).mean(-1)
        return self.fc(a) + self.fc(self.conv1d(h).mean(-1))


@pytest.mark.parametrize("train", [False, True])
def test_embedding_and_conv_dora_are_reported_and_match_eager(train):
    from peft import get_peft_model

    model = get_peft_model(EmbedConv(), models.dora_config(["emb", "conv2d", "conv1d", "fc"], rank=4, dropout=0.0))
    models.randomize_adapters(model, torch.Generator().manual_seed(0))
    model.train(train)
    ids = torch.randint(0, 20, (2, 7))
    backend = RecordingBackend()
    torch.testing.assert_close(torch.compile(model, backend=backend)(ids), model(ids))
    assert [r.module for r in backend.report.rewrites] == ["base_model.model.fc"] * 2
    reasons = {m.where.split(".")[2]: m.reason for m in backend.report.near_misses}
    assert set(reasons) == {"emb", "conv2d", "conv1d"}
    assert "DoraEmbeddingLayer is not rewritten" in reasons["emb"]
    assert "DoraConv2dLayer is not rewritten" in reasons["conv2d"]


def test_merge_and_unload_after_training_under_the_backend():
    example = models.build("llama")
    model = example.model.train()
    compiled = torch.compile(model, backend=dora_fx.DoraBackend(inner="aot_eager"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        ids = example.make_inputs(gen)["input_ids"]
        compiled(input_ids=ids).logits.float().square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    ids = example.make_inputs(gen)["input_ids"]
    with torch.no_grad():
        unmerged = compiled(input_ids=ids).logits
        merged = model.merge_and_unload()(input_ids=ids).logits
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("keeps_output", [True, False], ids=["keeps-output", "keeps-adapted"])
def test_gradient_checkpointing_is_rewritten_and_matches_eager(monkeypatch, keeps_output):
    """Non-reentrant checkpointing: the DoRA regions live in the checkpoint bodies (sub-graphs), with
    either activation kept for the magnitude's gradient (``dora_linear.KEEP_OUTPUT_MIN_ROWS``)."""
    from dora_fx.passes import dora_linear
    from tests.helpers import differentiable_inputs, fresh, step, zero_grads

    monkeypatch.setattr(dora_linear, "KEEP_OUTPUT_MIN_ROWS", 1 if keeps_output else 10**9)

    example = models.build("llama")
    model = example.model.train()
    model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.base_model.model.config.use_cache = False
    inputs = differentiable_inputs(example, torch.Generator().manual_seed(2))  # inputs_embeds, see README
    backend = RecordingBackend()
    # PEFT's DoRA layer clears its (empty) cache dict inside the checkpointed region; Dynamo refuses
    # that side effect under checkpointing unless told it need not replay it (README).
    with torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=True):
        out, grads = step(torch.compile(model, backend=backend, fullgraph=True), fresh(inputs))
    zero_grads(model)
    ref_out, ref_grads = step(model, fresh(inputs))
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-5, msg=name)
    assert len(backend.report.rewrites) == example.dora_layers
    (gm,) = backend.graphs
    bodies = [m for name, m in gm.named_children() if name.startswith("wrap_body")]
    assert len(bodies) == 2  # one checkpointed region per decoder layer
    for body in bodies:
        ops = op_counts(body)
        assert ops[torch.eye] == 0
        assert ops[torch.ops.dora_fx.cached_weight_norm.default] == example.dora_layers // 2
        kept_output = ops[torch.ops.dora_fx.compose_saving_output.default]
        assert kept_output == (example.dora_layers // 2 if keeps_output else 0)
        assert ops[torch.ops.dora_fx.compose_with_adapted.default] == example.dora_layers // 2 - kept_output
