"""When kernels launch directly and when through ``wrap_triton`` (dora_fx/kernels/launch.py)."""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

from dora_fx.kernels import launch


def test_real_tensors_and_parameters_launch_now():
    assert launch.runs_now(torch.ones(3))
    assert launch.runs_now(torch.nn.Parameter(torch.ones(3)))


def test_fake_tensors_are_traced():
    with FakeTensorMode():
        assert not launch.runs_now(torch.ones(3))


def test_proxy_tracing_is_traced():
    seen = []

    def fn(x):
        seen.append(launch.runs_now(x))
        return x + 1

    make_fx(fn, tracing_mode="real")(torch.ones(3))  # real tensors, but a proxy mode records the graph
    make_fx(fn, tracing_mode="fake")(torch.ones(3))
    assert seen == [False, False]


def test_functional_tensors_are_traced():
    from torch._subclasses.functional_tensor import FunctionalTensor, FunctionalTensorMode

    with FunctionalTensorMode():
        x = FunctionalTensor.to_functional(torch.ones(3))
        assert not launch.runs_now(x)


def test_cpu_tensors_always_get_the_plain_kernel():
    kernel = object()
    with FakeTensorMode():
        assert launch.launchable(kernel, torch.ones(3)) is kernel


class _RecordingKernel:
    """Stands in for a ``@triton.jit`` function: ``kernel[grid](...)`` records the call and returns a
    compiled stand-in that records its own launches."""

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        def run(*args, **options):
            self.calls.append(("jit", grid, args, options))
            return _RecordingCompiled(self.calls, len(self.calls))

        return run


class _RecordingCompiled:
    def __init__(self, calls, n):
        self.calls, self.n = calls, n

    def __getitem__(self, grid):
        return lambda *args: self.calls.append((f"compiled {self.n}", grid, args, {}))


def test_compiled_launches_compile_once_per_key_then_launch_the_compiled_kernel():
    kernel = _RecordingKernel()
    launches = launch.CompiledLaunches(kernel)
    launches.launch(("a",), (2, 1, 1), (1, 2), num_warps=4)
    launches.launch(("a",), (3, 1, 1), (5, 6), num_warps=4)
    launches.launch(("b",), (1, 1, 1), (7,), num_warps=8)
    launches.launch(("a",), (4, 1, 1), (8, 9), num_warps=4)
    assert kernel.calls == [
        ("jit", (2, 1, 1), (1, 2), {"num_warps": 4}),
        ("compiled 1", (3, 1, 1), (5, 6), {}),
        ("jit", (1, 1, 1), (7,), {"num_warps": 8}),
        ("compiled 1", (4, 1, 1), (8, 9), {}),
    ]


def test_fits_int32_is_the_boundary_triton_types_by():
    assert launch.fits_int32(0, 2**31 - 1)
    assert not launch.fits_int32(3, 2**31)
