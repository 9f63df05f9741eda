"""``dora_fx.kernels.compose`` (forward and backward) against the reference math.

Each output is checked twice: against a float64 evaluation (error within the output dtype's
rounding), and element by element against the reference run on the same inputs (float32 math, one
rounding): at most one unit in the last place of the output, plus a few float32 roundings of the
terms summed (the kernel may fuse a multiply and an add where PyTorch rounds twice).
CPU: Triton's interpreter at small, odd shapes; CUDA: full sizes.
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from dora_fx.kernels import compose, reference

# The small-shape tests run under Triton's interpreter on the CPU, and on the GPU where there is one.
SMALL_SHAPE_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

_REL_TO_FLOAT64 = {torch.float32: 1e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}


def _make(shape, dtype, has_base, has_bias, device=None, seed=0, magnitude_dtype=None):
    device = device or SMALL_SHAPE_DEVICE
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*size, dt=dtype):
        return torch.randn(size, generator=gen, device=device).to(dt)

    n = shape[-1]
    magnitude = (torch.rand(n, generator=gen, device=device) + 0.5).to(magnitude_dtype or dtype)
    # Trained magnitudes sit near the norm: g - 1 is small, where cancellation would show.
    norm = magnitude.float() * (1 + 0.05 * torch.randn(n, generator=gen, device=device))
    return dict(
        result=randn(*shape),
        base=randn(*shape) if has_base else None,
        bias=randn(n) if has_bias else None,
        lora=randn(*shape),
        magnitude=magnitude,
        norm=norm,
        scaling=1.7,
    )


def _f64(t):
    return None if t is None else t.double()


def _poison(device, nbytes):
    junk = [torch.full((nbytes // 4 + 1,), float("nan"), device=device) for _ in range(4)]
    del junk


def _assert_matches(got, same_inputs, float64, dtype, terms):
    """``terms``: float64 sum of the absolute values of the terms that make each element."""
    assert got.dtype == same_inputs.dtype and got.shape == same_inputs.shape
    assert torch.isfinite(got).all(), "unwritten or non-finite output"
    rel = ((got.double() - float64).norm() / float64.norm()).item()
    assert rel < _REL_TO_FLOAT64[dtype], f"relative error to float64 {rel:.2e}"
    bound = torch.finfo(got.dtype).eps * same_inputs.double().abs() + 4 * torch.finfo(torch.float32).eps * terms
    excess = (got.double() - same_inputs.double()).abs() - bound
    assert excess.max().item() <= 0, f"{(excess > 0).sum().item()} elements differ from the reference beyond rounding"


def _terms(t):
    """|result| + |g - 1|·|base| + |g·s|·|lora| in float64, per element."""
    m, n = t["magnitude"].double(), t["norm"].double()
    g = m / n
    result = t["result"].double()
    base = t["base"].double() if t["base"] is not None else result - (0 if t["bias"] is None else t["bias"].double())
    return result.abs() + ((g - 1).abs() * base.abs()) + (g * t["scaling"]).abs() * t["lora"].double().abs()


def _adapted_terms(t):
    """|base| + |s|·|lora| in float64, per element."""
    result = t["result"].double()
    base = t["base"].double() if t["base"] is not None else result - (0 if t["bias"] is None else t["bias"].double())
    return base.abs() + abs(t["scaling"]) * t["lora"].double().abs()


def _check_forward(t, **kwargs):
    """Both forward launchers: ``compose`` and ``compose_with_adapted`` (same ``out``, plus ``adapted``)."""
    args = (t["result"], t["base"], t["bias"], t["lora"], t["magnitude"], t["norm"], t["scaling"])
    _poison(t["result"].device, t["result"].numel() * 4)
    got = compose.compose(*args, **kwargs)
    same, same_adapted = reference.compose_with_adapted(*args)
    exact, exact_adapted = reference.compose_with_adapted(*map(_f64, args[:-1]), args[-1])
    _assert_matches(got, same, exact, same.dtype, _terms(t))
    assert got.stride() == torch.empty_like(t["result"], dtype=got.dtype).stride()
    _poison(t["result"].device, t["result"].numel() * 8)
    got_out, got_adapted = compose.compose_with_adapted(*args, **kwargs)
    assert torch.equal(got_out, got), "compose_with_adapted's output differs from compose's"
    _assert_matches(got_adapted, same_adapted, exact_adapted, same_adapted.dtype, _adapted_terms(t))
    assert got_adapted.stride() == got.stride()
    return got_adapted


def _check_backward(t, grad_out, **kwargs):
    """The backward from ``adapted`` (as the forward kernel wrote it) against the reference math."""
    args = (t["result"], t["base"], t["bias"], t["lora"], t["magnitude"], t["norm"], t["scaling"])
    adapted = compose.compose_with_adapted(*args)[1]
    main = t["result"] if t["base"] is None else t["base"]
    form = (t["scaling"], t["base"] is not None, main.dtype, t["lora"].dtype)
    _poison(grad_out.device, grad_out.numel() * 8)
    got = compose.compose_backward(grad_out, adapted, t["magnitude"], t["norm"], *form, **kwargs)
    same = reference.compose_backward(grad_out, adapted, t["magnitude"], t["norm"], *form)
    # float64: the gradients of the exact compose (adapted unrounded).
    exact_adapted = reference.adapted(*map(_f64, args[:4]), args[-1], torch.float64)
    exact = reference.compose_backward(
        grad_out.double(), exact_adapted, *map(_f64, args[4:6]), *form[:2], torch.float64, torch.float64
    )
    for name, g, s, e in zip(("grad_main", "grad_lora", "grad_magnitude"), got, same, exact):
        try:
            if name == "grad_magnitude":  # a sum over tokens: summation order differs, compare in float64
                assert g.dtype == s.dtype and g.shape == s.shape
                rel = ((g.double() - e).norm() / e.norm()).item()
                assert rel < max(_REL_TO_FLOAT64[g.dtype], 1e-5), f"relative error to float64 {rel:.2e}"
            else:
                _assert_matches(g, s, e, s.dtype, e.abs())
        except AssertionError as exc:
            raise AssertionError(f"{name}: {exc}") from exc


_CASES = [
    # shape, base given, bias
    ((7, 33), False, True),
    ((2, 25, 5), True, False),
    ((1, 130), False, False),
    ((50, 33), False, True),
    ((3, 1, 17), True, False),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape, has_base, has_bias", _CASES)
def test_forward_and_backward_match_reference(shape, has_base, has_bias, dtype):
    t = _make(shape, dtype, has_base, has_bias)
    _check_forward(t)
    _check_backward(t, torch.randn(shape, generator=torch.Generator().manual_seed(9)).to(t["result"].device, dtype))


def test_many_row_strips_in_backward():
    # Small tiles force several row strips, so grad_magnitude goes through the partial-sum buffer.
    t = _make((50, 37), torch.float32, False, True, seed=1)
    cfg = compose.ComposeConfig(block_t=4, block_n=16, num_warps=4, programs_per_sm=8)
    grad = torch.randn(50, 37, device=SMALL_SHAPE_DEVICE)
    _check_forward(t, config=cfg)
    _check_backward(t, grad, config=cfg)


def test_mixed_dtypes_promote_like_peft():
    # bf16 activations with a float32 magnitude: out and grad_magnitude follow PyTorch's promotion.
    t = _make((7, 33), torch.bfloat16, False, True, seed=2, magnitude_dtype=torch.float32)
    _check_forward(t)
    _check_backward(t, torch.randn(7, 33, device=SMALL_SHAPE_DEVICE).to(torch.bfloat16))


def test_strided_inputs():
    wide = torch.randn(3, 9, 40, device=SMALL_SHAPE_DEVICE)
    t = _make((3, 9, 33), torch.float32, True, False, seed=3)
    t["result"] = wide[..., :33]  # row stride 40: read in place
    t["lora"] = torch.randn(3, 33, 9, device=SMALL_SHAPE_DEVICE).transpose(1, 2)  # feature stride != 1: copied
    _check_forward(t)
    _check_backward(t, torch.randn(9, 3, 33, device=SMALL_SHAPE_DEVICE).transpose(0, 1))  # non-contiguous grad_out


def test_float64_follows_reference():
    t = _make((4, 6), torch.float64, False, True, seed=4)
    args = (t["result"], t["base"], t["bias"], t["lora"], t["magnitude"], t["norm"], t["scaling"])
    torch.testing.assert_close(compose.compose(*args), reference.compose(*args))
    for g, r in zip(compose.compose_with_adapted(*args), reference.compose_with_adapted(*args)):
        torch.testing.assert_close(g, r)
    grad = torch.randn(4, 6, dtype=torch.float64, device=SMALL_SHAPE_DEVICE)
    backward_args = (grad, reference.adapted(*args[:4], args[-1], torch.float64), t["magnitude"], t["norm"], 1.7, False,
                     torch.float64, torch.float64)
    for g, r in zip(compose.compose_backward(*backward_args), reference.compose_backward(*backward_args)):
        torch.testing.assert_close(g, r)


# --------------------------------------------------------------------------------------- CUDA


@pytest.mark.cuda
@pytest.mark.parametrize(
    "shape, has_base, has_bias, dtype",
    [
        ((4096, 4096), False, True, torch.bfloat16),
        ((2, 2048, 8192), True, False, torch.bfloat16),
        ((4096, 14336), False, False, torch.bfloat16),
        ((1, 512, 8192), False, True, torch.float16),
        ((4096, 4096), True, False, torch.float32),
        ((77, 1000), False, True, torch.bfloat16),
    ],
)
def test_cuda_full_sizes(shape, has_base, has_bias, dtype):
    t = _make(shape, dtype, has_base, has_bias, device="cuda")
    _check_forward(t)
    _check_backward(t, torch.randn(shape, device="cuda").to(dtype))


@pytest.mark.cuda
@pytest.mark.parametrize("traced_as_reference", [True, False])
def test_cuda_op_in_torch_compile(traced_as_reference, monkeypatch):
    """By default torch.compile traces the compose ops' PyTorch math, which Inductor fuses (no dora_fx
    kernel runs); with the op names taken out of ``dispatch.TRACED_AS_REFERENCE`` Inductor launches the
    Triton kernels. Either way the gradients meet the numerics policy."""
    import dora_fx.ops  # noqa: F401  registers torch.ops.dora_fx
    from dora_fx.kernels import dispatch

    if not traced_as_reference:
        monkeypatch.setattr(dispatch, "TRACED_AS_REFERENCE", set())

    t = _make((256, 1024), torch.bfloat16, False, True, device="cuda")
    result = t["result"].requires_grad_()
    lora = t["lora"].requires_grad_()
    magnitude = t["magnitude"].requires_grad_()

    def fn(result, lora, magnitude):  # what rewritten training graphs call
        args = (result, None, t["bias"], lora, magnitude, t["norm"], t["scaling"])
        out, _ = torch.ops.dora_fx.compose_with_adapted(*args)
        return (out.float() * 2).sum()

    from torch._inductor.utils import fresh_cache

    compiled = torch.compile(fn, backend="inductor")
    with fresh_cache():  # the dispatch choice is made while tracing: no graph cached by the other case
        compiled(result, lora, magnitude).backward()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        loss = compiled(result, lora, magnitude)
        grads = torch.autograd.grad(loss, (result, lora, magnitude))
        torch.cuda.synchronize()
    names = {event.name for event in prof.events()}
    for kernel in ("_compose_kernel", "_compose_backward_kernel"):
        assert any(kernel in name for name in names) != traced_as_reference, sorted(names)

    def peft(result, lora, magnitude, dtype):  # PEFT's eager ops
        g = (magnitude.to(dtype) / t["norm"].to(dtype)).view(1, -1)
        base = result.to(dtype) - t["bias"].to(dtype)
        return ((result.to(dtype) + (g - 1) * base + g * lora.to(dtype) * t["scaling"]) * 2).float().sum()

    # Against PEFT's math in float32 (on these bf16 values, close to exact), each gradient is at least
    # about as accurate as PEFT's own bf16 ops: the numerics policy. The magnitude gradient sums
    # d·adapted over the tokens, with `adapted` saved in bf16 (docs/behaviour.md), so single elements
    # where the sum cancels can differ by more than an elementwise tolerance would allow.
    exact = torch.autograd.grad(peft(result, lora, magnitude, torch.float32), (result, lora, magnitude))
    eager = torch.autograd.grad(peft(result, lora, magnitude, torch.bfloat16), (result, lora, magnitude))
    for name, ours, e, peft_bf16 in zip(("result", "lora", "magnitude"), grads, exact, eager):
        error = ((ours.float() - e).norm() / e.norm()).item()
        peft_error = ((peft_bf16.float() - e).norm() / e.norm()).item()
        assert error <= 2 * peft_error + 1e-3, (name, error, peft_error)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_from_the_output(dtype):
    """``from_output``: the saved tensor is ``out = g·adapted`` and the magnitude's sum divides by ``m``."""
    t = _make((2, 7, 37), dtype, False, False, seed=3)
    grad_out = torch.randn_like(t["result"])
    g = t["magnitude"].float() / t["norm"]
    out = (g * (t["result"].float() + 0.8 * t["lora"].float())).to(dtype)
    args = (grad_out, out, t["magnitude"], t["norm"], 0.8, False, dtype, dtype, True)
    got = compose.compose_backward(*args)
    expected = reference.compose_backward(*args)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-5)


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_magnitude_grad_matches_reference(fan_in_fan_out, dtype):
    """Features with ``m = 0`` in two of three 16-feature blocks (one block without any only copies):
    ``Σ_t d·x·(W + s·B·A)_jᵀ / norm_j`` there, rounded to the gradient's dtype, and exactly the
    gradient from the output elsewhere."""
    gen = torch.Generator().manual_seed(4)
    d_out, d_in, r, tokens = 40, 70, 5, 13
    randn = lambda *s: torch.randn(s, generator=gen).to(dtype).to(SMALL_SHAPE_DEVICE)  # noqa: E731
    weight = randn(d_in, d_out) if fan_in_fan_out else randn(d_out, d_in)
    lora_A, lora_B, x, grad_out = randn(r, d_in), randn(d_out, r), randn(tokens, d_in), randn(tokens, d_out)
    magnitude = randn(d_out).abs() + 0.5
    zero = [1, 2, 15, 33, 39]
    magnitude[zero] = 0
    norm = torch.rand(d_out, generator=gen).to(SMALL_SHAPE_DEVICE) + 0.5
    from_output = randn(d_out)
    args = (from_output, grad_out, x, weight, lora_A, lora_B, 1.5, magnitude, norm, fan_in_fan_out)
    got = compose.zero_magnitude_grad(*args)
    expected = reference.zero_magnitude_grad(*args)
    assert got.dtype == dtype and (got[magnitude != 0] == from_output[magnitude != 0]).all()
    assert (expected[zero] != from_output[zero]).all()
    rtol = 2e-5 if dtype == torch.float32 else 2**-7  # bfloat16: within one rounding of the sum
    torch.testing.assert_close(got.float(), expected.float(), rtol=rtol, atol=rtol * expected.abs().max().item())


