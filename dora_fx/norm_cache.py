"""Reuse the DoRA weight norm while W, A and B are unchanged (eval without a user flag).

In eval the norm ``||W + s·B·A||_row`` is a constant, yet PEFT recomputes it on every call. The
``dora_fx::cached_weight_norm`` op keeps the last norm per ``(W, A, B, s, fan_in_fan_out)`` and returns a copy
while each of the three tensors is the same object, with the same storage and the same autograd
version counter. Anything that writes them through autograd-visible ops (an optimizer step,
``load_state_dict``, ``copy_``/``mul_`` under ``no_grad``), rebinds ``.data``, or swaps the tensors
(``set_adapter``, merging) invalidates the entry. In training every step changes A and B, so the norm
is recomputed each step, as it must be.

Writes through ``tensor.data`` (``p.data.add_(...)``) bypass the version counter; call
:func:`clear` after such writes. During CUDA graph capture nothing is cached.
"""

from __future__ import annotations

import dataclasses
import weakref

import torch

_MAX_ENTRIES_BEFORE_PRUNING = 4096


@dataclasses.dataclass
class _Entry:
    refs: tuple[weakref.ref, weakref.ref, weakref.ref]
    state: tuple[int, ...]
    norm: torch.Tensor

    def matches(self, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor) -> bool:
        w, a, b = self.refs
        return w() is weight and a() is lora_A and b() is lora_B and self.state == _state(weight, lora_A, lora_B)


_entries: dict[tuple, _Entry] = {}


def _state(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor) -> tuple[int, ...]:
    return (weight._version, lora_A._version, lora_B._version, weight.data_ptr(), lora_A.data_ptr(), lora_B.data_ptr())


def _capturing(weight: torch.Tensor) -> bool:
    return weight.is_cuda and torch.cuda.is_current_stream_capturing()


def clear() -> None:
    """Forget every cached norm."""
    _entries.clear()


def lookup(weight, lora_A, lora_B, scaling: float, fan_in_fan_out: bool) -> torch.Tensor | None:
    """A copy of the norm cached for these tensors, or ``None`` when there is none to reuse.

    The hit path of :func:`dora_fx.ops.cached_weight_norm`, kept to a dict lookup, three identity
    checks, six integer comparisons and one copy: an entry only exists for tensors that passed the
    op's checks, and the tensors it names are the same objects with the same storage and versions.
    """
    entry = _entries.get((id(weight), id(lora_A), id(lora_B), scaling, fan_in_fan_out))
    if entry is None or not entry.matches(weight, lora_A, lora_B) or _capturing(weight):
        return None
    # A copy: the caller (Inductor included) may reuse or overwrite the buffer it gets.
    return entry.norm.clone()


def store(weight, lora_A, lora_B, scaling: float, fan_in_fan_out: bool, norm: torch.Tensor) -> torch.Tensor:
    """Keeps ``norm`` for later :func:`lookup` calls where allowed; returns a copy of it."""
    tensors = (weight, lora_A, lora_B)
    # Inference tensors carry no version counter; during CUDA graph capture nothing is kept.
    if any(t.is_inference() for t in tensors) or _capturing(weight):
        return norm
    if len(_entries) >= _MAX_ENTRIES_BEFORE_PRUNING:
        for stale in [k for k, e in _entries.items() if any(r() is None for r in e.refs)]:
            del _entries[stale]
    key = (*map(id, tensors), scaling, fan_in_fan_out)
    _entries[key] = _Entry(tuple(map(weakref.ref, tensors)), _state(*tensors), norm)
    return norm.clone()
