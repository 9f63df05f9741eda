"""The norms a compiled graph takes as inputs (:mod:`dora_fx.passes.lift_norms`), computed before each
call and reused while ``W``, ``A`` and ``B`` are unchanged.

Reuse follows :mod:`dora_fx.norm_cache`: the norms stay valid while every ``W``, ``A`` and ``B`` of the
graph is the same object, with the same storage and the same version counter, and no optimizer step
happened (:func:`dora_fx.norm_cache.epoch`; fused AdamW writes parameters without moving their
versions). The check is a tuple comparison per call; nothing is computed on a hit.

The norms live in flat buffers (one per dtype and device, each norm at its offset,
:mod:`dora_fx.passes.lift_norms`) at one address for the life of the compiled graph, refreshed in
place, so the compiled graph can treat them as static inputs (CUDA graphs read them without a copy).
A refresh moves the buffers' version counters: a backward that saved a norm before its W, A or B
changed fails with autograd's in-place error rather than using the new norm.

On CUDA, all the norms of a graph are recomputed by one replay of a CUDA graph captured on the first
refresh (a dozen kernels per norm otherwise cost the host more than the GPU), captured again when a
tensor moves to another address or a base weight changes (its ``||W||²`` is read, not recomputed, by
the captured work); the replay writes the buffers themselves. Where capture fails the norms are
computed eagerly, reported once.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence

import torch

from dora_fx import norm_cache, ops
from dora_fx.kernels import dispatch, launch
from dora_fx.passes.lift_norms import LiftedNorm, buffer_sizes

log = logging.getLogger(__name__)

Tensor = torch.Tensor


def example_norms(specs: Sequence[LiftedNorm], example_inputs: Sequence) -> list[Tensor]:
    """Example values of the lifted norm buffers for the compiler, of the kind ``example_inputs`` are
    (fake or real)."""
    fake_mode = torch._guards.detect_fake_mode(example_inputs)
    with fake_mode or contextlib.nullcontext():
        return [
            torch.zeros(size, dtype=dtype, device=_device(specs, i, example_inputs))
            for i, (size, dtype) in enumerate(buffer_sizes(specs))
        ]


def _device(specs: Sequence[LiftedNorm], buffer: int, args: Sequence) -> torch.device:
    return next(args[s.weight].device for s in specs if s.buffer == buffer)


class NormInputs:
    """The lifted norms of one compiled graph: ``norms(args)`` gives the buffers that hold their values
    for the graph's inputs."""

    def __init__(self, specs: Sequence[LiftedNorm]):
        self.specs = tuple(specs)
        self._sizes = buffer_sizes(self.specs)
        self._positions = sorted({i for s in self.specs for i in (s.weight, s.lora_A, s.lora_B)})
        self._weight_slots = [self._positions.index(i) for i in sorted({s.weight for s in self.specs})]
        self._state: tuple | None = None
        self._buffers: list[Tensor] | None = None
        self._views: list[Tensor] | None = None  # each spec's norm, a view into its buffer
        self._graph: _CapturedNorms | None = None
        self._capture_failed = False
        self.refreshes = 0
        """How many times the norms were computed (tests count them)."""
        norm_cache.watch_optimizer_steps()

    def norms(self, args: Sequence) -> list[Tensor]:
        tensors = [args[i] for i in self._positions]
        state = _state(tensors)
        if state is None or state != self._state:
            self._refresh(args, tensors, state)
            self._state = None if norm_cache.capturing(tensors[0]) else state
        return self._buffers

    def traced_norms(self, args: Sequence) -> list[Tensor]:
        """The norm buffers from ``dora_fx::weight_norm`` calls, for inputs that are traced rather than
        real (fake tensors, a tracer): nothing is kept."""
        norms = [
            torch.ops.dora_fx.weight_norm(args[s.weight], args[s.lora_A], args[s.lora_B], s.scaling, s.fan_in_fan_out)
            for s in self.specs
        ]
        return [
            torch.cat([norm for norm, s in zip(norms, self.specs) if s.buffer == i]) for i in range(len(self._sizes))
        ]

    def _refresh(self, args: Sequence, tensors: list[Tensor], state: tuple | None) -> None:
        self.refreshes += 1
        with torch.no_grad():
            if self._buffers is None:
                self._buffers = [
                    torch.empty(size, dtype=dtype, device=_device(self.specs, i, args))
                    for i, (size, dtype) in enumerate(self._sizes)
                ]
                self._views = [self._buffers[s.buffer].narrow(0, s.offset, s.d_out) for s in self.specs]
            # The graph's key reads versions: inputs without any (inference tensors) are computed eagerly.
            if state is not None and self._use_cuda_graph(tensors) and self._replayed(args, state):
                return
            torch._foreach_copy_(self._views, self._compute(args))

    def _compute(self, args: Sequence, squares: list[Tensor] | None = None) -> list[Tensor]:
        squares = squares or [None] * len(self.specs)
        return [
            ops.recomputed_weight_norm(args[s.weight], args[s.lora_A], args[s.lora_B], s.scaling, s.fan_in_fan_out, sq)
            for s, sq in zip(self.specs, squares)
        ]

    def _row_squares(self, args: Sequence) -> list[Tensor]:
        return [norm_cache.row_squares(args[s.weight], s.fan_in_fan_out) for s in self.specs]

    def _use_cuda_graph(self, tensors: list[Tensor]) -> bool:
        return (
            not self._capture_failed
            and all(t.is_cuda for t in tensors)
            and not norm_cache.capturing(tensors[0])
            and dispatch.triton_available()
            and not launch.interpreting()
        )

    def _replayed(self, args: Sequence, state: tuple) -> bool:
        """Refresh the buffers by a replay of the captured computation (captured first where there is
        none for these tensors and base weights); ``False`` where capture fails."""
        _, ids, (versions, pointers) = state
        key = (ids, pointers, tuple(versions[i] for i in self._weight_slots))
        if self._graph is None or self._graph.key != key:
            self._graph = None
            squares = self._row_squares(args)  # kept outside the graph, read by it

            def compute_into_buffers():
                torch._foreach_copy_(self._views, self._compute(args, squares))

            try:
                self._graph = _CapturedNorms(key, compute_into_buffers, keep=squares)
            except Exception as exc:  # a kernel that cannot be captured: compute eagerly from now on
                self._capture_failed = True
                log.warning("dora_fx: the norms could not be captured in a CUDA graph (%s); computing them eagerly", exc)
                return False
        self._graph.replay()
        # A replay writes the buffers behind autograd's back: move their versions on as a copy would.
        torch._C._autograd._unsafe_set_version_counter(tuple(self._buffers), tuple(b._version + 1 for b in self._buffers))
        return True


