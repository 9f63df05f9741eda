"""Graphs that look like PEFT's DoRA but compute something else: never rewritten, reported as near-misses
with the reason, and the compiled model equals eager (outputs and gradients).

tests/passes/test_dora_linear.py covers a hand-written formula with another output scaling, a leaked
dense product or norm, and a column norm. Here: user subclasses of PEFT's ``DoraLinearLayer`` inside real
PEFT models, more hand-written variants, and look-alikes that *are* DoRA (other spellings, shared layers,
several adapters) and must still be rewritten.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft.tuners.lora.dora import DoraLinearLayer
from peft.utils.other import transpose
from torch import nn

from tests import single_layer as sl

MODES = {
    # name: (build kwargs, train)
    "eval-bias": ({}, False),
    "eval-no-bias": ({"bias": False}, False),
    "train-dropout": ({"dropout": 0.1}, True),
}


# --------------------------------------------------------------------------------------------------
# User subclasses of PEFT's DoraLinearLayer
# --------------------------------------------------------------------------------------------------


class PeftFormula(DoraLinearLayer):
    """PEFT 0.21's ``DoraLinearLayer.forward``, line by line, with the last line as a hook."""

    detach_norm = True  # PEFT detaches the dense product that feeds the norm, and the norm

    def combine(self, g, base_result, lora_result, scaling):
        return (g - 1) * base_result + g * lora_result * scaling

    def forward(self, x, *, lora_A, lora_B, scaling, base_layer, base_result=None, adapter_name="default"):
        lora_weight = self.get_lora_weight(lora_A=lora_A, lora_B=lora_B, adapter_name=adapter_name).to(x.dtype)
        magnitude = self.weight
        weight = base_layer.weight.to(x.dtype)
        dense = lora_weight.detach() if self.detach_norm else lora_weight
        weight_norm = self.get_weight_norm(weight=weight, lora_weight=dense, scaling=scaling)
        mag_norm_scale = (magnitude / (weight_norm.detach() if self.detach_norm else weight_norm)).view(1, -1)
        lora_result = lora_B(lora_A(x))
        if base_result is not None:
            if base_layer.bias is not None:
                base_result = base_result - base_layer.bias
        else:
            base_result = F.linear(x, transpose(weight, self.fan_in_fan_out))
        return self.combine(mag_norm_scale, base_result, lora_result, scaling)


class L1Norm(DoraLinearLayer):
    def get_weight_norm(self, weight, lora_weight, scaling, adapter_name=None):
        weight = transpose(weight, self.fan_in_fan_out) + scaling * lora_weight
        return torch.linalg.norm(weight, ord=1, dim=1).to(weight.dtype)


class TensorNormP1(DoraLinearLayer):
    def get_weight_norm(self, weight, lora_weight, scaling, adapter_name=None):
        return (transpose(weight, self.fan_in_fan_out) + scaling * lora_weight).norm(p=1, dim=1)


class KeepDimNorm(DoraLinearLayer):
    def get_weight_norm(self, weight, lora_weight, scaling, adapter_name=None):
        weight = transpose(weight, self.fan_in_fan_out) + scaling * lora_weight
        return torch.linalg.norm(weight, dim=1, keepdim=True).squeeze(1)


class ColumnNorm(DoraLinearLayer):  # a square layer, so the shapes still fit
    def get_weight_norm(self, weight, lora_weight, scaling, adapter_name=None):
        return torch.linalg.norm(transpose(weight, self.fan_in_fan_out) + scaling * lora_weight, dim=0)


class Float64Norm(DoraLinearLayer):
    def get_weight_norm(self, weight, lora_weight, scaling, adapter_name=None):
        weight = transpose(weight, self.fan_in_fan_out) + scaling * lora_weight
        return torch.linalg.vector_norm(weight, dim=1, dtype=torch.float64).to(weight.dtype)


class NormPlusEps(DoraLinearLayer):
    def get_weight_norm(self, weight, lora_weight, scaling, adapter_name=None):
        return super().get_weight_norm(weight, lora_weight, scaling, adapter_name) + 1e-6


class HalfScaleNorm(DoraLinearLayer):
    def get_weight_norm(self, weight, lora_weight, scaling, adapter_name=None):
        return super().get_weight_norm(weight, lora_weight, scaling / 2, adapter_name)


