"""The DoRA Linear pass on hand-written graphs: what it rewrites, and the near-misses it reports."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dora_fx
from dora_fx.examples import models
from tests.helpers import RecordingBackend, op_counts


class DoraLike(nn.Module):
    """PEFT's DoRA Linear formula written out, with knobs that each break one thing the pass relies on."""

    def __init__(self, d_in=12, d_out=12, r=3, scaling=2.0, out_scaling=None, norm_dim=1, leak=None, bias=True):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.weight = nn.Parameter(torch.randn(d_out, d_in, generator=gen), requires_grad=False)
        self.bias = nn.Parameter(torch.randn(d_out, generator=gen), requires_grad=False) if bias else None
        self.lora_A = nn.Parameter(torch.randn(r, d_in, generator=gen))
        self.lora_B = nn.Parameter(torch.randn(d_out, r, generator=gen))
        self.magnitude = nn.Parameter(torch.rand(d_out, generator=gen) + 3)
        self.scaling, self.norm_dim, self.leak = scaling, norm_dim, leak
        self.out_scaling = scaling if out_scaling is None else out_scaling

    def forward(self, x):
        result = F.linear(x, self.weight, self.bias)
        eye = torch.eye(self.lora_A.shape[1], dtype=x.dtype)
        dense = F.linear(F.linear(eye, self.lora_A), self.lora_B).T
        norm = torch.linalg.norm(self.weight + self.scaling * dense.detach(), dim=self.norm_dim).detach()
        g = (self.magnitude / norm).view(1, -1)
        lora = F.linear(F.linear(x, self.lora_A), self.lora_B)
        base = result - self.bias if self.bias is not None else result
        out = result + ((g - 1) * base + g * lora * self.out_scaling)
        if self.leak == "dense":
            return out, dense
        if self.leak == "norm":
            return out, norm
        return out


def _compile_and_compare(module, x):
    backend = RecordingBackend()
    compiled = torch.compile(module, backend=backend, fullgraph=True)
    out, ref = compiled(x), module(x)
    for a, b in zip(out if isinstance(out, tuple) else (out,), ref if isinstance(ref, tuple) else (ref,)):
        torch.testing.assert_close(a, b)
    return backend


def test_peft_formula_written_by_hand_is_rewritten():
    backend = _compile_and_compare(DoraLike(), torch.randn(5, 12))
    report = backend.report
    assert len(report.rewrites) == 1 and report.near_misses == []
    (rewrite,) = report.rewrites
    assert (rewrite.d_out, rewrite.d_in, rewrite.r, rewrite.scaling) == (12, 12, 3, 2.0)
    assert rewrite.variant == "reused base, bias"
    assert rewrite.dense_bytes_avoided == 12 * 12 * 4
    counts = report.graphs[0].pass_counts
    assert list(counts) == ["dora_linear", "quantized_norm", "dead_code"]
    assert counts["dora_linear"] == 1 and counts["quantized_norm"] == 0 and counts["dead_code"] > 0
    (before,), (rewritten,), (after,) = backend.before["dora_linear"], backend.after["dora_linear"], backend.after["dead_code"]
    assert op_counts(before)[torch.eye] == 1 and op_counts(after)[torch.eye] == 0
    for gm in (rewritten, after):  # training: the magnitude's gradient keeps `adapted`
        ops = op_counts(gm)
        assert ops[torch.ops.dora_fx.cached_weight_norm.default] == ops[torch.ops.dora_fx.compose_with_adapted.default] == 1


@pytest.mark.parametrize(
    "kwargs,reason",
    [
        ({"out_scaling": 3.0}, "scaling 3.0 differs from the norm's scaling 2.0"),
        ({"leak": "dense"}, "the dense product"),
        ({"leak": "norm"}, "also used by"),
        ({"norm_dim": 0}, "row-wise L2 norm"),
    ],
)
def test_lookalikes_are_left_alone_and_reported(kwargs, reason):
    report = _compile_and_compare(DoraLike(**kwargs), torch.randn(5, 12)).report
    assert report.rewrites == []
    (miss,) = report.near_misses
    assert reason in miss.reason
    assert report.graphs[0].pass_counts == {"dora_linear": 0, "quantized_norm": 0, "dead_code": 0}


def test_dense_product_in_a_graph_of_its_own_is_reported():
    """What a graph break between the dense product and the norm leaves behind."""

    def dense_only(lora_A, lora_B):
        return F.linear(F.linear(torch.eye(lora_A.shape[1]), lora_A), lora_B).T

    backend = RecordingBackend()
    torch.compile(dense_only, backend=backend)(torch.randn(2, 6), torch.randn(4, 2))
    assert backend.report.rewrites == []
    (miss,) = backend.report.near_misses
    assert "no matched DoRA norm" in miss.reason


