"""The weight norm is reused in eval while W, A and B are unchanged, and recomputed whenever they change."""

from __future__ import annotations

import copy

import pytest
import torch

import dora_fx
from dora_fx import norm_cache
from dora_fx.examples import models
from dora_fx.kernels import dispatch, reference
from tests import single_layer as sl


@pytest.fixture
def norm_calls(monkeypatch):
    """Counts the norms actually computed (cache misses): the calls the ops make to the kernel or reference."""
    calls = []
    original = dispatch.weight_norm

    def counting(*args):
        calls.append(args)
        return original(*args)

    monkeypatch.setattr(dispatch, "weight_norm", counting)
    norm_cache.clear()
    return calls


def _eval_model(inner="aot_eager"):
    example = models.build("mlp")
    model = example.model.eval()
    x = example.make_inputs(torch.Generator().manual_seed(0))["x"]
    return example, model, torch.compile(model, backend=dora_fx.DoraBackend(inner=inner)), x


def _check(compiled, model, x):
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))


@pytest.mark.parametrize("inner", ["aot_eager", "inductor"])
def test_eval_calls_reuse_the_norm(norm_calls, inner):
    _, model, compiled, x = _eval_model(inner)
    with torch.no_grad():
        for _ in range(3):
            compiled(x)
    assert len(norm_calls) == 2  # two DoRA layers, computed once each
    _check(compiled, model, x)


def test_optimizer_step_invalidates(norm_calls):
    example, model, compiled, x = _eval_model()
    _check(compiled, model, x)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    compiled(x).square().mean().backward()
    optimizer.step()
    model.eval()
    before = len(norm_calls)
    _check(compiled, model, x)
    assert len(norm_calls) > before


class DataSGD(torch.optim.Optimizer):
    """SGD that writes through ``.data``: its steps never move the version counters, on any torch
    (as torch's ``AdamW(fused=True)`` does today)."""

    def __init__(self, params, lr):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                p.data.add_(p.grad, alpha=-group["lr"])


def test_optimizer_step_without_version_moves_invalidates_in_eval(norm_calls):
    """An optimizer that leaves the version counters as they were: eval after its step still sees
    the new adapters (the optimizer step hook)."""
    _, model, compiled, x = _eval_model()
    _check(compiled, model, x)
    params = [p for p in model.parameters() if p.requires_grad]
    versions = [p._version for p in params]
    optimizer = DataSGD(params, lr=0.1)
    model(x).square().mean().backward()
    optimizer.step()
    assert [p._version for p in params] == versions  # the premise, by construction
    _check(compiled, model, x)


def test_load_state_dict_invalidates(norm_calls):
    example, model, compiled, x = _eval_model()
    _check(compiled, model, x)
    other = models.build("mlp", seed=5).model
    model.load_state_dict(other.state_dict())
    _check(compiled, model, x)


@pytest.mark.parametrize("edit", ["inplace", "rebind_data"])
def test_base_weight_edits_invalidate(norm_calls, edit):
    _, model, compiled, x = _eval_model()
    _check(compiled, model, x)
    weight = model.base_model.model.fc1.base_layer.weight
    with torch.no_grad():
        if edit == "inplace":
            weight.mul_(1.5)
        else:
            weight.data = weight.data * 1.5
    _check(compiled, model, x)


def test_switching_adapters_and_merging_give_eager_outputs(norm_calls):
    example, model, compiled, x = _eval_model()
    model.add_adapter("second", models.dora_config(["fc1", "fc2"], rank=2, dropout=0.0))
    models.randomize_adapters(model, torch.Generator().manual_seed(9))
    for adapter in ("default", "second", "default"):
        model.set_adapter(adapter)
        _check(compiled, model, x)
    with torch.no_grad():
        expected = model(x)
        merged = model.merge_and_unload()
        torch.testing.assert_close(torch.compile(merged, backend=dora_fx.DoraBackend(inner="aot_eager"))(x), expected,
                                   rtol=1e-5, atol=1e-5)


def test_writes_through_dot_data_need_clear(norm_calls):
    """Documented limit: ``.data`` writes skip the version counter; ``norm_cache.clear()`` fixes it."""
    _, model, compiled, x = _eval_model()
    _check(compiled, model, x)
    model.base_model.model.fc1.base_layer.weight.data.mul_(1.5)
    with torch.no_grad():
        assert not torch.allclose(compiled(x), model(x))
    norm_cache.clear()
    _check(compiled, model, x)


def _tensors(requires_grad=False):
    gen = torch.Generator().manual_seed(3)
    weight, lora_A, lora_B = (torch.randn(*s, generator=gen) for s in ((12, 10), (3, 10), (12, 3)))
    return weight, lora_A.requires_grad_(requires_grad), lora_B.requires_grad_(requires_grad)


