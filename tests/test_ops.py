"""The dora_fx custom ops: registration, fake implementations, autograd and input validation."""

from __future__ import annotations

import pytest
import torch

import dora_fx.ops  # noqa: F401
from dora_fx import dtypes
from dora_fx.kernels import reference


def _norm_inputs(d_out=7, d_in=5, r=3, fan_in_fan_out=False, dtype=torch.float64):
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(d_out, d_in, generator=gen, dtype=dtype)
    lora_A = torch.randn(r, d_in, generator=gen, dtype=dtype)
    lora_B = torch.randn(d_out, r, generator=gen, dtype=dtype)
    stored = weight.T.contiguous() if fan_in_fan_out else weight
    return weight, (stored, lora_A, lora_B, 1.5, fan_in_fan_out)


def _compose_inputs(form: str, shape=(2, 3, 6), dtype=torch.float64):
    gen = torch.Generator().manual_seed(1)

    def rand(*s):
        return torch.randn(*s, generator=gen, dtype=dtype, requires_grad=True)

    n = shape[-1]
    result, lora = rand(*shape), rand(*shape)
    base = rand(*shape) if form == "base" else None
    bias = rand(n) if form == "bias" else None
    magnitude = rand(n)
    norm = (torch.rand(n, generator=gen, dtype=dtype) + 0.5)
    return result, base, bias, lora, magnitude, norm, 0.75


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_weight_norm_equals_dense_norm(fan_in_fan_out):
    weight, args = _norm_inputs(fan_in_fan_out=fan_in_fan_out)
    _, lora_A, lora_B, scaling, _ = args
    expected = torch.linalg.norm(weight + scaling * lora_B @ lora_A, dim=1)
    torch.testing.assert_close(torch.ops.dora_fx.weight_norm(*args), expected)


def test_weight_norm_clamps_cancellation_to_zero():
    """W = -fl(B·A) (s = 1): the norm cancels to rounding level; rounding must not turn it into NaN.

    Bound: the float32 product B·A (r = 2 terms) is off by at most about r·(eps/2)·(|B|·|A|) per
    element, both where W was built and where the op recomputes a cancelled row densely, and the
    subtraction of two such nearly equal values is exact. So ``norm_i <= r·eps·|| |B_i|·|A| ||``;
    twice that is asserted (|| |B_i|·|A| || is about 1.3·||W_i|| here). A row left to the factored sum
    would give of order sqrt(eps)·||W_i||, hundreds of times more. Measured (CPU): exactly 0 (the same
    product twice).
    """
    gen = torch.Generator().manual_seed(2)
    r = 2
    lora_A, lora_B = torch.randn(r, 64, generator=gen), torch.randn(8, r, generator=gen)
    weight = -(lora_B @ lora_A)
    norm = torch.ops.dora_fx.weight_norm(weight, lora_A, lora_B, 1.0, False)
    assert torch.isfinite(norm).all() and (norm >= 0).all()
    bound = 2 * r * torch.finfo(torch.float32).eps * (lora_B.abs() @ lora_A.abs()).norm(dim=1)
    assert (norm <= bound).all(), (norm / bound).max()


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_weight_norm_opcheck(fan_in_fan_out):
    _, args = _norm_inputs(fan_in_fan_out=fan_in_fan_out, dtype=torch.float32)
    torch.library.opcheck(torch.ops.dora_fx.weight_norm.default, args)


@pytest.mark.parametrize("form", ["plain", "bias", "base"])
def test_compose_matches_peft_formula_and_gradcheck(form):
    result, base, bias, lora, magnitude, norm, s = _compose_inputs(form)
    g = (magnitude / norm).view(1, -1)
    base_eff = base if base is not None else (result - bias if bias is not None else result)
    expected = result + (g - 1) * base_eff + g * lora * s
    torch.testing.assert_close(torch.ops.dora_fx.compose(result, base, bias, lora, magnitude, norm, s), expected)
    inputs = (result, base, bias, lora, magnitude, norm, s)
    assert torch.autograd.gradcheck(lambda *t: torch.ops.dora_fx.compose(*t), inputs)


@pytest.mark.parametrize("form", ["plain", "bias", "base"])
def test_compose_with_adapted_gradcheck_and_adapted_is_not_differentiable(form):
    result, base, bias, lora, _, _, s = inputs = _compose_inputs(form)
    out, adapted = torch.ops.dora_fx.compose_with_adapted(*inputs)
    torch.testing.assert_close(out, torch.ops.dora_fx.compose(*inputs))
    base_eff = base if base is not None else (result - bias if bias is not None else result)
    torch.testing.assert_close(adapted, base_eff + s * lora)
    assert out.requires_grad and not adapted.requires_grad
    assert torch.autograd.gradcheck(lambda *t: torch.ops.dora_fx.compose_with_adapted(*t)[0], inputs)


@pytest.mark.parametrize("form", ["plain", "bias", "base"])
def test_compose_with_adapted_opcheck(form):
    args = tuple(a.detach().float().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a
                 for a in _compose_inputs(form))
    torch.library.opcheck(torch.ops.dora_fx.compose_with_adapted.default, args)


@pytest.mark.parametrize("form", ["plain", "bias", "base"])
def test_compose_opcheck(form):
    args = tuple(a.detach().float().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a
                 for a in _compose_inputs(form))
    torch.library.opcheck(torch.ops.dora_fx.compose.default, args)


