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
