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


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch: no cache hits or recompile limits carried between tests."""
    torch._dynamo.reset()
    dora_fx.reset_report()
    yield
    torch._dynamo.reset()