@pytest.mark.cuda
def test_zero_magnitude_grad_relaunches_its_compiled_kernel_for_other_layouts():
    """After the first launch the kernel goes through its kept compiled form
    (``launch.CompiledLaunches``), which must serve any shape, stride and alignment of the same dtypes:
    here a second layer of other sizes, with inputs that are strided and start off 16-byte boundaries."""
    gen = torch.Generator(device="cuda").manual_seed(5)
    randn = lambda *s: torch.randn(s, generator=gen, device="cuda")  # noqa: E731
    launches = compose._zero_magnitude_launches
    launches._compiled.clear()
    for d_out, d_in, r, tokens, offset in ((40, 70, 5, 13, 0), (77, 130, 9, 29, 1)):
        weight = randn(d_out, d_in + offset)[:, offset:]
        x = randn(tokens, d_in + 3)[:, offset : offset + d_in]
        lora_A, lora_B, grad_out = randn(r, d_in), randn(d_out, r), randn(tokens, d_out + offset)[:, offset:]
        magnitude = randn(d_out).abs() + 0.5
        magnitude[::7] = 0
        norm = torch.rand(d_out, generator=gen, device="cuda") + 0.5
        args = (randn(d_out), grad_out, x, weight, lora_A, lora_B, 0.7, magnitude, norm, False)
        got = compose.zero_magnitude_grad(*args)
        expected = reference.zero_magnitude_grad(*args)
        torch.testing.assert_close(got, expected, rtol=2e-5, atol=2e-5 * expected.abs().max().item())
    assert len(launches._compiled) == 1


