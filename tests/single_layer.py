"""One PEFT DoRA layer, eager and compiled with dora_fx (aot_eager inner backend), side by side.

Shared by the edge-case, fuzz and look-alike tests. The layer is a real ``peft`` DoRA ``lora.Linear``
over ``nn.Linear`` (or over transformers' ``Conv1D``, which gives ``fan_in_fan_out=True``), with a
non-zero LoRA ``B`` and magnitudes moved off ``||W + s·B·A||`` so that the norm and ``g - 1`` matter.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

import dora_fx
from tests.helpers import relative_error


class OneLayer(nn.Module):
    """``proj(x)``: the DoRA target, an ``nn.Linear`` or a GPT-2 style ``Conv1D`` (weight ``[d_in, d_out]``)."""

    def __init__(self, d_in: int, d_out: int, bias: bool = True, conv1d: bool = False):
        super().__init__()
        if conv1d:
            from transformers.pytorch_utils import Conv1D

            self.proj = Conv1D(d_out, d_in)  # Conv1D always has a bias
        else:
            self.proj = nn.Linear(d_in, d_out, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def build(
    d_in: int = 16,
    d_out: int = 12,
    r: int = 4,
    *,
    bias: bool = True,
    dropout: float = 0.0,
    conv1d: bool = False,
    alpha: float | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    base: nn.Module | None = None,
) -> nn.Module:
    """A PEFT DoRA model around :class:`OneLayer` (or ``base``, targeting its ``proj``), on the CPU."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    base = base if base is not None else OneLayer(d_in, d_out, bias, conv1d)
    config = LoraConfig(
        r=r, lora_alpha=alpha if alpha is not None else 2 * r, target_modules=["proj"], use_dora=True,
        lora_dropout=dropout, fan_in_fan_out=conv1d,
    )
    model = get_peft_model(base, config)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if "lora_B" in name:
                param.copy_(0.5 * noise)
            elif "lora_magnitude_vector" in name:
                param.mul_(1 + 0.1 * noise)
    return model.to(dtype)


def parts(model: nn.Module, name: str = "proj"):
    """``(layer, W, A, B, m, scaling)`` of the DoRA layer ``name`` (W as stored: ``[d_in, d_out]`` for Conv1D)."""
    layer = model.get_submodule(f"base_model.model.{name}")
    return (
        layer,
        layer.base_layer.weight,
        layer.lora_A["default"].weight,
        layer.lora_B["default"].weight,
        layer.lora_magnitude_vector["default"].weight,
        layer.scaling["default"],
    )


def compile_aot(model: nn.Module, fullgraph: bool = True):
    """``(compiled, backend)``: ``model`` under ``DoraBackend(inner="aot_eager")``, from a fresh Dynamo."""
    torch._dynamo.reset()
    backend = dora_fx.DoraBackend(inner="aot_eager")
    return torch.compile(model, backend=backend, fullgraph=fullgraph), backend


