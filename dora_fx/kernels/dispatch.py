"""Choose, per call, between the Triton kernels and the reference math.

The Triton kernels serve CUDA tensors. Everything else, and any call whose kernel fails to import,
compile or launch here, runs :mod:`dora_fx.kernels.reference`; a failing kernel is reported once per
op and reason (per process) through ``logging`` and ``warnings``, and the model keeps running.
:data:`fallbacks` counts every fallback, reported or not, so that a test can see one.

The fallback covers what runs through :func:`call`: eager calls of the ops, and the ops' bodies while
``torch.compile`` traces them (a kernel that fails there is replaced by the reference math in the
compiled graph). It does not cover a kernel that Inductor has captured into its generated code
(``triton_op`` traced with ``wrap_triton``, see :mod:`dora_fx.kernels.launch`): Inductor compiles
and launches that kernel itself, so a failure there fails the compile, or the compiled call, with
Triton's own error, and nothing falls back.
"""

from __future__ import annotations

import collections
import functools
import importlib
import logging
import warnings

import torch

from dora_fx.kernels import launch, reference

log = logging.getLogger(__name__)

_KERNEL_MODULE = {
    "weight_norm": "dora_fx.kernels.norm",
    "compose": "dora_fx.kernels.compose",
    "compose_with_adapted": "dora_fx.kernels.compose",
    "compose_backward": "dora_fx.kernels.compose",
    "zero_magnitude_grad": "dora_fx.kernels.compose",
}
# Ops whose plain-PyTorch math is what torch.compile traces, so that Inductor fuses it with the
# neighbouring pointwise ops (the layer's consumer, the residual add, the backward's gradient scaling)
# instead of launching a kernel of its own; called outside tracing they launch their Triton kernel.
TRACED_AS_REFERENCE = {"compose", "compose_with_adapted", "compose_backward"}
_reported_failures: set[tuple[str, str]] = set()

fallbacks: collections.Counter[str] = collections.Counter()
"""Op name -> number of calls of that op whose kernel failed and that ran the reference math instead,
every one counted (only the first is reported). Tests clear it and assert that it stays empty."""


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def has_kernel(args) -> bool:
    """Whether a call on ``args`` goes to a Triton kernel: CUDA tensors and Triton installed."""
    return any(isinstance(a, torch.Tensor) and a.is_cuda for a in args) and triton_available()


def _traced(args) -> bool:
    return not launch.runs_now(next(a for a in args if isinstance(a, torch.Tensor)))


def _report_failure(name: str, exc: Exception) -> None:
    key = (name, type(exc).__name__)
    if key in _reported_failures:
        return
    _reported_failures.add(key)
    message = f"dora_fx: the Triton kernel for {name} failed ({type(exc).__name__}: {exc}); using the reference math"
    log.warning(message)
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def call(name: str, *args):
    """Run op ``name`` on ``args`` with its Triton kernel where it applies, else the reference."""
    if name in TRACED_AS_REFERENCE and _traced(args):
        return getattr(reference, name)(*args)
    if has_kernel(args):
        try:  # a broken Triton install can already fail on import
            kernel = getattr(importlib.import_module(_KERNEL_MODULE[name]), name)
            return kernel(*args)
        except Exception as exc:  # import, compile or launch failure: fall back, once reported
            fallbacks[name] += 1
            _report_failure(name, exc)
    return getattr(reference, name)(*args)
