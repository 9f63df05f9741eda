"""Test-session setup shared by all test packages.

Without a CUDA device the Triton kernels run under Triton's interpreter, which must be switched on
before ``triton`` is first imported.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU")