def test_compose_promotes_like_peft():
    result = torch.randn(4, 6, dtype=torch.bfloat16)
    magnitude = torch.rand(6) + 1
    out = torch.ops.dora_fx.compose(result, None, None, result.clone(), magnitude, torch.rand(6) + 1, 2.0)
    assert out.dtype == torch.float32  # bf16 activations with a float32 magnitude: PEFT returns float32
    assert dtypes.compose_dtype(result, None, result, magnitude.bfloat16()) == torch.bfloat16


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda a: a.update(lora=a["lora"][..., :-1]), "lora"),
        (lambda a: a.update(magnitude=a["magnitude"][:-1]), "magnitude must have shape"),
        (lambda a: a.update(base=a["result"].clone(), bias=a["magnitude"].clone()), "pass bias only when base is None"),
    ],
)
def test_compose_rejects_bad_inputs_clearly(mutate, message):
    result, _, _, lora, magnitude, norm, s = (t.detach() if isinstance(t, torch.Tensor) else t
                                               for t in _compose_inputs("plain"))
    args = dict(result=result, base=None, bias=None, lora=lora, magnitude=magnitude, norm=norm, scaling=s)
    mutate(args)
    with pytest.raises(ValueError, match=message):
        torch.ops.dora_fx.compose(*args.values())


def test_weight_norm_rejects_shapes_that_do_not_chain():
    _, (weight, lora_A, lora_B, s, _) = _norm_inputs()
    with pytest.raises(ValueError, match="shapes do not chain"):
        torch.ops.dora_fx.weight_norm(weight, lora_A[:, :-1], lora_B, s, False)


def _layer_inputs(zero_magnitudes: bool, dtype=torch.float64):
    """``(x, W, A, B, m, norm)`` of one layer, ``m`` zero in two features when asked."""
    gen = torch.Generator().manual_seed(2)
    x, weight, lora_A, lora_B = (torch.randn(*s, generator=gen, dtype=dtype) for s in ((2, 3, 5), (6, 5), (2, 5), (6, 2)))
    magnitude = torch.rand(6, generator=gen, dtype=dtype) + 0.5
    if zero_magnitudes:
        magnitude[[1, 4]] = 0
    norm = torch.rand(6, generator=gen, dtype=dtype) + 0.5
    return x.requires_grad_(), weight, lora_A.requires_grad_(), lora_B.requires_grad_(), magnitude.requires_grad_(), norm


@pytest.mark.parametrize("zero_magnitudes", [False, True])
def test_compose_saving_output_gradcheck(zero_magnitudes):
    """Gradients of the whole layer through ``compose_saving_output``, the features with ``m = 0``
    included (their magnitude gradient comes from ``zero_magnitude_grad``)."""
    x, weight, lora_A, lora_B, magnitude, norm = _layer_inputs(zero_magnitudes)

    def layer(x, lora_A, lora_B, magnitude):
        result, scaled_lora = x @ weight.T, (1.5 * (x @ lora_A.T)) @ lora_B.T
        return torch.ops.dora_fx.compose_saving_output(
            result, scaled_lora, magnitude, norm, 1.5, x, weight, lora_A, lora_B, False
        )

    expected = (magnitude / norm) * (x @ weight.T + 1.5 * (x @ lora_A.T) @ lora_B.T)
    torch.testing.assert_close(layer(x, lora_A, lora_B, magnitude), expected)
    assert torch.autograd.gradcheck(layer, (x, lora_A, lora_B, magnitude))


def test_compose_saving_output_and_zero_magnitude_grad_opcheck():
    x, weight, lora_A, lora_B, magnitude, norm = (t.detach().float() for t in _layer_inputs(True))
    result, scaled_lora = x @ weight.T, (1.5 * (x @ lora_A.T)) @ lora_B.T
    torch.library.opcheck(
        torch.ops.dora_fx.compose_saving_output.default,
        (result, scaled_lora, magnitude.requires_grad_(), norm, 1.5, x, weight, lora_A, lora_B, False),
    )
    grad_out = torch.randn_like(result)
    torch.library.opcheck(
        torch.ops.dora_fx.zero_magnitude_grad.default,
        (torch.randn_like(magnitude), grad_out, x, weight, lora_A, lora_B, 1.5, magnitude.detach(), norm, False),
    )


def test_compose_saving_output_gives_result_and_lora_one_gradient_tensor():
    """``s`` is on the LoRA activation, so ``result`` and ``scaled_lora`` get the same gradient,
    ``g·d``: one tensor, not two of the output's size."""
    x, weight, lora_A, lora_B, magnitude, norm = (t.detach().float() for t in _layer_inputs(False))
    result = (x @ weight.T).requires_grad_()
    scaled_lora = ((1.5 * (x @ lora_A.T)) @ lora_B.T).requires_grad_()
    out = torch.ops.dora_fx.compose_saving_output(
        result, scaled_lora, magnitude.requires_grad_(), norm, 1.5, x, weight, lora_A, lora_B, False
    )
    grad_out = torch.randn_like(out)
    grad_result, grad_lora = torch.autograd.grad(out, (result, scaled_lora), grad_out)
    torch.testing.assert_close(grad_result, (magnitude / norm).detach() * grad_out)
    assert grad_lora.data_ptr() == grad_result.data_ptr()