@triton.jit
def _rounded_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, compose._rounded_to_bfloat16(tl.load(x_ptr + offs, mask=mask)), mask=mask)


def test_bfloat16_rounding_of_the_four_bit_decode_is_round_to_nearest_even():
    """``_rounded_to_bfloat16`` (the 4-bit decode's rounding) gives torch's float32 -> bfloat16 cast
    bit for bit, ties, negatives and the largest finite values included, here and under the interpreter
    (whose own bfloat16 cast truncates)."""
    # The premise: torch's cast rounds to nearest, ties to even (1 + 2^-8 is a tie between 1 and 1 + 2^-7).
    assert torch.tensor([1 + 2**-8, 1 + 3 * 2**-8]).bfloat16().tolist() == [1.0, 1 + 2**-6]
    gen = torch.Generator().manual_seed(0)
    bits = torch.randint(-(2**31), 2**31 - 1, (4096,), generator=gen, dtype=torch.int64).to(torch.int32)
    random = bits.view(torch.float32)
    random = random[random.abs() < torch.finfo(torch.bfloat16).max]  # finite, and finite once rounded
    # Exact ties between two bfloat16 values, with an even and an odd lower neighbour, of both signs.
    ties = torch.tensor([0x3F808000, 0x3F818000, 0x40490000 | 0x8000, 0x7F7E8000], dtype=torch.int32)
    ties = ties.view(torch.float32)
    x = torch.cat([random, ties, -ties, torch.tensor([0.0, -0.0, 1.0, 1e-40])]).to(SMALL_SHAPE_DEVICE)
    out = torch.empty_like(x)
    _rounded_kernel[(triton.cdiv(x.numel(), 1024),)](x, out, x.numel(), BLOCK=1024)
    assert torch.equal(out.view(torch.int32), x.bfloat16().float().view(torch.int32))
