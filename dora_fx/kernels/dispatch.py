"""The entry points the ops call: each runs its Triton kernel where it applies, else the reference math.

The Triton kernels serve CUDA tensors. Everything else, and any call whose kernel fails to import,
compile or launch here, runs :mod:`dora_fx.kernels.reference`; a failing kernel is reported once per
op and reason (per process) through ``logging`` and ``warnings``, and the model keeps running.
:data:`fallbacks` counts every fallback, reported or not, so that a test can see one.

Each entry point names its launcher (in :mod:`dora_fx.kernels.norm` or :mod:`dora_fx.kernels.compose`,
imported when first called, so that a broken Triton install falls back too) and, through
:func:`with_fallback`, its reference function.

The fallback covers what runs through these functions: eager calls of the ops, and the ops' bodies
while ``torch.compile`` traces them (a kernel that fails there is replaced by the reference math in the
compiled graph). It does not cover a kernel that Inductor has captured into its generated code
(``triton_op`` traced with ``wrap_triton``, see :mod:`dora_fx.kernels.launch`): Inductor compiles
and launches that kernel itself, so a failure there fails the compile, or the compiled call, with
Triton's own error, and nothing falls back.
"""

from __future__ import annotations

import collections
import functools
import logging
import warnings
from collections.abc import Callable

import torch

from dora_fx.kernels import launch, reference

log = logging.getLogger(__name__)

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


def with_fallback(reference_fn: Callable) -> Callable[[Callable], Callable]:
    """Make a function that launches a Triton kernel an entry point with ``reference_fn`` as its fallback.

    The entry point, named after the op, runs ``reference_fn`` where there is no kernel
    (:func:`has_kernel`), while ``torch.compile`` traces an op of :data:`TRACED_AS_REFERENCE`, and
    after the kernel failed (counted in :data:`fallbacks`, reported once per exception type).
    """

    def decorate(launch_kernel: Callable) -> Callable:
        name = launch_kernel.__name__

        @functools.wraps(launch_kernel)
        def kernel_or_reference(*args):
            if name in TRACED_AS_REFERENCE and _traced(args):
                return reference_fn(*args)
            if has_kernel(args):
                try:  # a broken Triton install can already fail on import
                    return launch_kernel(*args)
                except Exception as exc:  # import, compile or launch failure: fall back, once reported
                    fallbacks[name] += 1
                    _report_failure(name, exc)
            return reference_fn(*args)

        return kernel_or_reference

    return decorate


def _norm_kernels():
    from dora_fx.kernels import norm

    return norm


def _compose_kernels():
    from dora_fx.kernels import compose

    return compose


@with_fallback(reference.weight_norm)
def weight_norm(*args):
    return _norm_kernels().weight_norm(*args)


@with_fallback(reference.compose)
def compose(*args):
    return _compose_kernels().compose(*args)


@with_fallback(reference.compose_with_adapted)
def compose_with_adapted(*args):
    return _compose_kernels().compose_with_adapted(*args)


@with_fallback(reference.compose_backward)
def compose_backward(*args):
    return _compose_kernels().compose_backward(*args)


@with_fallback(reference.zero_magnitude_grad)
def zero_magnitude_grad(*args):
    return _compose_kernels().zero_magnitude_grad(*args)
