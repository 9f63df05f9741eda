"""Launch Triton kernels so that ``torch.compile`` sees them.

On CUDA every launch goes through ``torch.library.wrap_triton``: called eagerly it simply launches
the kernel, and when ``torch.compile`` traces a ``torch.library.triton_op`` that calls it, Inductor
gets the kernel itself and launches it from its generated code (no Python op dispatch at run time).
Elsewhere, under Triton's CPU interpreter, kernels launch as they are (``wrap_triton`` only accepts
compiled ``@triton.jit`` functions).
"""

from __future__ import annotations

import torch
from torch.library import wrap_triton


def launchable(kernel, on: torch.Tensor):
    """``kernel``, ready for ``[grid](...)``, for tensors on ``on``'s device."""
    return wrap_triton(kernel) if on.is_cuda else kernel