class ScaledOutput(DoraLinearLayer):
    def forward(self, x, **kwargs):
        return 1.5 * super().forward(x, **kwargs)


class KeepsG(PeftFormula):  # e.g. to log the DoRA scale: g must survive, so the region cannot be replaced
    def combine(self, g, base_result, lora_result, scaling):
        self.last_scale = g.detach()
        return super().combine(g, base_result, lora_result, scaling)


class GMinusHalf(PeftFormula):
    def combine(self, g, base_result, lora_result, scaling):
        return (g - 0.5) * base_result + g * lora_result * scaling


class OtherOutputScaling(PeftFormula):
    def combine(self, g, base_result, lora_result, scaling):
        return (g - 1) * base_result + g * lora_result * (2 * scaling)


class FullGradientNorm(PeftFormula):  # the DoRA paper's full gradient: the norm is differentiated too
    detach_norm = False


class DetachedLora(PeftFormula):
    def combine(self, g, base_result, lora_result, scaling):
        return super().combine(g, base_result, lora_result.detach(), scaling)


class DetachedScale(PeftFormula):  # the magnitude frozen by detaching g
    def combine(self, g, base_result, lora_result, scaling):
        return super().combine(g.detach(), base_result, lora_result, scaling)


SUBCLASSES = {
    # class: (expected reason, square layer?)
    L1Norm: ("ord=1", False),
    TensorNormP1: ("ord=1", False),
    KeepDimNorm: ("keepdim=True", False),
    ColumnNorm: ("dim=0", True),
    Float64Norm: ("dtype=torch.float64", False),
    NormPlusEps: ("is used by", False),
    HalfScaleNorm: ("differs from the norm's scaling", False),
    ScaledOutput: ("g = m / norm is not used as", False),
    KeepsG: ("an intermediate of the DoRA output", False),
    GMinusHalf: ("the base factor is not g - 1", False),
    OtherOutputScaling: ("differs from the norm's scaling", False),
    FullGradientNorm: ("the weight norm is not detached", False),
    DetachedLora: ("is detached where the DoRA output reads it", False),
    DetachedScale: ("is detached where the DoRA output reads it", False),
}


def _peft_with(cls, mode: str, square: bool = False):
    kwargs, train = MODES[mode]
    model = sl.build(d_in=16, d_out=16 if square else 12, **kwargs)
    layer, *_ = sl.parts(model)
    layer.lora_magnitude_vector["default"].__class__ = cls  # the user's subclass, PEFT untouched
    return model, train


@pytest.mark.parametrize("mode", MODES)
def test_peft_formula_copied_into_a_subclass_is_rewritten(mode):
    """The control for the look-alikes below: the unchanged formula in a subclass is still DoRA."""
    model, train = _peft_with(PeftFormula, mode)
    ours, eager, backend = sl.eager_and_compiled(model, torch.randn(5, 16), train=train)
    assert len(backend.report.rewrites) == 1 and backend.report.near_misses == []
    sl.assert_matches(ours, eager)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cls", SUBCLASSES, ids=lambda c: c.__name__)
def test_subclass_that_changes_the_formula_is_a_near_miss(cls, mode):
    reason, square = SUBCLASSES[cls]
    model, train = _peft_with(cls, mode, square)
    ours, eager, backend = sl.eager_and_compiled(model, torch.randn(5, 16), train=train)
    assert backend.report.rewrites == []
    (miss,) = backend.report.near_misses
    assert reason in miss.reason, miss.reason
    assert miss.where.startswith("base_model.model.proj")
    sl.assert_matches(ours, eager)


class ExtraTerm(DoraLinearLayer):
    def forward(self, x, *, lora_A, lora_B, **kwargs):
        return super().forward(x, lora_A=lora_A, lora_B=lora_B, **kwargs) + 0.1 * lora_B(lora_A(x))