def test_each_hit_returns_its_own_tensor(norm_calls):
    """The caller may write into the norm it gets (Inductor reuses buffers): the cache must not change."""
    weight, lora_A, lora_B = _tensors(requires_grad=True)
    with torch.no_grad():
        first = torch.ops.dora_fx.cached_weight_norm(weight, lora_A, lora_B, 2.0, False)
        expected = first.clone()
        first.zero_()
        second = torch.ops.dora_fx.cached_weight_norm(weight, lora_A, lora_B, 2.0, False)
    assert len(norm_calls) == 1
    torch.testing.assert_close(second, expected)
    assert second.data_ptr() != first.data_ptr() and not second.requires_grad


def test_scaling_and_layout_are_part_of_the_key(norm_calls):
    weight, lora_A, lora_B = _tensors()
    square = torch.randn(10, 10)
    for scaling, w, fan_in_fan_out in ((2.0, weight, False), (0.5, weight, False), (2.0, square, False), (2.0, square, True)):
        a = lora_A
        b = lora_B if w is weight else torch.randn(10, 3)
        got = torch.ops.dora_fx.cached_weight_norm(w, a, b, scaling, fan_in_fan_out)
        w_rows = w.T if fan_in_fan_out else w
        torch.testing.assert_close(got, torch.linalg.norm(w_rows + scaling * b @ a, dim=1))
    assert len(norm_calls) == 4


def test_inference_tensors_are_computed_every_call(norm_calls):
    """Inference tensors have no version counter, so nothing is cached for them."""
    with torch.inference_mode():
        weight, lora_A, lora_B = _tensors()
        for _ in range(2):
            torch.ops.dora_fx.cached_weight_norm(weight, lora_A, lora_B, 2.0, False)
    assert len(norm_calls) == 2


def test_bad_inputs_are_rejected_on_a_miss():
    weight, lora_A, lora_B = _tensors()
    with pytest.raises(ValueError, match="shapes do not chain"):
        torch.ops.dora_fx.cached_weight_norm(weight, lora_A[:, :-1], lora_B, 2.0, False)


def test_opcheck():
    norm_cache.clear()
    torch.library.opcheck(torch.ops.dora_fx.cached_weight_norm.default, (*_tensors(), 2.0, False))


def _train_model(inner="aot_eager"):
    example = models.build("mlp")
    model = example.model.train()
    x = example.make_inputs(torch.Generator().manual_seed(0))["x"]
    return example, model, torch.compile(model, backend=dora_fx.DoraBackend(inner=inner)), x


def _accumulate(fn, model, micro_batches, optimizer=None):
    """Forward and backward of each micro-batch, then an optimizer step; the losses."""
    losses = [fn(x).square().mean() for x in micro_batches]
    for loss in losses:
        loss.backward()
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad()
    return [loss.item() for loss in losses]


OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.1),
    # Writes the parameters without moving their version counters (torch 2.13): the step hook catches it.
    "adamw-fused": lambda params: torch.optim.AdamW(params, lr=0.05, fused=True),
    "adamw-foreach": lambda params: torch.optim.AdamW(params, lr=0.05, foreach=True),
}


@pytest.mark.parametrize(
    "inner, optimizer", [("aot_eager", "sgd"), ("inductor", "sgd"), ("aot_eager", "adamw-fused"), ("aot_eager", "adamw-foreach")]
)
def test_gradient_accumulation_computes_one_norm_per_optimizer_step(norm_calls, inner, optimizer):
    """Between optimizer steps W, A and B do not change: the micro-batches share one norm per layer,
    and the losses and updated parameters equal eager PEFT's accumulating the same way."""
    example, model, compiled, x = _train_model(inner)
    eager = copy.deepcopy(model)
    micro_batches = [x + 0.1 * i for i in range(3)]
    params = lambda m: [p for p in m.parameters() if p.requires_grad]  # noqa: E731
    ours_opt, eager_opt = OPTIMIZERS[optimizer](params(model)), OPTIMIZERS[optimizer](params(eager))
    for step in range(2):
        ours = _accumulate(compiled, model, micro_batches, ours_opt)
        assert len(norm_calls) == example.dora_layers * (step + 1)
        torch.testing.assert_close(ours, _accumulate(eager, eager, micro_batches, eager_opt), rtol=1e-6, atol=1e-6)
    for mine, theirs in zip(params(model), params(eager)):
        torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("change", ["inplace_B", "load_state_dict", "set_adapter"])
def test_changes_between_micro_batches_invalidate_in_training(norm_calls, change):
    """Every kind of change between two training forwards gives a new norm and eager's gradients."""
    example, model, compiled, x = _train_model()
    model.add_adapter("second", models.dora_config(["fc1", "fc2"], rank=2, dropout=0.0))
    models.randomize_adapters(model, torch.Generator().manual_seed(9))
    model.set_adapter("default")
    compiled(x).sum().backward()
    before = len(norm_calls)
    if change == "inplace_B":
        with torch.no_grad():
            model.base_model.model.fc1.lora_B["default"].weight.mul_(1.5)
    elif change == "load_state_dict":
        model.load_state_dict(models.build("mlp", seed=5).model.state_dict(), strict=False)
    else:
        model.set_adapter("second")
    model.zero_grad()
    ours = sl.step(compiled, model, x)
    assert len(norm_calls) > before
    sl.assert_matches(ours, sl.step(model, model, x), rtol=1e-5, atol=1e-6)
