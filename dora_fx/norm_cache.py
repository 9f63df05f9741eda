"""Reuse the DoRA weight norm while W, A and B are unchanged (eval without a user flag).

In eval the norm ``||W + s·B·A||_row`` is a constant, yet PEFT recomputes it on every call. The
``dora_fx::weight_norm`` op keeps the last norm per ``(W, A, B, s, fan_in_fan_out)`` and returns a copy
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
    refs: tuple[weakref.ref, ...]
    state: tuple[tuple[int, int], ...]
    norm: torch.Tensor

    def matches(self, tensors: tuple[torch.Tensor, ...]) -> bool:
        return all(ref() is t for ref, t in zip(self.refs, tensors)) and self.state == _state(tensors)


_entries: dict[tuple, _Entry] = {}


def _state(tensors: tuple[torch.Tensor, ...]) -> tuple[tuple[int, int], ...]:
    return tuple((t._version, t.data_ptr()) for t in tensors)


def _cacheable(tensors: tuple[torch.Tensor, ...]) -> bool:
    if any(t.is_inference() for t in tensors):  # inference tensors carry no version counter
        return False
    return not (tensors[0].is_cuda and torch.cuda.is_current_stream_capturing())


def clear() -> None:
    """Forget every cached norm."""
    _entries.clear()


def cached_or_compute(compute, weight, lora_A, lora_B, scaling: float, fan_in_fan_out: bool) -> torch.Tensor:
    """``compute(...)``'s norm, reused while ``weight``, ``lora_A`` and ``lora_B`` are unchanged."""
    tensors = (weight, lora_A, lora_B)
    if not _cacheable(tensors):
        return compute(weight, lora_A, lora_B, scaling, fan_in_fan_out)
    key = (*map(id, tensors), float(scaling), bool(fan_in_fan_out))
    entry = _entries.get(key)
    if entry is None or not entry.matches(tensors):
        norm = compute(weight, lora_A, lora_B, scaling, fan_in_fan_out)
        if len(_entries) >= _MAX_ENTRIES_BEFORE_PRUNING:
            for stale in [k for k, e in _entries.items() if any(r() is None for r in e.refs)]:
                del _entries[stale]
        entry = _entries[key] = _Entry(tuple(map(weakref.ref, tensors)), _state(tensors), norm)
    # A copy: the caller (Inductor included) may reuse or overwrite the buffer it gets.
    return entry.norm.clone()