class _CapturedNorms:
    """A CUDA graph of a norm computation, captured on a stream of its own after one warm-up run there.

    cuBLAS keeps a workspace per stream, and destroying a graph releases the workspaces of the stream
    it was captured on (pytorch/pytorch#193402): two graphs captured on one stream (``torch.cuda.graph``'s
    shared default) leave the survivor's replay reading freed memory. So each graph gets its own
    stream, and the cuBLAS workspaces are cleared around the capture, as Inductor's CUDA graph trees
    do: the capture's workspace is allocated in this graph's private pool and lives as long as it.
    """

    def __init__(self, key: tuple, compute: Callable[[], None], keep: object):
        self.key = key
        self._inputs = keep  # tensors the graph reads that nothing else may keep alive
        self._stream = torch.cuda.Stream()
        self._stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self._stream):
            compute()  # compiles the kernels outside the capture
        torch.cuda.current_stream().wait_stream(self._stream)
        self._graph = torch.cuda.CUDAGraph()
        torch._C._cuda_clearCublasWorkspaces()
        try:
            # thread_local: CUDA calls of other threads (compile workers, data loaders) neither break
            # this capture nor fail because of it.
            with torch.cuda.graph(self._graph, stream=self._stream, capture_error_mode="thread_local"):
                compute()
        finally:
            torch._C._cuda_clearCublasWorkspaces()

    def replay(self) -> None:
        self._graph.replay()


def _state(tensors: list[Tensor]) -> tuple | None:
    """What must stay equal for the norms to stay valid, ``(epoch, ids, (versions, storages))``, or
    ``None`` where there is no such thing (inference tensors have no version counter)."""
    try:
        return norm_cache.epoch(), tuple(map(id, tensors)), norm_cache.state(tensors)
    except RuntimeError:
        return None


def with_norm_inputs(compiled: Callable, specs: Sequence[LiftedNorm]) -> Callable:
    """``compiled`` (a graph with ``specs`` as its trailing inputs), called with its other inputs only."""
    inputs = NormInputs(specs)

    def call_with_norms(*args):
        if not launch.runs_now(args[specs[0].weight]):  # fake tensors (DDPOptimizer's propagation), tracing
            return compiled(*args, *inputs.traced_norms(args))
        return compiled(*args, *inputs.norms(args))

    call_with_norms.norm_inputs = inputs
    return call_with_norms
