"""The norms a compiled graph takes as inputs: computed before the call, reused while W, A and B are
unchanged, recomputed after every kind of change, kept at one address."""

from __future__ import annotations

import itertools

import pytest
import torch

import dora_fx
from dora_fx import norm_inputs
from dora_fx.examples import models
from dora_fx.kernels import reference
from dora_fx.passes.lift_norms import NAME_PREFIX, LiftedNorm


def _layer(seed: int = 0, d_out: int = 12, d_in: int = 10, r: int = 3):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(d_out, d_in, generator=g)
    lora_A = torch.randn(r, d_in, generator=g).requires_grad_()
    lora_B = torch.randn(d_out, r, generator=g).requires_grad_()
    return [torch.randn(2, d_in, generator=g), weight, lora_A, lora_B]


def _bank(args, scaling=0.5):
    spec = LiftedNorm(weight=1, lora_A=2, lora_B=3, scaling=scaling, fan_in_fan_out=False, d_out=args[1].shape[0],
                      dtype=torch.float32)
    return norm_inputs.NormInputs([spec])


def _expected(args, scaling=0.5):
    return reference.weight_norm(args[1], args[2].detach(), args[3].detach(), scaling, False)


def test_reused_while_unchanged_and_recomputed_after_each_change():
    args = _layer()
    bank = _bank(args)
    (norm,) = bank.norms(args)
    address = norm.data_ptr()
    torch.testing.assert_close(norm, _expected(args))
    bank.norms(args)
    assert bank.refreshes == 1

    changes = {
        "in-place edit": lambda: _in_place(args[3]),
        "optimizer step": lambda: _optimizer_step(args[2]),
        "new storage": lambda: setattr(args[3], "data", args[3].data.clone() * 0.5),
        "another tensor": lambda: args.__setitem__(2, (args[2].detach() * 3.0).requires_grad_()),
        "base weight edit": lambda: _in_place(args[1]),
    }
    for count, (what, change) in enumerate(changes.items(), start=2):
        change()
        (norm,) = bank.norms(args)
        assert bank.refreshes == count, what
        torch.testing.assert_close(norm, _expected(args), msg=what)
        assert norm.data_ptr() == address, what  # refreshed in place: a static input stays put


def _in_place(tensor):
    with torch.no_grad():
        tensor.mul_(1.5)


def _optimizer_step(param):
    # An optimizer that writes through .data, as fused optimizers do: no version counter moves, yet
    # the step hook tells the bank that its norms may be stale.
    class DataWriter(torch.optim.Optimizer):
        def step(self, closure=None):
            for group in self.param_groups:
                for p in group["params"]:
                    p.data.add_(0.25)

    version = param._version
    DataWriter([param], {}).step()
    assert param._version == version


def test_a_refresh_moves_the_buffers_versions():
    """A backward that saved a norm before its W, A or B changed fails loudly instead of using the new one."""
    args = _layer()
    bank = _bank(args)
    (norm,) = bank.norms(args)
    version = norm._version
    _in_place(args[3])
    bank.norms(args)
    assert norm._version > version


def test_inference_tensors_are_recomputed_every_call():
    with torch.inference_mode():
        args = _layer()
    bank = _bank(args)
    for _ in range(2):
        (norm,) = bank.norms(args)
    assert bank.refreshes == 2
    torch.testing.assert_close(norm, _expected(args))


def _recording_banks(monkeypatch):
    banks = []
    original = norm_inputs.with_norm_inputs

    def recording(compiled, specs):
        wrapped = original(compiled, specs)
        banks.append(wrapped.norm_inputs)
        return wrapped

    monkeypatch.setattr(norm_inputs, "with_norm_inputs", recording)
    return banks


@pytest.mark.parametrize("inner", ["aot_eager", "inductor"])
def test_compiled_model_takes_its_norms_as_inputs(monkeypatch, inner):
    banks = _recording_banks(monkeypatch)
    example = models.build("mlp")
    model = example.model.eval()
    x = example.make_inputs(torch.Generator().manual_seed(0))["x"]
    compiled = torch.compile(model, backend=dora_fx.DoraBackend(inner=inner))
    with torch.no_grad():
        for _ in range(3):
            torch.testing.assert_close(compiled(x), model(x))
        (bank,) = banks
        assert len(bank.specs) == example.dora_layers and bank.refreshes == 1
        lora_B = next(p for n, p in model.named_parameters() if "lora_B" in n)
        lora_B.add_(0.5)
        torch.testing.assert_close(compiled(x), model(x))
    assert bank.refreshes == 2


