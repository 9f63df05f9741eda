"""Features whose magnitude is exactly zero (pruned outputs, say): ``g = 0``, so the output carries no
trace of ``adapted = (W + s·B·A)·x``, which the magnitude's gradient needs. dora_fx's training compose
that keeps only the output takes an exact path there (``dora_fx::zero_magnitude_grad``): the
gradients equal eager PEFT's, never NaN."""

from __future__ import annotations

import pytest
import torch

import dora_fx
from tests import single_layer as sl

ZERO = [0, 5, 11, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33]  # > one 16-feature block


def _with_zero_magnitudes(**kwargs):
    model = sl.build(16, 40, **kwargs).train()
    _, _, _, _, magnitude, _ = sl.parts(model)
    with torch.no_grad():
        magnitude[ZERO] = 0
    return model


@pytest.mark.parametrize(
    "bias, dropout, conv1d", [(False, 0.0, False), (True, 0.0, False), (False, 0.1, False), (True, 0.0, True)],
    ids=["reused-base", "bias", "dropout", "fan_in_fan_out"],
)
def test_zero_magnitude_features_get_eager_gradients(bias, dropout, conv1d):
    model = _with_zero_magnitudes(bias=bias, dropout=dropout, conv1d=conv1d)
    ours, eager, backend = sl.eager_and_compiled(model, torch.randn(2, 7, 16))
    assert len(backend.report.rewrites) == 1
    grad_m = eager[1]["base_model.model.proj.lora_magnitude_vector.default.weight"]
    assert (grad_m[ZERO] != 0).all()  # the premise: those features do get a gradient
    sl.assert_matches(ours, eager)


def test_zero_magnitude_under_inductor():
    model = _with_zero_magnitudes(bias=False)
    backend = dora_fx.DoraBackend(inner="inductor")
    x = torch.randn(9, 16)
    ours = sl.step(torch.compile(model, backend=backend, fullgraph=True), model, x)
    (rewrite,) = backend.report.rewrites
    assert rewrite.variant == "reused base"
    sl.assert_matches(ours, sl.step(model, model, x))


@pytest.mark.cuda
def test_cuda_zero_magnitude_path_is_one_op_call_in_inductor_code():
    """On CUDA the exact path is one call of the op per layer from Inductor's generated code (its
    Triton kernel is not inlined: Inductor would analyse it at every call site), and its gradients
    still equal eager PEFT's."""
    from torch._inductor.utils import run_and_get_code

    model = _with_zero_magnitudes(bias=False).cuda()
    backend = dora_fx.DoraBackend(inner="inductor")
    x = torch.randn(9, 16, device="cuda")
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    ours, codes = run_and_get_code(lambda: sl.step(compiled, model, x))
    code = "\n".join(codes)
    assert code.count("torch.ops.dora_fx.zero_magnitude_grad.default(") == 1
    assert "_zero_magnitude_grad_kernel" not in code
    sl.assert_matches(ours, sl.step(model, model, x))


def test_inductor_writes_the_lora_input_once_for_the_op_and_the_gemms():
    """The op takes its inputs as Inductor lays them out (``flexible_layout``): the down projection's
    input ``silu(gate)·up``, recomputed in the backward, is one buffer that the op and ``lora_A``'s
    gradient GEMM both read, not two copies of the same values."""
    import re

    from torch._inductor.utils import run_and_get_code

    from dora_fx.examples import models

    example = models.build("llama", hidden=64, layers=1)
    model = example.model.train()
    inputs = example.make_inputs(torch.Generator().manual_seed(0))
    compiled = torch.compile(model, backend=dora_fx.DoraBackend(inner="inductor"))
    _, codes = run_and_get_code(lambda: compiled(**inputs, labels=inputs["input_ids"]).loss.backward())
    code = "\n".join(codes)
    calls = re.findall(r"torch\.ops\.dora_fx\.zero_magnitude_grad\.default\(\w+, \w+, (buf\d+),", code)
    assert calls, "no layer's LoRA input is computed in the backward: the test's premise"
    gemm_operands = [line.split("out=")[0] for line in code.splitlines() if "extern_kernels.mm(" in line]
    assert gemm_operands, "the GEMMs are not extern cuBLAS/CPU calls in Inductor's code: the test's premise"
    for buffer in calls:
        assert any(re.search(rf"\b{buffer}\b", operands) for operands in gemm_operands), f"{buffer} is read by the op alone"