@pytest.mark.parametrize(
    "mode,rewritten",
    [("eval-bias", False), ("eval-no-bias", True), ("train-dropout", True)],
)
def test_extra_term_after_the_dora_output(mode, rewritten):
    """``dora + extra`` then ``result + (dora + extra)``. Where PEFT's base term is its own node
    (``linear(x, W)``: no bias in eval, or dropout), the extra term takes compose's ``result`` slot:
    ``compose(extra, base, ...) = extra + (g - 1)·base + g·s·lora`` is exactly ``dora + extra`` and the
    layer is rewritten. With ``result - bias`` as base it is not (``result`` must be what the bias was
    added to) and is reported. Either way the compiled model equals eager PEFT."""
    model, train = _peft_with(ExtraTerm, mode)
    ours, eager, backend = sl.eager_and_compiled(model, torch.randn(5, 16), train=train)
    sl.assert_matches(ours, eager)
    if rewritten:
        assert len(backend.report.rewrites) == 1 and backend.report.near_misses == []
    else:
        assert backend.report.rewrites == []
        (miss,) = backend.report.near_misses
        assert "is not the base layer's result" in miss.reason


# --------------------------------------------------------------------------------------------------
# Hand-written look-alikes
# --------------------------------------------------------------------------------------------------


class Hand(nn.Module):
    """PEFT's DoRA Linear written out; ``formula(self, x)`` decides what is actually computed."""

    def __init__(self, formula, d_in=12, d_out=12, r=3, scaling=2.0, magnitude_shape=None):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.weight = nn.Parameter(torch.randn(d_out, d_in, generator=gen), requires_grad=False)
        self.bias = nn.Parameter(torch.randn(d_out, generator=gen), requires_grad=False)
        self.lora_A = nn.Parameter(torch.randn(r, d_in, generator=gen))
        self.lora_B = nn.Parameter(torch.randn(d_out, r, generator=gen))
        self.other_A = nn.Parameter(torch.randn(r, d_in, generator=gen))
        self.magnitude = nn.Parameter((torch.rand(d_out, generator=gen) + 3).reshape(magnitude_shape or (d_out,)))
        self.scaling, self.formula = scaling, formula

    def product(self):  # B·A as PEFT computes it, [d_in, d_out] before the transpose
        return F.linear(F.linear(torch.eye(self.lora_A.shape[1]), self.lora_A), self.lora_B)

    def dense(self):
        return self.product().T

    def forward(self, x):
        return self.formula(self, x)


def _dora(p, x, *, norm_of=None, scaling=None, lora_A=None, keep=None):
    """The DoRA formula with one part swapped; ``keep`` returns extra intermediates as outputs."""
    s = p.scaling
    result = F.linear(x, p.weight, p.bias)
    summed = norm_of(p) if norm_of else p.weight + (s if scaling is None else scaling) * p.dense().detach()
    norm = torch.linalg.norm(summed, dim=1).detach()
    g = (p.magnitude / norm).view(1, -1)
    lora = F.linear(F.linear(x, p.lora_A if lora_A is None else lora_A), p.lora_B)
    base = result - p.bias
    out = result + ((g - 1) * base + g * lora * s)
    named = {"g": g, "base": base, "lora": lora, "result": result}
    return (out, *(named[k] for k in keep)) if keep else out


HAND_NEAR_MISSES = {
    "minus-dense": (
        {"formula": lambda p, x: _dora(p, x, norm_of=lambda p: p.weight - p.scaling * p.dense().detach())},
        "the norm's input is not W + s * linear(linear(eye, A), B).T",
    ),
    "dense-not-transposed": (
        {"formula": lambda p, x: _dora(p, x, norm_of=lambda p: p.weight + p.scaling * p.product())},
        "the norm's input is not W + s * linear(linear(eye, A), B).T",
    ),
    "tensor-scaling": (
        {"formula": lambda p, x: _dora(p, x, scaling=torch.tensor(2.0))},
        "the scaling of the dense product is not a",
    ),
    "magnitude-1xd": ({"formula": lambda p, x: _dora(p, x), "magnitude_shape": (1, 12)}, "magnitude shape (1, 12)"),
    "lora-path-other-A": ({"formula": lambda p, x: _dora(p, x, lora_A=p.other_A)}, "g = m / norm is not used as"),
    "g-returned-too": ({"formula": lambda p, x: _dora(p, x, keep=["g"])}, "an intermediate of the DoRA output"),
    "result-minus-bias-returned-too": ({"formula": lambda p, x: _dora(p, x, keep=["base"])}, "result - bias"),
}