def step(fn: Callable, model: nn.Module, leaf: torch.Tensor, view: Callable = lambda t: t, seed: int = 1):
    """Forward ``fn(view(leaf))`` and backward a fixed random cotangent: ``(output, {name: grad})``.

    ``leaf`` is cloned into a fresh leaf (its strides are kept), so ``view`` can hand the model a
    transposed, strided or expanded tensor; the input's gradient is the leaf's. Parameter gradients
    are read from ``model`` and cleared before the step.
    """
    for p in model.parameters():
        p.grad = None
    leaf = leaf.detach().clone().requires_grad_(leaf.is_floating_point())
    torch.manual_seed(seed)  # dropout masks: eager and compiled draw the same ones
    out = fn(view(leaf))
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 7)).to(out)
    if out.requires_grad:
        (out.float() * cotangent.float()).sum().backward()
    grads = {"x": leaf.grad}
    grads |= {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return out.detach(), grads


def eager_and_compiled(model: nn.Module, x: torch.Tensor, view: Callable = lambda t: t, train: bool = True):
    """One training step of eager PEFT and of dora_fx: ``(ours, eager, backend)``, each ``(out, grads)``."""
    model.train(train)
    compiled, backend = compile_aot(model)
    ours = step(compiled, model, x, view)
    eager = step(model, model, x, view)
    return ours, eager, backend


def assert_matches(ours, eager, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    """Outputs and every gradient agree; ``atol`` is relative to the largest reference magnitude."""
    (out, grads), (ref, ref_grads) = ours, eager
    assert grads.keys() == ref_grads.keys()
    for name, a, b in [("output", out, ref)] + [(k, grads[k], ref_grads[k]) for k in ref_grads]:
        assert (a is None) == (b is None), name
        if a is None:
            continue
        scale = b.abs().max().item() if b.numel() else 1.0
        message = lambda m, name=name: f"{name}: {m}"
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol * max(scale, 1e-30), msg=message)


def assert_same_nonfinite(actual: torch.Tensor, expected: torch.Tensor, what: str, **tol) -> None:
    """Non-finite at exactly the same positions, and close where finite."""
    finite = torch.isfinite(expected)
    assert torch.equal(torch.isfinite(actual), finite), f"{what}: non-finite positions differ"
    torch.testing.assert_close(actual[finite], expected[finite], msg=lambda m: f"{what}: {m}", **tol)


def errors_against_float64(model: nn.Module, x: torch.Tensor, train: bool = True, context=None):
    """Relative errors of dora_fx and of eager PEFT against a float64 copy of the same weights and input.

    Returns ``{name: (dora_fx error, eager PEFT error)}`` for the output and every gradient. ``context``
    (e.g. an autocast context factory) wraps the low-precision runs, not the float64 reference.
    """
    import contextlib

    context = context or contextlib.nullcontext
    model.train(train)
    reference = copy.deepcopy(model).double()
    ref_out, ref_grads = step(reference, reference, x.double())
    with context():
        eager_out, eager_grads = step(model, model, x)
        compiled, backend = compile_aot(model)
        out, grads = step(compiled, model, x)
    assert len(backend.report.rewrites) == 1, backend.report
    errors = {"output": (relative_error(out, ref_out), relative_error(eager_out, ref_out))}
    for key, ref in ref_grads.items():
        errors[key] = (relative_error(grads[key], ref), relative_error(eager_grads[key], ref))
    return errors


def exact_row_norms(model: nn.Module, name: str = "proj") -> torch.Tensor:
    """``||W + s·B·A||_row`` in float64 from the stored weights (what the float64 reference computes)."""
    layer, W, A, B, _, s = parts(model, name)
    dense = W.double().T if layer.fan_in_fan_out else W.double()
    return torch.linalg.norm(dense + s * (B.double() @ A.double()), dim=1)


def norm_amplification(model: nn.Module, name: str = "proj") -> torch.Tensor:
    """:func:`amplification` of the DoRA layer ``name``'s rows."""
    layer, W, A, B, _, s = parts(model, name)
    return amplification(W.T if layer.fan_in_fan_out else W, A, B, s)


def amplification(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, s: float) -> torch.Tensor:
    """Per row, how much the factored fp32 norm can lose to cancellation (float64, ``[d_out]``).

    ``(Σ_j W_ij² + 2s·Σ_k |B_ik|·(|W_i|·|A_k|) + s²·Σ_j (Σ_k |B_ik|·|A_kj|)²) / norm_i²``: the factored
    sum's terms in absolute value over the result. 1-10 for ordinary rows; large where ``s·B_i·A``
    nearly cancels ``W_i`` (about ``(||W_i|| / norm_i)²``), or ``B_i·A`` cancels inside itself (r > d_in).
    The factored norm's relative error stays below about ``eps_fp32 · amplification``
    (docs/behaviour.md); ``weight`` is ``[d_out, d_in]``.
    """
    w, a, b = (t.detach().double() for t in (weight, lora_A, lora_B))
    exact_sq = (w + s * b @ a).square().sum(dim=1)
    cross = (b.abs() * (w.abs() @ a.abs().T)).sum(1)
    terms = w.square().sum(1) + 2 * s * cross + s * s * (b.abs() @ a.abs()).square().sum(1)
    return terms / exact_sq


def with_dora_fx_norm(model: nn.Module, name: str = "proj") -> nn.Module:
    """A copy of ``model`` whose eager PEFT forward uses dora_fx's factored norm instead of its dense one.

    Everything else is PEFT's own code, so in fp32 this copy and the rewritten model differ only by
    rounding order: it separates "the rewrite computes PEFT's formula" (tight) from "the factored norm is
    accurate" (within ``eps · amplification``, checked on its own).
    """
    clone = copy.deepcopy(model)
    layer, W, A, B, _, _ = parts(clone, name)
    dora = layer.lora_magnitude_vector["default"]

    def get_weight_norm(weight, lora_weight, scaling, adapter_name=None):
        return torch.ops.dora_fx.weight_norm(W, A, B, scaling, layer.fan_in_fan_out).to(weight.dtype)

    dora.get_weight_norm = get_weight_norm  # an instance attribute: PEFT's class is untouched
    return clone
