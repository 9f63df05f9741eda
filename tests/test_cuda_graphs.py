"""dora_fx under CUDA graphs (skipped without CUDA): the lifted norms come from one CUDA graph of their
own, and Inductor's CUDA graphs (``mode="reduce-overhead"``) replay with the right norm after every
kind of change, in eval and in training. float32; tolerances as tests/test_cuda_features.py."""

from __future__ import annotations

import pytest
import torch

import dora_fx
from dora_fx import norm_inputs
from dora_fx.examples import models
from dora_fx.kernels import dispatch
from dora_fx.passes.lift_norms import LiftedNorm

pytestmark = pytest.mark.cuda

TOLERANCE = dict(rtol=1e-4, atol=1e-4)
# The captured norm against the same kernels called eagerly: cuBLAS may choose another algorithm in a
# capture (its workspace differs), so the two agree to the norm's own accuracy (tests/kernels: 1e-5
# relative), not bit for bit.
SAME_NORM = dict(rtol=1e-5, atol=0)


def test_lifted_norms_replay_one_cuda_graph():
    g = torch.Generator(device="cuda").manual_seed(0)
    args = [torch.randn(d, device="cuda", generator=g, dtype=torch.bfloat16) for d in ((256, 128), (16, 128), (256, 16))]
    spec = LiftedNorm(0, 1, 2, 0.5, False, 256, torch.float32)
    bank = norm_inputs.NormInputs([spec])

    def eager():
        return dispatch.weight_norm(*args, 0.5, False)

    (norm,) = bank.norms(args)
    assert bank._graph is not None, "the norms were not captured"
    torch.testing.assert_close(norm, eager(), **SAME_NORM)
    with torch.no_grad():
        args[2].mul_(1.5)
    (again,) = bank.norms(args)
    assert again.data_ptr() == norm.data_ptr() and bank.refreshes == 2
    torch.testing.assert_close(again, eager(), **SAME_NORM)


def _cuda_mlp() -> tuple[models.Example, torch.Tensor]:
    example = models.build("mlp")
    example.model.cuda()
    x = example.make_inputs(torch.Generator().manual_seed(0))["x"].cuda()
    return example, x


def _lora_B(model) -> torch.nn.Parameter:
    return next(p for n, p in model.named_parameters() if "lora_B" in n)


def test_reduce_overhead_eval_replays_see_in_place_updates_and_load_state_dict():
    example, x = _cuda_mlp()
    model = example.model.eval()
    compiled = torch.compile(model, backend="dora", mode="reduce-overhead")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for _ in range(4):  # warm-up, recording, replays
            torch.testing.assert_close(compiled(x).clone(), model(x), **TOLERANCE)
        _lora_B(model).mul_(-2.0)
        torch.testing.assert_close(compiled(x).clone(), model(x), **TOLERANCE)
        model.load_state_dict(state)
        torch.testing.assert_close(compiled(x).clone(), model(x), **TOLERANCE)


def test_reduce_overhead_eval_replays_follow_set_adapter():
    """A second DoRA adapter, switched to and back between replays: each replay uses the active
    adapter's norm, as eager PEFT does."""
    example, x = _cuda_mlp()
    model = example.model.eval()
    model.add_adapter("second", models.dora_config(["fc1", "fc2"], rank=2, dropout=0.0))
    models.randomize_adapters(model, torch.Generator().manual_seed(9))
    model.cuda()
    model.set_adapter("default")
    compiled = torch.compile(model, backend="dora", mode="reduce-overhead")
    with torch.no_grad():
        for adapter in ("default", "default", "default", "second", "second", "default"):
            model.set_adapter(adapter)
            torch.testing.assert_close(compiled(x).clone(), model(x), **TOLERANCE)


def test_reduce_overhead_training_replays_follow_the_optimizer():
    example, x = _cuda_mlp()
    model = example.model.train()
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    params = [p for p in model.parameters() if p.requires_grad]

    def train(fn, steps=4):
        optimizer = torch.optim.AdamW(params, lr=1e-2, fused=True)  # fused: no version counters move
        losses = []
        for _ in range(steps):
            loss = fn(x).square().mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.detach().clone())
        return torch.stack(losses)

    eager = train(model)
    model.load_state_dict(reference)
    compiled = train(torch.compile(model, backend="dora", mode="reduce-overhead"))
    torch.testing.assert_close(compiled, eager, **TOLERANCE)
    assert len(dora_fx.last_report().rewrites) >= example.dora_layers


def test_a_freed_capture_leaves_the_others_replaying():
    """Regression: graphs captured on one stream share its cuBLAS workspace, and freeing one released
    it under the others (pytorch/pytorch#193402); then a replay read freed memory and the CUDA context
    was lost. Each bank's graph now has a stream of its own."""
    g = torch.Generator(device="cuda").manual_seed(1)

    def layer():
        return [torch.randn(d, device="cuda", generator=g, dtype=torch.bfloat16)
                for d in ((1024, 512), (64, 512), (1024, 64))]

    spec = LiftedNorm(0, 1, 2, 0.5, False, 1024, torch.float32)
    first_args, second_args = layer(), layer()
    first, second = norm_inputs.NormInputs([spec]), norm_inputs.NormInputs([spec])
    first.norms(first_args)
    second.norms(second_args)
    del first
    import gc

    gc.collect()
    with torch.no_grad():
        second_args[2].mul_(1.5)
    (norm,) = second.norms(second_args)
    torch.cuda.synchronize()
    expected = dispatch.weight_norm(*second_args, 0.5, False)
    torch.testing.assert_close(norm, expected, **SAME_NORM)
