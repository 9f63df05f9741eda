"""torch.compile's ``mode`` and ``options`` through the dora backend: passed on to Inductor with
Inductor's meaning, and rejected clearly where they mean nothing."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.exc import BackendCompilerFailed
from torch._inductor import list_mode_options
from torch._inductor.custom_graph_pass import CustomGraphPass

import dora_fx
from dora_fx.examples import models


@pytest.fixture
def inductor_calls(monkeypatch):
    """Replace Inductor's ``compile_fx`` by a spy that records ``config_patches`` and runs the graph
    eagerly (the rewritten graph, so the dora_fx ops run too)."""
    calls = []

    def spy(gm, example_inputs, config_patches=None, **kwargs):
        calls.append(config_patches or {})
        return gm.forward

    monkeypatch.setattr(torch._inductor.compile_fx, "compile_fx", spy)
    return calls


def _eval_mlp():
    example = models.build("mlp")
    return example.model.eval(), example.make_inputs(torch.Generator().manual_seed(3))


@pytest.mark.parametrize("mode", ["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"])
def test_torch_compile_mode_reaches_inductor_as_its_config(inductor_calls, mode):
    model, inputs = _eval_mlp()
    with torch.no_grad():
        expected = model(**inputs)
        out = torch.compile(model, backend="dora", mode=mode)(**inputs)
    assert inductor_calls == [list_mode_options(mode)]
    assert len(dora_fx.last_report().rewrites) == 2
    torch.testing.assert_close(out, expected)


def test_torch_compile_options_reach_inductor(inductor_calls):
    model, inputs = _eval_mlp()
    with torch.no_grad():
        torch.compile(model, backend="dora", options={"max-autotune": False, "coordinate_descent_tuning": True})(**inputs)
    assert inductor_calls == [{"max_autotune": False, "coordinate_descent_tuning": True}]


def test_dora_backend_takes_mode_and_options_and_torch_compile_overrides_them(inductor_calls):
    model, inputs = _eval_mlp()
    backend = dora_fx.DoraBackend(mode="max-autotune-no-cudagraphs")
    assert "mode='max-autotune-no-cudagraphs'" in repr(backend)
    with torch.no_grad():
        torch.compile(model, backend=backend)(**inputs)
        torch._dynamo.reset()
        torch.compile(model, backend=backend, options={"coordinate_descent_tuning": False})(**inputs)
        torch._dynamo.reset()
        torch.compile(model, backend=dora_fx.DoraBackend(options={"max_autotune": True}))(**inputs)
    assert inductor_calls == [
        {"max_autotune": True, "coordinate_descent_tuning": True},
        {"max_autotune": True, "coordinate_descent_tuning": False},
        {"max_autotune": True},
    ]
    assert len(backend.report.rewrites) == 4  # 2 per compile, both compiles


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"mode": "fastest"}, r"unknown torch.compile mode 'fastest'.*'max-autotune'"),
        ({"mode": 3}, r"unknown torch.compile mode 3"),
        ({"options": {"max_autotun": True}}, r"unknown Inductor option 'max_autotun'.*did you mean 'max_autotune'"),
        ({"options": {"max_autotune": "yes"}}, r"'max_autotune' takes a bool, got 'yes'"),
        ({"options": ["max_autotune"]}, r"options must be a dict"),
        ({"inner": "aot_eager", "mode": "max-autotune"}, r"inner compiler is 'aot_eager', which takes none"),
        ({"inner": "eager", "options": {"max_autotune": True}}, r"inner compiler is 'eager'"),
    ],
)
def test_bad_mode_or_options_is_a_value_error(settings, message):
    with pytest.raises(ValueError, match=message):
        dora_fx.DoraBackend(**settings)


def test_default_mode_is_fine_with_any_inner_compiler():
    model, inputs = _eval_mlp()
    with torch.no_grad():
        torch.compile(model, backend=dora_fx.DoraBackend(inner="eager", mode="default"), mode="default")(**inputs)
    assert len(dora_fx.last_report().rewrites) == 2


@pytest.mark.parametrize(
    "backend, settings, message",
    [
        ("dora", {"mode": "fastest"}, "unknown torch.compile mode 'fastest'"),
        ("dora", {"options": {"no_such_option": 1}}, "unknown Inductor option 'no_such_option'"),
        ("aot_eager inner", {"mode": "reduce-overhead"}, "inner compiler is 'aot_eager'"),
    ],
)
def test_torch_compile_with_bad_settings_fails_with_the_value_error(backend, settings, message):
    model, inputs = _eval_mlp()
    if backend != "dora":
        backend = dora_fx.DoraBackend(inner="aot_eager")
    with pytest.raises(BackendCompilerFailed) as failure, torch.no_grad():
        torch.compile(model, backend=backend, **settings)(**inputs)
    assert isinstance(failure.value.inner_exception, ValueError)
    assert message in str(failure.value)
    assert dora_fx.last_report().graphs == []  # rejected before any rewrite


class _RecordingPass(CustomGraphPass):
    """An Inductor post-grad pass that keeps the targets of the graphs Inductor runs it on."""

    def __init__(self):
        self.targets: list[set[str]] = []
        self.inputs: list[int] = []

    def __call__(self, graph: torch.fx.Graph) -> None:
        self.targets.append({str(node.target) for node in graph.nodes if node.op == "call_function"})
        self.inputs.append(len(graph.find_nodes(op="placeholder")))

    def uuid(self) -> str:
        return "dora_fx-tests-recording-pass"


def test_options_reach_real_inductor_with_the_rewritten_graph():
    """Inductor itself (no spy) runs a post-grad pass passed through ``options``, on the rewritten
    graph (the layers' norms one more input of it, no dense product), and the compiled model gives
    eager PEFT's output."""
    model, inputs = _eval_mlp()
    recorder, plain = _RecordingPass(), _RecordingPass()
    with torch.no_grad():
        expected = model(**inputs)
        # fx_graph_cache off: a cache hit would skip Inductor's passes, the recorder's included
        options = {"post_grad_custom_post_pass": recorder, "fx_graph_cache": False}
        out = torch.compile(model, backend="dora", options=options)(**inputs)
        torch._dynamo.reset()
        torch.compile(model, backend="inductor", options={**options, "post_grad_custom_post_pass": plain})(**inputs)
    assert len(recorder.targets) == 1
    assert recorder.inputs[0] == plain.inputs[0] + 1  # one flat buffer of every layer's norm
    assert not any("eye" in target or "iota" in target for target in recorder.targets[0])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
