"""Launch Triton kernels so that ``torch.compile`` sees them.

On CUDA, while ``torch.compile`` (or any proxy tracing) traces a ``torch.library.triton_op`` that
launches a kernel, the launch goes through ``torch.library.wrap_triton``, so that Inductor gets the
kernel itself and launches it from its generated code (no Python op dispatch at run time). A launch
that simply runs now, on real tensors, calls the kernel directly: ``wrap_triton``'s higher-order-op
dispatch costs on the order of 100 µs of CPU per launch, more than the GPU time of the kernels at
small sizes. Under Triton's CPU interpreter kernels always launch as they are (``wrap_triton`` only
accepts compiled ``@triton.jit`` functions).
"""

from __future__ import annotations

import functools
import os

import torch
from torch.library import wrap_triton


@functools.cache
def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``), read once: Triton
    reads it when it decorates the kernels, which are imported with the first launch."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_sms(device: torch.device, default: int) -> int:
    """Multiprocessors of a CUDA ``device``; ``default`` elsewhere (the interpreter)."""
    if device.type != "cuda":
        return default
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def runs_now(on: torch.Tensor) -> bool:
    """Whether a launch for ``on`` runs immediately on real tensors, outside any tracing.

    Tracing shows as a tensor subclass (fake or functional tensors), an active proxy mode
    (``make_fx``), or Dynamo compiling; ``nn.Parameter`` is a plain tensor here.
    """
    return (
        type(on) in (torch.Tensor, torch.nn.Parameter)
        and not torch.compiler.is_compiling()
        and torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.PROXY) is None
    )


def launchable(kernel, on: torch.Tensor):
    """``kernel``, ready for ``[grid](...)``, for tensors on ``on``'s device (see the module docstring)."""
    if not on.is_cuda or runs_now(on):
        return kernel
    return wrap_triton(kernel)


class CompiledLaunches:
    """A ``@triton.jit`` kernel launched through the compiled forms Triton returns, for launches that
    run now on CUDA tensors (``runs_now``; not under the interpreter).

    ``kernel[grid](...)`` binds and specializes every argument at every launch: about 100 µs of host
    time for a kernel of twenty arguments on the H200 machine's host, more than many kernels' GPU time.
    The first launch per key goes that way and keeps the compiled kernel it returns; later ones call
    that kernel directly (``compiled[grid](*args)``), which only packs the arguments.

    ``key`` must determine the compiled form. Declare the kernel's integer parameters
    ``do_not_specialize`` and its pointer parameters ``do_not_specialize_on_alignment``; then what is
    left to key on is the device, the tensors' dtypes, the constexprs, and whether the integers fit in
    32 bits (Triton types them by value).
    """

    def __init__(self, kernel):
        self.kernel = kernel
        self._compiled: dict[tuple, object] = {}

    def launch(self, key: tuple, grid: tuple[int, int, int], args: tuple, num_warps: int) -> None:
        """Launch on ``grid`` with ``args``: every parameter of the kernel in order, constexprs included."""
        compiled = self._compiled.get(key)
        if compiled is None:
            self._compiled[key] = self.kernel[grid](*args, num_warps=num_warps)
        else:
            compiled[grid](*args)


def fits_int32(*values: int) -> bool:
    """Whether Triton types each of these (non-negative) integer arguments as ``i32``."""
    return max(values) < 2**31
