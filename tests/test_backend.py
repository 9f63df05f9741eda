"""The backend end to end: registration, graph breaks, and Inductor as the inner compiler."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import dora_fx
from dora_fx import compat
from dora_fx.examples import models
from tests.helpers import assert_close_all, differentiable_inputs, fresh, step, zero_grads


def test_backend_is_registered_as_dora():
    assert "dora" in torch._dynamo.list_backends()
    assert torch._dynamo.lookup_backend("dora") is dora_fx.dora_backend


def test_peft_dora_llama_traces_without_graph_breaks():
    """With the PEFT stand-ins registered (as every dora_fx backend does), any backend, Dynamo's
    ``explain`` included, traces a PEFT DoRA Llama as one graph."""
    compat.install()
    example = models.build("llama")
    explanation = torch._dynamo.explain(example.model)(**example.make_inputs(torch.Generator()))
    assert explanation.graph_break_count == 0
    assert explanation.graph_count == 1


_FIRST_USE = """
import sys
import torch
import dora_fx, dora_fx.__main__, dora_fx.audit
from dora_fx import compat

def installed():
    return compat.install.cache_info().currsize == 1

assert not installed(), "import dora_fx registered the PEFT stand-ins"
assert not [m for m in sys.modules if m.startswith("dora_fx.examples.")], "runtime modules import the examples"
torch.compile(lambda x: x + 1, backend="eager")(torch.ones(2))
assert not installed(), "another backend registered the PEFT stand-ins"
backend = {"name": "'dora'", "function": "dora_fx.dora_backend", "class": "dora_fx.DoraBackend(inner='eager')"}
compiled = torch.compile(lambda x: x * 2, backend=eval(backend[sys.argv[1]]))
assert installed(), "the stand-ins are not registered before Dynamo traces"
compiled(torch.ones(2))
"""


@pytest.mark.parametrize("given_as", ["name", "function", "class"])
def test_peft_stand_ins_are_registered_at_first_use_not_import(given_as):
    """``import dora_fx`` (and the CLI and audit modules) leave Dynamo as it is, for every backend
    (and import no example code); a dora_fx backend, handed to ``torch.compile`` by name, as
    ``dora_fx.dora_backend`` or as a ``DoraBackend``, registers the stand-ins before Dynamo traces."""
    done = subprocess.run([sys.executable, "-c", _FIRST_USE, given_as], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


def test_inner_backend_errors_surface_unchanged():
    def broken(gm, example_inputs):
        raise RuntimeError("inner compiler exploded")

    example = models.build("mlp")
    compiled = torch.compile(example.model, backend=dora_fx.DoraBackend(inner=broken))
    try:
        compiled(**example.make_inputs(torch.Generator()))
    except Exception as exc:  # Dynamo wraps backend failures; the original message must survive
        assert "inner compiler exploded" in str(exc)
    else:
        raise AssertionError("the inner compiler's error was swallowed")


def test_inductor_training_step_with_dropout_matches_eager_peft():
    example = models.build("mlp", dropout=0.1)
    model = example.model.train()
    inputs = differentiable_inputs(example, torch.Generator().manual_seed(4))
    compiled = torch.compile(model, backend="dora")
    # fallback_random: Inductor draws dropout masks from eager's RNG stream, so the masks agree.
    with torch._inductor.config.patch(fallback_random=True):
        out, grads = step(compiled, fresh(inputs), seed=2)
    zero_grads(model)
    ref_out, ref_grads = step(model, fresh(inputs), seed=2)
    assert len(dora_fx.last_report().rewrites) == 2
    assert [r.variant for r in dora_fx.last_report().rewrites] == ["recomputed base (dropout)"] * 2
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
    assert_close_all(grads, ref_grads, rtol=1e-3, atol=1e-5)


def test_inductor_llama_eval_and_train_match_eager_peft():
    example = models.build("llama", layers=1)
    model = example.model
    inputs = differentiable_inputs(example, torch.Generator().manual_seed(6))
    compiled = torch.compile(model, backend=dora_fx.dora_backend)
    for train in (False, True):
        model.train(train)
        zero_grads(model)
        out, grads = step(compiled, fresh(inputs), seed=1)
        zero_grads(model)
        ref_out, ref_grads = step(model, fresh(inputs), seed=1)
        torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
        assert_close_all(grads, ref_grads, rtol=1e-3, atol=1e-5)
    # One graph for eval and one recompiled for train (Dynamo guards on the modules' training flag),
    # each with every DoRA layer rewritten.
    report = dora_fx.last_report()
    assert [len(graph.rewrites) for graph in report.graphs] == [example.dora_layers] * 2