def test_the_norms_are_slices_of_one_input():
    """Every lifted norm of a graph lies in one flat buffer input: one more input, not one per layer."""
    from tests.helpers import RecordingBackend, op_counts

    example = models.build("mlp")
    backend = RecordingBackend()
    compiled = torch.compile(example.model.eval(), backend=backend)
    with torch.no_grad():
        compiled(**example.make_inputs(torch.Generator().manual_seed(0)))
    (gm,) = backend.graphs
    names = [n.name for n in gm.graph.find_nodes(op="placeholder")]
    assert [n for n in names if n.startswith(NAME_PREFIX)] == [names[-1]]
    (flat,) = [n for n in gm.graph.find_nodes(op="placeholder") if n.name.startswith(NAME_PREFIX)]
    slices = [user for user in flat.users if user.target is torch.narrow]
    assert len(slices) == len(flat.users) == example.dora_layers
    offsets = sorted((s.args[2], s.args[3]) for s in slices)
    assert [start for start, _ in offsets] == [0, *itertools.accumulate(size for _, size in offsets[:-1])]
    assert flat.meta["val"].shape[0] == sum(size for _, size in offsets)
    assert op_counts(gm)[torch.ops.dora_fx.cached_weight_norm.default] == 0


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_float64_model_gets_float64_norms(train):
    """Regression: the kept ``||W||²`` was float32 only, and a float64 model failed at its first call."""
    from tests.helpers import step, zero_grads

    example = models.build("mlp")
    model = example.model.double().train(train)
    inputs = {k: v.double() for k, v in example.make_inputs(torch.Generator().manual_seed(0)).items()}
    compiled = torch.compile(model, backend="dora")
    if not train:
        with torch.no_grad():
            torch.testing.assert_close(compiled(**inputs), model(**inputs), rtol=1e-12, atol=1e-12)
        return
    ours = step(compiled, inputs)
    zero_grads(model)
    eager = step(model, inputs)
    assert all(grad is not None for name, grad in ours[1].items() if not name.startswith("input."))
    torch.testing.assert_close(ours, eager, rtol=1e-10, atol=1e-12)


def test_norms_of_two_dtypes_get_a_buffer_each():
    first, second = _layer(seed=1), _layer(seed=2, d_out=7)
    second = [t.detach().double().requires_grad_(t.requires_grad) for t in second]
    args = [*first, *second]
    specs = [
        LiftedNorm(weight=1, lora_A=2, lora_B=3, scaling=0.5, fan_in_fan_out=False, d_out=12, dtype=torch.float32),
        LiftedNorm(weight=5, lora_A=6, lora_B=7, scaling=0.5, fan_in_fan_out=False, d_out=7, dtype=torch.float64,
                   buffer=1),
    ]
    single, double = norm_inputs.NormInputs(specs).norms(args)
    assert (single.dtype, double.dtype) == (torch.float32, torch.float64)
    torch.testing.assert_close(single, _expected(first))
    torch.testing.assert_close(double, _expected(second))


def test_norms_of_one_buffer_lie_at_their_offsets():
    layers = [_layer(seed=i, d_out=d_out) for i, d_out in enumerate((12, 5, 9))]
    args = [t for layer in layers for t in layer]
    specs, offset = [], 0
    for i, layer in enumerate(layers):
        d_out = layer[1].shape[0]
        specs.append(LiftedNorm(weight=4 * i + 1, lora_A=4 * i + 2, lora_B=4 * i + 3, scaling=0.5,
                                fan_in_fan_out=False, d_out=d_out, dtype=torch.float32, offset=offset))
        offset += d_out
    bank = norm_inputs.NormInputs(specs)
    (flat,) = bank.norms(args)
    expected = torch.cat([_expected(layer) for layer in layers])
    torch.testing.assert_close(flat, expected)
    _in_place(layers[1][3])  # one layer's B changes: all are refreshed, each in its place
    (again,) = bank.norms(args)
    assert again.data_ptr() == flat.data_ptr() and bank.refreshes == 2
    torch.testing.assert_close(again, torch.cat([_expected(layer) for layer in layers]))


def test_fake_inputs_get_traced_norms_and_nothing_is_kept():
    """DDPOptimizer runs compiled pieces on fake tensors: no data pointer to read, nothing to keep."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    spec = LiftedNorm(weight=1, lora_A=2, lora_B=3, scaling=0.5, fan_in_fan_out=False, d_out=12, dtype=torch.float32)
    wrapped = norm_inputs.with_norm_inputs(lambda *args: args[-1], [spec])
    with FakeTensorMode() as mode:
        args = [mode.from_tensor(t) for t in _layer()]
        norm = wrapped(*args)
    assert tuple(norm.shape) == (12,) and norm.dtype == torch.float32  # the buffer of the one norm
    assert wrapped.norm_inputs.refreshes == 0 and wrapped.norm_inputs._buffers is None
