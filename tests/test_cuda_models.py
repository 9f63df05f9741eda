"""GPU checks of whole PEFT DoRA models under the dora backend (skipped without CUDA)."""

from __future__ import annotations

import copy

import pytest
import torch

import dora_fx
from dora_fx import norm_cache
from dora_fx.examples import models
from dora_fx.kernels import dispatch
from tests.helpers import differentiable_inputs, fresh, relative_error, step, zero_grads

pytestmark = [
    pytest.mark.cuda,
    # A kernel that falls back to the reference math warns (once per process): an error here, from
    # compilation on. tests/conftest.py also fails a cuda test on any fallback, warned or not.
    pytest.mark.filterwarnings("error:dora_fx:RuntimeWarning"),
]

# The norm's Triton kernel; the composition is traced as PyTorch math and fused by Inductor.
NORM_KERNEL, COMPOSE_KERNELS = "_norm_rows_kernel", ("_compose_kernel", "_compose_backward_kernel")


def _cuda_example(name: str, **kwargs):
    example = models.build(name, dtype=torch.bfloat16, hidden=256, rank=16, **kwargs)
    example.model.cuda()
    make = example.make_inputs
    example.make_inputs = lambda gen: {k: v.cuda() for k, v in make(gen).items()}
    return example


@pytest.mark.parametrize("name", ["llama", "gpt2"])
@pytest.mark.parametrize("train", [False, True])
def test_bf16_model_error_within_twice_eager_peft(name, train):
    example = _cuda_example(name)
    model = example.model.train(train)
    reference = copy.deepcopy(model).double()
    inputs = differentiable_inputs(example, torch.Generator().manual_seed(0))
    ref_out, ref_grads = step(reference, {k: v.detach().double().requires_grad_() for k, v in inputs.items()})
    eager_out, eager_grads = step(model, fresh(inputs))
    zero_grads(model)
    out, grads = step(torch.compile(model, backend=dora_fx.dora_backend), fresh(inputs))
    assert len(dora_fx.last_report().rewrites) == example.dora_layers
    assert relative_error(out, ref_out) <= 2 * relative_error(eager_out, ref_out)
    for key in ref_grads:
        ours, eager = relative_error(grads[key], ref_grads[key]), relative_error(eager_grads[key], ref_grads[key])
        assert ours <= 2 * eager, f"{key}: dora_fx {ours:.2e} vs eager PEFT {eager:.2e}"


def test_compiled_training_step_launches_dora_kernels():
    """The norm's Triton kernel runs (the norm is computed in the step: the cache is cleared), the
    composition is Inductor's own fused code (no dora_fx compose kernel), and no op fell back to the
    reference math, while compiling or after (``dispatch.fallbacks`` counts every fallback; the
    warning comes only once per process)."""
    dispatch.fallbacks.clear()
    example = _cuda_example("llama", layers=1)
    model = example.model.train()
    compiled = torch.compile(model, backend=dora_fx.dora_backend)
    inputs = differentiable_inputs(example, torch.Generator().manual_seed(1))
    step(compiled, fresh(inputs))  # compile outside the profiled step
    assert not dispatch.fallbacks, dict(dispatch.fallbacks)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA], acc_events=True) as prof:
        norm_cache.clear()
        step(compiled, fresh(inputs))
        torch.cuda.synchronize()
    assert not dispatch.fallbacks, dict(dispatch.fallbacks)
    kernels = {event.name for event in prof.events()}
    assert any(NORM_KERNEL in name for name in kernels), f"{NORM_KERNEL} not among {sorted(kernels)[:30]}"
    assert not any(kernel in name for name in kernels for kernel in COMPOSE_KERNELS), sorted(kernels)[:30]
