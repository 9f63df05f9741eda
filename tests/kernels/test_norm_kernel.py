"""``dora_fx.kernels.norm.weight_norm`` (GEMMs and a rows kernel) against a float64 evaluation of the
reference math.

CPU: Triton's interpreter (``tests/conftest.py``) at small, odd shapes. CUDA: full sizes, and the
custom op inside ``torch.compile`` launching the kernel.
"""

from __future__ import annotations

import pytest
import torch

from dora_fx import dtypes
from dora_fx.kernels import norm, reference

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


def _check(weight, lora_A, lora_B, scaling, fan_in_fan_out):
    d_out = lora_B.shape[0]
    _poison(weight.device, 4 * d_out * max(1, lora_A.shape[0]))
    got = norm.weight_norm(weight, lora_A, lora_B, scaling, fan_in_fan_out)
    assert got.dtype == dtypes.norm_dtype(weight, lora_A, lora_B)
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
    # r = 130 over 64-wide (interpreter) or 128-wide (GPU) column tiles: the rows kernel's column loop
    # takes several steps, the last one partial.
    weight, lora_A, lora_B = _make(20, 70, 130, torch.bfloat16, False, seed=1)
    _check(weight, lora_A, lora_B, 2.0, False)


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
    # W = -B·A computed in float64, rounded to float32 (s = 1): the squared norm cancels to rounding
    # level, never NaN. Bound: the stored W is off by at most eps/2·|W| per element; a cancelled row
    # is recomputed densely, where the float32 (CPU) or tf32x3 (CUDA, about 1.5·eps a product) B·A
    # over r = 4 terms is off by at most about (r/2 + 1.5)·eps·(|B|·|A|), and W + s·B·A then subtracts
    # exactly. So norm_i <= about 4·eps·|| |B_i|·|A| || (|| |B_i|·|A| || is about 1.3·||W_i||); 2·r·eps
    # is asserted. The factored sum alone would leave of order sqrt(eps)·||W_i||, hundreds of times
    # more. Measured (CPU interpreter, seeds 4-9): at most 0.44·eps·|| |B_i|·|A| ||.
    r = 4
    _, lora_A, lora_B = _make(8, 32, r, torch.float32, False, seed=4)
    weight = -(lora_B.double() @ lora_A.double()).float()
    got = norm.weight_norm(weight, lora_A, lora_B, 1.0, False)
    assert torch.isfinite(got).all() and (got >= 0).all()
    bound = 2 * r * torch.finfo(torch.float32).eps * (lora_B.abs() @ lora_A.abs()).norm(dim=1)
    assert (got <= bound).all(), (got / bound).max()


def test_float64_follows_reference():
    weight, lora_A, lora_B = _make(7, 19, 3, torch.float64, False, seed=5)
    got = norm.weight_norm(weight, lora_A, lora_B, 0.3, False)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, reference.weight_norm(weight, lora_A, lora_B, 0.3, False))


def _cancelling(d_out, d_in, r, dtype, fan_in_fan_out, scaling, remainder, rows, device=None, seed=8):
    """Inputs whose ``rows`` of ``W`` are ``-s·B_i·A`` plus a remainder ``remainder·||s·B_i·A||`` in a random
    direction, rounded to ``dtype``: ``norm_i ≈ remainder·||W_i||``, an amplification of about
    ``2 / remainder²`` (in bf16 the rounding of ``W`` alone leaves ``norm_i ≈ 1e-3·||W_i||``)."""
    weight, lora_A, lora_B = _make(d_out, d_in, r, dtype, False, device=device, seed=seed)
    w, a, b = weight.double(), lora_A.double(), lora_B.double()
    delta = scaling * b[rows] @ a
    direction = torch.randn(delta.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    direction = direction.to(delta.device)
    w[rows] = -delta + direction / direction.norm(dim=1, keepdim=True) * delta.norm(dim=1, keepdim=True) * remainder
    weight = w.to(dtype)
    return (weight.T.contiguous() if fan_in_fan_out else weight), lora_A, lora_B


def _relative_errors(got, weight, lora_A, lora_B, scaling, fan_in_fan_out):
    """``|got - exact| / exact`` per row, and the same for the dense form in float32 on upcast copies."""
    w_rows = (weight.T if fan_in_fan_out else weight).float()
    dense_fp32 = torch.linalg.norm(w_rows + scaling * (lora_B.float() @ lora_A.float()), dim=1).double()
    exact = torch.linalg.norm(w_rows.double() + scaling * lora_B.double() @ lora_A.double(), dim=1)
    return (got.double() - exact).abs() / exact, (dense_fp32 - exact).abs() / exact


# How far the kernel's dense recomputation may be from the float32 dense form: both are fp32 on the CPU;
# on the GPU the kernel multiplies float32 in tf32x3 (about fp32 accuracy, other rounding).
_DENSE_FACTOR = 2.0 if SMALL_SHAPE_DEVICE == "cpu" else 8.0
# Relative error per unit of amplification of the factored float32 norm: fp32 products under the
# interpreter, tf32x3 on the GPU (docs/behaviour.md).
_FACTORED_EPS = torch.finfo(torch.float32).eps if SMALL_SHAPE_DEVICE == "cpu" else 1e-5


def _assert_same_rows(got, expected):
    """Bit-for-bit on the CPU; on the GPU two compilations of the kernel (another constexpr) may
    schedule the same arithmetic differently."""
    if got.device.type == "cpu":
        assert torch.equal(got, expected)
    else:
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)


