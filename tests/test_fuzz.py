"""Property test: any PEFT DoRA Linear that dora_fx rewrites computes what eager PEFT computes.

Hypothesis draws the layer (d_in, d_out, r, scaling, bias, ``nn.Linear`` or GPT-2's ``Conv1D`` for
``fan_in_fan_out=True``), the input (0-9 tokens, rank 2 or 3), the dtype (fp32, bf16) and the mode
(eval, train, train with dropout 0.1). Each example compiles from a fresh Dynamo with
``DoraBackend(inner="aot_eager")``, checks that the layer was rewritten, and compares the output and
every gradient (input, lora_A, lora_B, magnitude):

- fp32: against eager PEFT running with dora_fx's norm (the same formula: tight tolerance); the norm
  against the exact one (within ``2 · eps · amplification``, docs/behaviour.md); and, where no row is
  ill-conditioned, against plain eager PEFT;
- bf16: against a float64 copy of the same weights, where dora_fx's error must stay within twice eager
  PEFT's (DESIGN.md §8), plus a floor of one bf16 ulp (more for tensors of a few elements).

CI runs a small, derandomised sample (~0.5 s per example). Release checks run a long random one::

    DORA_FX_FUZZ_EXAMPLES=500 python -m pytest -q -p no:logging tests/test_fuzz.py
"""

from __future__ import annotations

import math
import os

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests import single_layer as sl

RELEASE_EXAMPLES = os.environ.get("DORA_FX_FUZZ_EXAMPLES")
EXAMPLES = int(RELEASE_EXAMPLES) if RELEASE_EXAMPLES else 40
FP32_EPS = torch.finfo(torch.float32).eps
# Rows up to this amplification have a factored norm within ~1e-5 of PEFT's dense one.
WELL_CONDITIONED = 30.0


def bf16_floor(numel: int) -> float:
    """One bf16 ulp (relative), more for small tensors. "Twice eager PEFT's error" compares two random
    roundings: on a tensor of a few elements (a 1-token x gradient is one sum over d_out outputs, which
    may cancel) eager can be exact by luck. 2^-8 from 256 elements on, 16 times that for one element."""
    return 2.0**-8 * max(1.0, 16 / max(numel, 1) ** 0.5)


FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=RELEASE_EXAMPLES is None,  # CI: the same examples every run; release: fresh ones
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@st.composite
def dora_cases(draw) -> dict:
    conv1d = draw(st.booleans())
    mode = draw(st.sampled_from(["eval", "train", "train-dropout"]))
    rank3 = draw(st.booleans())
    tokens = draw(st.integers(0, 9))
    d_in = draw(st.integers(1, 48))
    return {
        "d_in": d_in,
        "d_out": draw(st.integers(1, 48)),
        "r": draw(st.integers(1, 20)),
        "alpha": draw(st.sampled_from([1, 3, 8, 32])),
        "bias": True if conv1d else draw(st.booleans()),  # Conv1D always has a bias
        "conv1d": conv1d,
        "mode": mode,
        "shape": (draw(st.integers(1, 3)), tokens, d_in) if rank3 else (tokens, d_in),
        "dtype": draw(st.sampled_from([torch.float32, torch.bfloat16])),
        "seed": draw(st.integers(0, 2**16)),
    }


@FUZZ
@given(case=dora_cases())
def test_rewritten_layer_matches_eager_peft(case):
    train = case["mode"] != "eval"
    model = sl.build(
        case["d_in"], case["d_out"], case["r"], bias=case["bias"], conv1d=case["conv1d"], alpha=case["alpha"],
        dropout=0.1 if case["mode"] == "train-dropout" else 0.0, dtype=case["dtype"], seed=case["seed"],
    )
    x = torch.randn(case["shape"], generator=torch.Generator().manual_seed(case["seed"])).to(case["dtype"])
    if case["dtype"] == torch.float32:
        # 1. The rewrite computes PEFT's formula: equal, up to fp32 rounding order, to eager PEFT whose
        #    norm is swapped for dora_fx's (outputs and every gradient).
        ours, eager, backend = sl.eager_and_compiled(model, x, train=train)
        hybrid = sl.with_dora_fx_norm(model).train(train)
        same_formula = sl.step(hybrid, hybrid, x)
        assert len(backend.report.rewrites) == 1 and backend.report.near_misses == [], backend.report
        (rewrite,) = backend.report.rewrites
        assert ("fan_in_fan_out" in rewrite.variant) == case["conv1d"]
        sl.assert_matches(ours, same_formula, rtol=1e-4, atol=1e-5)
        # 2. The factored norm is within its documented bound of the exact one; where no row is
        #    ill-conditioned, the whole layer also equals plain eager PEFT.
        layer, W, A, B, _, s = sl.parts(model)
        norm = torch.ops.dora_fx.weight_norm(W, A, B, s, layer.fan_in_fan_out).double()
        exact = sl.exact_row_norms(model)
        amplification = sl.norm_amplification(model)
        assert ((norm - exact).abs() <= 2 * FP32_EPS * amplification * exact).all()
        if amplification.max() <= WELL_CONDITIONED:
            sl.assert_matches(ours, eager, rtol=1e-4, atol=1e-5)
    else:  # errors_against_float64 asserts the rewrite itself
        numel = {"output": x.numel() // case["d_in"] * case["d_out"], "x": x.numel()}
        numel |= {name: p.numel() for name, p in model.named_parameters()}
        for name, (err, eager_err) in sl.errors_against_float64(model, x, train=train).items():
            floor = bf16_floor(numel[name])
            if math.isnan(eager_err):  # PEFT's bf16 norm rounded to 0 (m / 0); dora_fx's fp32 norm did not
                assert err <= floor, f"{name}: dora_fx {err:.2e} where eager PEFT is NaN"
            else:
                assert err <= 2 * eager_err + floor, f"{name}: dora_fx {err:.2e} vs eager PEFT {eager_err:.2e}"
