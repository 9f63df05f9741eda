"""Test-session setup shared by all test packages.

Without a CUDA device the Triton kernels run under Triton's interpreter, which must be switched on
before ``triton`` is first imported.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import dora_fx  # noqa: E402  (after the interpreter switch)
from dora_fx.kernels import dispatch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` (registered in pyproject.toml) are skipped where there is no CUDA device:
    the one place that says so."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch: no cache hits or recompile limits carried between tests."""
    torch._dynamo.reset()
    dora_fx.reset_report()
    yield
    torch._dynamo.reset()


@pytest.fixture(autouse=True)
def _cuda_tests_run_the_kernels(request):
    """A test marked ``cuda`` fails if any op fell back from its Triton kernel to the reference math.

    The fallback warns only once per process (so a second test would not see a warning);
    ``dispatch.fallbacks`` counts every one, and is cleared here for each test.
    """
    if request.node.get_closest_marker("cuda") is None:
        yield
        return
    dispatch.fallbacks.clear()
    yield
    assert not dispatch.fallbacks, f"ops fell back to the reference math: {dict(dispatch.fallbacks)}"


@pytest.fixture(autouse=True)
def _small_outputs_take_the_large_output_path(monkeypatch):
    """Tests run layers of a few tokens; they exercise what training graphs of thousands of tokens
    do, keeping the output for the magnitude's gradient (``compose_saving_output``). The tests of the
    size policy itself (tests/test_keep_output_policy.py) set the threshold they check."""
    from dora_fx.passes import dora_linear

    monkeypatch.setattr(dora_linear, "KEEP_OUTPUT_MIN_ROWS", 1)
