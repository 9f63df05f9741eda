"""The weight norm is reused in eval while W, A and B are unchanged, and recomputed whenever they change."""

from __future__ import annotations

import pytest
import torch

import dora_fx
from dora_fx import models, norm_cache
from dora_fx.kernels import reference


@pytest.fixture
def norm_calls(monkeypatch):
    """Counts the norms actually computed (cache misses)."""
    calls = []
    original = reference.weight_norm

    def counting(*args):
        calls.append(args)
        return original(*args)

    monkeypatch.setattr(reference, "weight_norm", counting)
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
