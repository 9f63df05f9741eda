"""Reuse values computed from tensors while those tensors are unchanged: the DoRA weight norm, ``||W||²``.

Between optimizer steps the norm ``||W + s·B·A||_row`` is a constant (PEFT detaches it), yet PEFT
recomputes it in every forward: every eval call, every gradient-accumulation micro-batch, every
activation-checkpoint recomputation. The ``dora_fx::cached_weight_norm`` op keeps the last norm per
``(W, A, B, s, fan_in_fan_out)`` and returns a copy while each of the three tensors is the same
object, with the same storage and the same autograd version counter. Anything that writes them
through autograd-visible ops (an optimizer step, ``load_state_dict``, ``copy_``/``mul_`` under
``no_grad``), rebinds ``.data``, or swaps the tensors (``set_adapter``, merging) invalidates the entry.
The frozen base weight's row sums ``||W_i||²`` are kept the same way (:func:`row_squares`), so a
recomputed norm need not read ``W`` for them.

Some optimizers write their parameters without moving the version counters (torch's
``AdamW(fused=True)``, which the HF Trainer uses by default, is one); so every optimizer step (a global
``torch.optim`` step hook, registered when the first value is kept) also forgets every norm, and the
``||W||²`` of any weight that optimizer updates. Other writes through ``tensor.data``
(``p.data.add_(...)``) bypass the version counter; call :func:`clear` after such writes. Inference tensors (no version counter) and values produced during
CUDA graph capture are never kept.
"""

from __future__ import annotations

import operator
import weakref
from collections.abc import Callable, Hashable, Sequence

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

_MAX_ENTRIES_BEFORE_PRUNING = 4096


_version = operator.attrgetter("_version")


def state(tensors: Sequence[torch.Tensor]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(versions, storages)`` of ``tensors``: equal while none was written or rebound through
    autograd-visible ops (raises ``RuntimeError`` for inference tensors, which have no version counter)."""
    return tuple(map(_version, tensors)), tuple(map(torch.Tensor.data_ptr, tensors))


def capturing(tensor: torch.Tensor) -> bool:
    """Whether work on ``tensor``'s device is being captured into a CUDA graph now."""
    return tensor.is_cuda and torch.cuda.is_current_stream_capturing()


class VersionedCache:
    """Values keyed on tensors, valid while each tensor is the same object with the same storage and
    version counter (plus a hashable ``extra`` part of the key)."""

    def __init__(self) -> None:
        self._entries: dict[tuple, tuple[tuple[weakref.ref, ...], tuple[int, ...], object]] = {}

    def get(self, tensors: tuple[torch.Tensor, ...], extra: Hashable = ()):
        """The value kept for ``tensors`` and ``extra``, or ``None``: a dict lookup, identity checks and
        integer comparisons."""
        entry = self._entries.get((*map(id, tensors), extra))
        if entry is None or capturing(tensors[0]):
            return None
        refs, kept_state, value = entry
        if any(ref() is not t for ref, t in zip(refs, tensors)) or kept_state != state(tensors):
            return None
        return value

    def put(self, tensors: tuple[torch.Tensor, ...], extra: Hashable, value) -> None:
        """Keep ``value`` for ``tensors`` and ``extra``, where allowed (not for inference tensors, not
        during CUDA graph capture)."""
        if any(t.is_inference() for t in tensors) or capturing(tensors[0]):
            return
        watch_optimizer_steps()
        if len(self._entries) >= _MAX_ENTRIES_BEFORE_PRUNING:
            for stale in [k for k, (refs, _, _) in self._entries.items() if any(r() is None for r in refs)]:
                del self._entries[stale]
        self._entries[(*map(id, tensors), extra)] = (tuple(map(weakref.ref, tensors)), state(tensors), value)

    def get_or_compute(self, tensors: tuple[torch.Tensor, ...], extra: Hashable, compute: Callable[[], object]):
        value = self.get(tensors, extra)
        if value is None:
            value = compute()
            self.put(tensors, extra, value)
        return value

    def forget(self, tensor_ids: set[int]) -> None:
        """Drop the values kept for any of the tensors whose ``id`` is in ``tensor_ids``."""
        for key in [k for k, (refs, _, _) in self._entries.items() if any(id(r()) in tensor_ids for r in refs)]:
            del self._entries[key]

    def clear(self) -> None:
        self._entries.clear()


_norms = VersionedCache()
_squares = VersionedCache()


_hook_registered = False
_epoch = 0


def epoch() -> int:
    """A count that moves on at every optimizer step and every :func:`clear`: a norm computed in an
    earlier epoch may be stale even where the versions of its tensors did not move."""
    return _epoch


def _after_optimizer_step(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    """An optimizer step changed the adapters (maybe without moving their versions): no norm is valid."""
    global _epoch
    _epoch += 1
    _norms.clear()
    _squares.forget({id(p) for group in optimizer.param_groups for p in group["params"]})


def watch_optimizer_steps() -> None:
    """Make every optimizer step move :func:`epoch` on and forget the kept norms, from now on."""
    global _hook_registered
    if not _hook_registered:
        register_optimizer_step_post_hook(_after_optimizer_step)
        _hook_registered = True


def clear() -> None:
    """Forget every cached norm and ``||W||²`` (and move :func:`epoch` on)."""
    global _epoch
    _epoch += 1
    _norms.clear()
    _squares.clear()


def lookup(weight, lora_A, lora_B, scaling: float, fan_in_fan_out: bool) -> torch.Tensor | None:
    """A copy of the norm cached for these tensors, or ``None`` when there is none to reuse.

    The hit path of :func:`dora_fx.ops.cached_weight_norm`: an entry only exists for tensors that
    passed the op's checks. A copy, because the caller (Inductor included) may reuse or overwrite the
    buffer it gets.
    """
    norm = _norms.get((weight, lora_A, lora_B), (scaling, fan_in_fan_out))
    return None if norm is None else norm.clone()


def store(weight, lora_A, lora_B, scaling: float, fan_in_fan_out: bool, norm: torch.Tensor) -> torch.Tensor:
    """Keeps ``norm`` for later :func:`lookup` calls where allowed; returns a copy of it."""
    _norms.put((weight, lora_A, lora_B), (scaling, fan_in_fan_out), norm)
    return norm.clone()


def row_squares(weight: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    """``||W_i||²`` over the rows of ``W`` (``W = weight.T`` when ``fan_in_fan_out``) in float32
    (float64 for a float64 ``weight``), computed once while ``weight`` is unchanged."""

    def compute() -> torch.Tensor:
        w_rows = weight.T if fan_in_fan_out else weight
        dtype = torch.promote_types(weight.dtype, torch.float32)
        return torch.linalg.vector_norm(w_rows, dim=1, dtype=dtype).square()

    return kept_row_squares(weight, fan_in_fan_out, compute)


def kept_row_squares(stored: torch.Tensor, layout: Hashable, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``||W_i||²`` of a frozen ``W`` held in ``stored`` (read as ``layout`` says: transposed, packed
    4-bit, ...), from ``compute()`` once while ``stored`` is unchanged."""
    return _squares.get_or_compute((stored,), layout, compute)
