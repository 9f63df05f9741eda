"""``dora_fx.kernels.norm.weight_norm`` against a float64 evaluation of the reference math.

CPU: Triton's interpreter (``tests/conftest.py``) at small, odd shapes. CUDA: full sizes, and the
custom op inside ``torch.compile`` launching the kernel.
"""

from __future__ import annotations

import pytest
import torch

from dora_fx.kernels import norm, reference

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# The small-shape tests run under Triton's interpreter on the CPU, and on the GPU where there is one.
SMALL_SHAPE_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Relative error allowed on the squared norm, measured against ||W_i||² + s²||(BA)_i||² (the size of
# the terms that cancel). float32: tf32x3 products on the GPU; 16-bit: exact products, fp32 sums,
# and G split into two bf16 halves (about 16 bits) for the s²<B, BG> term.
_TOL = {torch.float32: 2e-5, torch.bfloat16: 1e-4, torch.float16: 1e-4}


def _make(d_out, d_in, r, dtype, fan_in_fan_out, device=None, seed=0):
    device = device or SMALL_SHAPE_DEVICE
    gen = torch.Generator(device=device).manual_seed(seed)
    shape = (d_in, d_out) if fan_in_fan_out else (d_out, d_in)
    weight = torch.randn(shape, generator=gen, device=device).to(dtype)
    lora_A = (torch.randn(r, d_in, generator=gen, device=device) / d_in**0.5).to(dtype)
    lora_B = torch.randn(d_out, r, generator=gen, device=device).to(dtype)  # never zero (DESIGN.md §8)
    return weight, lora_A, lora_B


def _poison(device, nbytes):
    """Leave NaN-filled blocks in the allocator so an unwritten output element shows up as NaN."""
    junk = [torch.full((nbytes // 4 + 1,), float("nan"), device=device) for _ in range(4)]
    del junk


def _check(weight, lora_A, lora_B, scaling, fan_in_fan_out, **kwargs):
    d_out = lora_B.shape[0]
    _poison(weight.device, 4 * d_out * max(1, lora_A.shape[0]))
    got = norm.weight_norm(weight, lora_A, lora_B, scaling, fan_in_fan_out, **kwargs)
    assert got.dtype == reference.norm_dtype(weight, lora_A, lora_B)
    assert got.shape == (d_out,) and got.device == weight.device
    w, a, b = weight.double(), lora_A.double(), lora_B.double()
    expected = reference.weight_norm(w, a, b, scaling, fan_in_fan_out)
    w_rows = w.T if fan_in_fan_out else w
    size = w_rows.square().sum(1) + scaling**2 * (b @ a).square().sum(1)
    assert torch.isfinite(got).all()
    err = (got.double().square() - expected.square()).abs() / size
    tol = _TOL[torch.promote_types(torch.promote_types(weight.dtype, lora_A.dtype), lora_B.dtype)]
    assert err.max().item() < tol, f"max relative error on the squared norm {err.max().item():.2e}"
    return got


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "d_out, d_in, r, fan_in_fan_out",
    [(33, 130, 17, False), (5, 37, 70, True), (33, 1, 1, False), (5, 130, 3, True)],
)
def test_matches_reference(d_out, d_in, r, fan_in_fan_out, dtype):
    _check(*_make(d_out, d_in, r, dtype, fan_in_fan_out), 0.7, fan_in_fan_out)


def test_several_lora_column_blocks():
    # r = 70 over 32-wide column tiles: three programs per row block share the W² row sums.
    weight, lora_A, lora_B = _make(20, 70, 70, torch.bfloat16, False, seed=1)
    _check(weight, lora_A, lora_B, 2.0, False)


@pytest.mark.parametrize("round_robin", [True, False])
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_split_k_and_square_sharing(round_robin, fan_in_fan_out):
    # Three column blocks x three d_in slices: nine partial squared norms per row, finalised apart.
    cfg = norm.NormConfig(16, 16, 16, 4, 1, split_k=3, round_robin_squares=round_robin)
    weight, lora_A, lora_B = _make(33, 130, 37, torch.bfloat16, fan_in_fan_out, seed=6)
    _check(weight, lora_A, lora_B, 0.9, fan_in_fan_out, config=cfg)


def test_strided_weight_is_read_in_place():
    base = torch.randn(40, 140, dtype=torch.bfloat16, device=SMALL_SHAPE_DEVICE)
    weight = base[3:36, ::2]  # [33, 70], non-contiguous rows and columns
    _, lora_A, lora_B = _make(33, 70, 5, torch.bfloat16, False, seed=2)
    _check(weight, lora_A, lora_B, -1.5, False)
    _check(weight.T, lora_A, lora_B, -1.5, True)


def test_mixed_dtypes():
    weight, lora_A, lora_B = _make(9, 45, 6, torch.bfloat16, False, seed=3)
    _check(weight, lora_A.float(), lora_B.float(), 0.5, False)


def test_cancellation_clamps_at_zero():
    # W = -s·B·A exactly (in float64 terms): the squared norm cancels to about zero, never NaN.
    _, lora_A, lora_B = _make(8, 32, 4, torch.float32, False, seed=4)
    weight = -(lora_B.double() @ lora_A.double()).float()
    got = norm.weight_norm(weight, lora_A, lora_B, 1.0, False)
    assert torch.isfinite(got).all() and (got >= 0).all()
    assert got.max().item() < 1e-2 * weight.norm(dim=1).max().item()


def test_float64_follows_reference():
    weight, lora_A, lora_B = _make(7, 19, 3, torch.float64, False, seed=5)
    got = norm.weight_norm(weight, lora_A, lora_B, 0.3, False)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, reference.weight_norm(weight, lora_A, lora_B, 0.3, False))


# --------------------------------------------------------------------------------------- CUDA


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize(
    "d_out, d_in, r, fan_in_fan_out, dtype",
    [
        (4096, 4096, 16, False, torch.bfloat16),
        (8192, 8192, 384, False, torch.bfloat16),
        (4096, 14336, 512, False, torch.bfloat16),
        (14336, 4096, 64, True, torch.bfloat16),
        (4096, 4096, 384, False, torch.float16),
        (4096, 4096, 64, True, torch.float32),
        (1000, 777, 70, False, torch.bfloat16),
    ],
)
def test_cuda_full_sizes(d_out, d_in, r, fan_in_fan_out, dtype):
    _check(*_make(d_out, d_in, r, dtype, fan_in_fan_out, device="cuda"), 2.0, fan_in_fan_out)


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("r", [16, 384])
def test_cuda_run_to_run_identical(r):
    # No atomics and no races: the same inputs give the same bits.
    weight, lora_A, lora_B = _make(8192, 8192, r, torch.bfloat16, False, device="cuda", seed=7)
    first = norm.weight_norm(weight, lora_A, lora_B, 2.0, False)
    for _ in range(3):
        assert torch.equal(norm.weight_norm(weight, lora_A, lora_B, 2.0, False), first)


@pytest.mark.cuda
@cuda
def test_cuda_op_in_torch_compile_launches_the_kernel(monkeypatch):
    import dora_fx.ops  # noqa: F401  registers torch.ops.dora_fx
    from dora_fx import norm_cache
    from dora_fx.kernels import dispatch

    calls = []
    launcher = norm.weight_norm

    def counting(*args, **kwargs):
        calls.append(args[0].device)
        return launcher(*args, **kwargs)

    monkeypatch.setattr(norm, "weight_norm", counting)  # dispatch looks the launcher up per call
    weight, lora_A, lora_B = _make(1024, 2048, 64, torch.bfloat16, False, device="cuda")
    fn = torch.compile(lambda w, a, b: torch.ops.dora_fx.weight_norm(w, a, b, 2.0, False) * 1.5, backend="inductor")
    fn(weight, lora_A, lora_B)
    assert calls and calls[0].type == "cuda", "the compiled graph did not reach the Triton launcher"
    assert not any(name == "weight_norm" for name, _ in dispatch._reported_failures), "fell back to the reference"
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA], acc_events=True) as prof:
        for _ in range(2):
            norm_cache.clear()  # unchanged weights would reuse the first call's norm
            got = fn(weight, lora_A, lora_B)
        torch.cuda.synchronize()
    names = {event.name for event in prof.events()}
    assert any("_norm_partial_kernel" in name for name in names), sorted(n for n in names if not n.startswith("cu"))
    torch.testing.assert_close(got, 1.5 * reference.weight_norm(weight, lora_A, lora_B, 2.0, False), rtol=1e-4, atol=0)
