"""Launch Triton kernels so that ``torch.compile`` sees them.

On CUDA every launch goes through ``torch.library.wrap_triton``: called eagerly it simply launches
the kernel, and when ``torch.compile`` traces a ``torch.library.triton_op`` that calls it, Inductor
gets the kernel itself and launches it from its generated code (no Python op dispatch at run time).
Elsewhere, under Triton's CPU interpreter, kernels launch as they are (``wrap_triton`` only accepts
compiled ``@triton.jit`` functions).
"""

from __future__ import annotations

import functools
import os

import torch
from torch.library import wrap_triton


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_sms(device: torch.device, default: int) -> int:
    """Multiprocessors of a CUDA ``device``; ``default`` elsewhere (the interpreter)."""
    if device.type != "cuda":
        return default
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def launchable(kernel, on: torch.Tensor):
    """``kernel``, ready for ``[grid](...)``, for tensors on ``on``'s device."""
    return wrap_triton(kernel) if on.is_cuda else kernel