def _factored_float32(weight, lora_A, lora_B, scaling, fan_in_fan_out):
    """``(squared, size)`` of the factored form in plain float32 torch arithmetic, no fallback:
    ``size = ||W_i||² + s²<B_i, (B G)_i>`` and ``squared = size + 2s<B_i, (W Aᵀ)_i>``."""
    w = (weight.T if fan_in_fan_out else weight).float()
    a, b = lora_A.float(), lora_B.float()
    size = w.square().sum(dim=1) + scaling**2 * (b * (b @ (a @ a.T))).sum(dim=1)
    return size + 2 * scaling * (b * (w @ a.T)).sum(dim=1), size


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cancelled_rows_are_recomputed_densely(fan_in_fan_out, dtype):
    """Rows with ``norm_i ≈ 1e-4·||W_i||`` (fp32; amplification ~2e8, no digits left in the factored sum)
    or ``1e-3·||W_i||`` (bf16) come out as accurate as the dense form in float32; every other row is
    bit-for-bit what the kernel gives it when no row cancels (the same inputs with the cancelled rows
    of ``W`` put back). In fp32 the factored sum alone is far off on those rows; bf16 inputs give a
    factored sum about as accurate (few roundings happen in fp32 sums of exact bf16 products), so for
    them the test checks only that the fallback keeps that accuracy."""
    # Rows 16-31 hold none: their row block (16 rows, interpreter) or group of 16 (32-row blocks on the
    # GPU) skips the dense pass.
    rows = [1, 5, 6, 32]
    remainder = 1e-4 if dtype == torch.float32 else 0.0
    weight, lora_A, lora_B = _cancelling(33, 130, 37, dtype, fan_in_fan_out, 1.5, remainder, rows)
    got = norm.weight_norm(weight, lora_A, lora_B, 1.5, fan_in_fan_out)
    ours, dense = _relative_errors(got, weight, lora_A, lora_B, 1.5, fan_in_fan_out)
    assert ours[rows].max() <= _DENSE_FACTOR * dense[rows].max() + 1e-6, (ours[rows], dense[rows])
    uncancelled = _make(33, 130, 37, dtype, False, seed=8)[0]  # _cancelling's inputs before it edits rows
    uncancelled = uncancelled.T.contiguous() if fan_in_fan_out else uncancelled
    others = [i for i in range(33) if i not in rows]
    _assert_same_rows(got[others], norm.weight_norm(uncancelled, lora_A, lora_B, 1.5, fan_in_fan_out)[others])
    if dtype == torch.float32:
        squared, _ = _factored_float32(weight, lora_A, lora_B, 1.5, fan_in_fan_out)
        factored = squared.clamp_min(0).sqrt()
        assert _relative_errors(factored, weight, lora_A, lora_B, 1.5, fan_in_fan_out)[0][rows].max() > 1e-2


def test_moderate_cancellation_stays_factored():
    """Rows with amplification ~200, below the limit (none is a candidate for the dense pass): the
    factored value, within ``2·eps·a`` of exact."""
    rows = list(range(0, 33, 3))
    weight, lora_A, lora_B = _cancelling(33, 64, 8, torch.float32, False, 2.0, 0.1, rows, seed=9)
    assert not reference.cancelled_rows(*_factored_float32(weight, lora_A, lora_B, 2.0, False)).any()
    got = norm.weight_norm(weight, lora_A, lora_B, 2.0, False)
    ours, _ = _relative_errors(got, weight, lora_A, lora_B, 2.0, False)
    assert ours.max() < 2 * _FACTORED_EPS * 400


# --------------------------------------------------------------------------------------- CUDA


@pytest.mark.cuda
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
@pytest.mark.parametrize("r", [16, 384])
def test_cuda_run_to_run_identical(r):
    # No races: the same inputs give the same bits.
    weight, lora_A, lora_B = _make(8192, 8192, r, torch.bfloat16, False, device="cuda", seed=7)
    first = norm.weight_norm(weight, lora_A, lora_B, 2.0, False)
    for _ in range(3):
        assert torch.equal(norm.weight_norm(weight, lora_A, lora_B, 2.0, False), first)