def test_plain_lora_is_not_rewritten():
    example = models.build("llama", use_dora=False)
    backend = RecordingBackend()
    compiled = torch.compile(example.model, backend=backend, fullgraph=True)
    inputs = example.make_inputs(torch.Generator().manual_seed(0))
    torch.testing.assert_close(compiled(**inputs).logits, example.model(**inputs).logits)
    assert backend.report.rewrites == [] and backend.report.near_misses == []


def test_model_without_adapters_passes_through_unchanged():
    model = models.MLP()
    x = torch.randn(3, 48)
    plain = RecordingBackend(rewrite=False)
    torch.compile(model, backend=plain)(x)
    torch._dynamo.reset()
    dora = RecordingBackend()
    torch.testing.assert_close(torch.compile(model, backend=dora)(x), model(x))
    assert dora.report.rewrites == [] and dora.report.near_misses == []
    assert dora.graphs[0].code == plain.graphs[0].code


def test_unrelated_row_norm_is_not_reported():
    model = nn.Sequential(nn.Linear(8, 8))
    backend = RecordingBackend()
    torch.compile(lambda x: torch.linalg.norm(model(x), dim=1), backend=backend)(torch.randn(3, 8))
    assert backend.report.rewrites == [] and backend.report.near_misses == []


def test_report_names_the_module_and_serialises():
    example = models.build("mlp")
    torch.compile(example.model, backend=dora_fx.DoraBackend(inner="eager"))(**example.make_inputs(torch.Generator()))
    report = dora_fx.last_report()
    assert [r.module for r in report.rewrites] == ["base_model.model.fc1", "base_model.model.fc2"]
    data = report.to_dict()
    assert data["total_rewrites"] == 2
    assert data["total_dense_bytes_avoided"] == (80 * 48 + 24 * 80) * 4
    assert "base_model.model.fc1" in report.to_text() and report.to_json()


def test_identity_from_another_graph_is_reported_not_rewritten():
    """What a graph split between PEFT's torch.eye and the norm (a DDP bucket boundary) leaves."""
    module = DoraLike()

    def split_piece(x, identity):
        dense = F.linear(F.linear(identity, module.lora_A), module.lora_B).T
        norm = torch.linalg.norm(module.weight + 2.0 * dense.detach(), dim=1).detach()
        g = (module.magnitude / norm).view(1, -1)
        result = F.linear(x, module.weight, module.bias)
        lora = F.linear(F.linear(x, module.lora_A), module.lora_B)
        return result + ((g - 1) * (result - module.bias) + g * lora * 2.0)

    backend = RecordingBackend()
    x, identity = torch.randn(5, 12), torch.eye(12)
    torch.testing.assert_close(torch.compile(split_piece, backend=backend)(x, identity), split_piece(x, identity))
    assert backend.report.rewrites == []
    (miss,) = backend.report.near_misses
    assert "comes from another graph" in miss.reason and "optimize_ddp" in miss.reason


def _view_root(node: torch.fx.Node) -> torch.fx.Node:
    """``node`` through views and transposes (what an ``mm`` operand is a view of)."""
    views = {torch.ops.aten.view.default, torch.ops.aten.reshape.default, torch.ops.aten.permute.default,
             torch.ops.aten.t.default, torch.ops.aten._unsafe_view.default}
    while node.op == "call_function" and node.target in views:
        node = node.args[0]
    return node


def test_base_gemm_and_lora_b_share_one_gradient_tensor_in_the_backward():
    """With ``s`` on the ``r``-wide LoRA activation, every GEMM of the backward that reads a
    ``tokens x d_out`` gradient reads the same tensor, ``g·d`` (PEFT's graph has ``g·d`` and ``g·s·d``)."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    from tests import single_layer as sl

    tokens, d_out = 10, 12
    backward_graphs = []

    def keep_backward(gm, example_inputs):
        backward_graphs.append(gm)
        return make_boxed_func(gm.forward)

    inner = aot_autograd(fw_compiler=lambda gm, _: make_boxed_func(gm.forward), bw_compiler=keep_backward)
    model = sl.build(d_out=d_out, bias=False)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=dora_fx.DoraBackend(inner=inner), fullgraph=True)
    compiled(torch.randn(2, tokens // 2, 16, requires_grad=True)).sum().backward()
    (graph,) = [gm.graph for gm in backward_graphs]
    gradient_operands = [
        arg
        for node in graph.find_nodes(op="call_function", target=torch.ops.aten.mm.default)
        for arg in node.args
        if arg.meta["val"].numel() == tokens * d_out
    ]
    # The premise: the three GEMMs that read the gradient (x's through W, lora_B's, the LoRA
    # activation's) are aten.mm; a torch that decomposed linear's backward otherwise fails here, loudly.
    assert len(gradient_operands) == 3, [n.format_node() for n in graph.nodes]
    read_by_gemms = {_view_root(arg) for arg in gradient_operands}
    assert len(read_by_gemms) == 1, read_by_gemms
    assert [r.variant for r in dora_fx.last_report().graphs[-1].rewrites] == ["reused base"]