def _compile_hand(module, x):
    compiled, backend = sl.compile_aot(module)
    out, ref = compiled(x), module(x)
    outs, refs = (out, ref) if isinstance(out, tuple) else ((out,), (ref,))
    for a, b in zip(outs, refs):
        torch.testing.assert_close(a, b)
    # gradients of every trainable parameter through the first output
    params = [p for p in module.parameters() if p.requires_grad]
    grads = torch.autograd.grad(outs[0].sum(), params, allow_unused=True)
    ref_grads = torch.autograd.grad(refs[0].sum(), params, allow_unused=True)
    for a, b in zip(grads, ref_grads):
        assert (a is None) == (b is None)
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    return backend.report


@pytest.mark.parametrize("case", HAND_NEAR_MISSES)
def test_hand_written_lookalike_is_a_near_miss(case):
    kwargs, reason = HAND_NEAR_MISSES[case]
    report = _compile_hand(Hand(**kwargs), torch.randn(5, 12))
    assert report.rewrites == []
    (miss,) = report.near_misses
    assert reason in miss.reason, miss.reason


SPELLINGS = {
    "linalg.norm(ord=2, dim=1)": lambda w: torch.linalg.norm(w, ord=2, dim=1),
    "linalg.norm(w, 2, -1)": lambda w: torch.linalg.norm(w, 2, -1),
    "vector_norm(dim=(1,))": lambda w: torch.linalg.vector_norm(w, dim=(1,)),
    "Tensor.norm(dim=1)": lambda w: w.norm(dim=1),
    "torch.norm(p=2, dim=1)": lambda w: torch.norm(w, p=2, dim=1),
}


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_other_spellings_of_the_row_norm_are_rewritten(spelling):
    norm_fn = SPELLINGS[spelling]

    def formula(p, x):
        result = F.linear(x, p.weight, p.bias)
        norm = norm_fn(p.weight + p.scaling * p.dense().detach()).detach()
        g = (p.magnitude / norm).view(1, -1)
        lora = F.linear(F.linear(x, p.lora_A), p.lora_B)
        return result + ((g - 1) * (result - p.bias) + g * lora * p.scaling)

    report = _compile_hand(Hand(formula), torch.randn(5, 12))
    assert len(report.rewrites) == 1 and report.near_misses == []


def test_lora_and_result_also_used_elsewhere_are_still_rewritten():
    """``lora`` and ``result`` are inputs of dora_fx.compose, not replaced values: other users keep them."""
    report = _compile_hand(Hand(lambda p, x: _dora(p, x, keep=["lora", "result"])), torch.randn(5, 12))
    assert len(report.rewrites) == 1 and report.near_misses == []


# --------------------------------------------------------------------------------------------------
# Real DoRA in unusual arrangements: rewritten, once per use
# --------------------------------------------------------------------------------------------------


class CalledTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 16)

    def forward(self, x):
        return self.proj(torch.tanh(self.proj(x)))


def test_same_dora_layer_called_twice_is_rewritten_twice():
    model = sl.build(base=CalledTwice())
    ours, eager, backend = sl.eager_and_compiled(model, torch.randn(5, 16))
    assert len(backend.report.rewrites) == 2 and backend.report.near_misses == []
    sl.assert_matches(ours, eager)


def test_two_active_dora_adapters_on_one_layer():
    """PEFT adds each active adapter's DoRA term in turn; the second one's ``result`` includes the first."""
    from peft import LoraConfig

    model = sl.build()
    model.add_adapter("other", LoraConfig(r=3, lora_alpha=5, target_modules=["proj"], use_dora=True))
    layer, *_ = sl.parts(model)
    with torch.no_grad():
        layer.lora_B["other"].weight.normal_(generator=torch.Generator().manual_seed(2))
    model.base_model.set_adapter(["default", "other"])
    ours, eager, backend = sl.eager_and_compiled(model, torch.randn(5, 16))
    assert len(backend.report.rewrites) == 2 and backend.report.near_misses == []
    assert sorted(r.r for r in backend.report.rewrites) == [3, 4]
    sl.assert_matches(ours, eager)