@pytest.mark.cuda
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
    assert any("_norm_rows_kernel" in name for name in names), sorted(n for n in names if not n.startswith("cu"))
    torch.testing.assert_close(got, 1.5 * reference.weight_norm(weight, lora_A, lora_B, 2.0, False), rtol=1e-4, atol=0)


@pytest.mark.cuda
@pytest.mark.parametrize(
    "d_out, d_in, r, fan_in_fan_out, dtype",
    [
        (1000, 777, 70, False, torch.float32),
        (1000, 777, 70, True, torch.bfloat16),
        (8192, 8192, 384, False, torch.bfloat16),
        (4096, 4096, 16, False, torch.float16),
    ],
)
def test_cuda_cancelled_rows_are_recomputed_densely(d_out, d_in, r, fan_in_fan_out, dtype):
    """The dense recomputation compiled for the GPU (native 16-bit ``tl.dot``): rows
    with ``norm_i ≈ 1e-4·||W_i||`` (fp32) or bf16/fp16 rounding-level cancellation are as accurate as
    the float32 dense form, the other rows within the kernel tolerance."""
    rows = [0, 7, d_out // 2, d_out - 1]
    remainder = 1e-4 if dtype == torch.float32 else 0.0
    weight, lora_A, lora_B = _cancelling(d_out, d_in, r, dtype, fan_in_fan_out, 2.0, remainder, rows, device="cuda")
    got = norm.weight_norm(weight, lora_A, lora_B, 2.0, fan_in_fan_out)
    ours, dense = _relative_errors(got, weight, lora_A, lora_B, 2.0, fan_in_fan_out)
    assert ours[rows].max() <= _DENSE_FACTOR * dense[rows].max() + 1e-5, (ours[rows], dense[rows])
    others = torch.ones(d_out, dtype=torch.bool)
    others[rows] = False
    assert ours[others].max() < 1e-3


@pytest.mark.cuda
def test_cuda_gemm_launches():
    """The norm at d = 8192, r = 384, bf16, with ``||W||²`` given: cuBLAS's ``W Aᵀ``, ``A Aᵀ`` and
    ``B·[G_hi | G_lo]`` (each one kernel, or two when cuBLAS splits K) and two Triton launches,
    ``_gram_halves_kernel`` and ``_norm_rows_kernel``. Besides them: at least the three GEMMs, at most
    2·3 = 6 kernels."""
    weight, lora_A, lora_B = _make(8192, 8192, 384, torch.bfloat16, False, device="cuda")
    squares = weight.float().square().sum(1)
    norm.weight_norm(weight, lora_A, lora_B, 2.0, False, row_squares=squares)  # compile first
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        norm.weight_norm(weight, lora_A, lora_B, 2.0, False, row_squares=squares)
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert [name for name in kernels if name.startswith("_")] == ["_gram_halves_kernel", "_norm_rows_kernel"], kernels
    assert 3 <= len([name for name in kernels if not name.startswith("_")]) <= 6, kernels


def test_gram_halves_hold_sixteen_bits():
    """``B·[G_hi | G_lo]`` with ``B = I``: ``G_hi`` is a bf16 value within one bf16 step of ``G`` (the
    rounding mode is Triton's: to nearest on GPUs, truncation in the interpreter), and
    ``G_hi + G_lo`` is ``G`` to about 16 bits (bf16 keeps 8)."""
    r = 37  # not a multiple of the kernel's block
    gram = torch.randn(r, r, generator=torch.Generator().manual_seed(0)).to(SMALL_SHAPE_DEVICE)
    eye = torch.eye(r, dtype=torch.bfloat16, device=SMALL_SHAPE_DEVICE)
    product, halves = norm._times_gram(eye, gram)
    assert halves and product.shape == (r, 2 * r) and product.dtype == torch.float32
    hi, lo = product[:, :r], product[:, r:]
    assert torch.equal(hi, hi.to(torch.bfloat16).float())
    assert ((gram - hi).abs() <= 2.0**-7 * gram.abs()).all()
    assert ((hi + lo - gram).abs() <= 2.0**-15 * gram.abs()).all()
    assert ((gram - hi).abs() > 2.0**-15 * gram.abs()).any()  # the low half carries something


def test_cancelled_rows_rule():
    """The rows the dense recomputation takes: a positive size with a non-positive factored sum, or an
    amplification above the limit; never zero rows or NaN sums."""
    limit = reference.AMPLIFICATION_LIMIT
    size = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, float("nan"), 1.0])
    squared = torch.tensor([-1e-9, 0.0, 0.5, 1.5 / (limit + 1), 0.0, 1.0, float("nan")])
    assert reference.cancelled_rows(squared, size).tolist() == [True, True, False, True, False, False, False]
