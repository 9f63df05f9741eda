"""The ``torch.compile`` backend: rewrite DoRA regions, then hand the graph to the inner compiler.

The PEFT stand-ins of :mod:`dora_fx.compat` change what Dynamo traces for every backend, so they are
registered when a dora_fx backend is first used, not when dora_fx is imported: when a
:class:`DoraBackend` is made, and when :func:`dora_backend` is first looked up (``dora_fx.dora_backend``,
``from dora_fx import dora_backend``, or ``backend="dora"`` through the entry point). Both come
before Dynamo traces anything for that backend, as they must: Dynamo calls a backend only after
tracing a graph, too late to keep PEFT's helpers from breaking it. Until then, ``backend="inductor"``
and other backends trace PEFT as they would without dora_fx.
"""

from __future__ import annotations

import collections
import functools
import itertools
import logging
from collections.abc import Callable

import torch
import torch.fx as fx

from dora_fx import compat, compile_options, norm_inputs
from dora_fx.passes import dora_linear, recompute
from dora_fx.passes.lift_norms import lift_norms
from dora_fx.passes.pipeline import run_passes
from dora_fx.report import GraphReport, NearMiss, Report

log = logging.getLogger(__name__)

CompilerFn = Callable[[fx.GraphModule, list], Callable]
_graph_ids = itertools.count()
_last_report = Report()


def graph_break_counts() -> collections.Counter:
    """Dynamo's graph-break reasons so far (``torch._dynamo.reset()`` clears them)."""
    return collections.Counter(torch._dynamo.utils.counters["graph_break"])


_last_report_breaks_from = graph_break_counts()

# Inductor settings for a graph whose DoRA layers all have few rows (dora_linear.host_paced): there
# the host's launches set the step's pace, and splitting a reduction (the magnitude's column sums
# above all) into two kernels costs more host time than the GPU time it saves. At 512 tokens of the
# 8B-shaped stack's train step this took 32 of 125 Triton launches out (benchmarks/README.md,
# session 12). The user's mode and options are applied over these.
HOST_PACED_INDUCTOR_CONFIG = {"split_reductions": False}

_DDP_BUCKET_HINT = (
    "this graph is one of the pieces Dynamo's DDPOptimizer cut at DDP bucket boundaries, which can split a "
    "DoRA region; torch._dynamo.config.optimize_ddp = 'python_reducer' (or 'no_optimization') keeps it whole"
)


def _compiling_ddp_bucket_pieces() -> bool:
    """Whether Dynamo's DDPOptimizer is handing this backend one DDP bucket's piece of a graph.

    It does so while a ``DistributedDataParallel`` forward is being traced and
    ``torch._dynamo.config.optimize_ddp`` is ``True`` (the default) or ``"ddp_optimizer"``.
    """
    if torch._dynamo.config.optimize_ddp not in (True, "ddp_optimizer"):
        return False
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel._get_active_ddp_module() is not None


def _resolve(inner: str | CompilerFn) -> CompilerFn:
    if callable(inner):
        return inner
    return torch._dynamo.lookup_backend(inner)


class DoraBackend:
    """A configurable dora_fx backend.

    ``DoraBackend()`` rewrites and compiles with Inductor; ``DoraBackend(inner="aot_eager")`` (or any
    Dynamo backend name or compiler function) hands the rewritten graph to that instead.
    ``DoraBackend(rewrite=False)`` runs no pass: it hands every graph to ``inner`` unchanged and
    records for it an empty graph report (no rewrites, no near-misses; the graph breaks are still
    recorded), so it finds nothing and reports nothing about DoRA regions.

    ``backend.report`` accumulates over every graph this backend compiled, for its whole life;
    :func:`last_report` accumulates over every graph any dora_fx backend compiled since the last
    :func:`reset_report` (not only those of the most recent ``torch.compile`` call).

    ``mode`` and ``options`` mean what they mean to ``torch.compile`` with Inductor (``"default"``,
    ``"reduce-overhead"``, ``"max-autotune"``, ``"max-autotune-no-cudagraphs"``; a dict of
    ``torch._inductor.config`` settings) and are passed on to Inductor. ``torch.compile(model,
    backend=..., mode=..., options=...)`` hands its own to the backend, applied over these. With an
    inner compiler other than ``"inductor"`` anything but the default is a ``ValueError``, as are
    unknown modes and options.
    """

    def __init__(
        self,
        inner: str | CompilerFn = "inductor",
        rewrite: bool = True,
        mode: str | None = None,
        options: dict | None = None,
    ):
        compat.install()
        self.inner = inner
        self.rewrite = rewrite
        self.config_patches = self._config_patches(mode, options)
        self.mode = mode
        self.options = dict(options) if options else None
        self.report = Report()
        self._breaks_from = graph_break_counts()

    def _config_patches(self, mode: str | None, options: dict | None) -> dict:
        if compile_options.is_default(mode, options):
            return {}
        if self.inner != "inductor":
            raise ValueError(
                f"mode={mode!r} and options={options!r} are Inductor settings, but this dora backend's inner "
                f"compiler is {self.inner!r}, which takes none: leave them out or use DoraBackend(inner='inductor')"
            )
        return compile_options.inductor_config_patches(mode, options)

    def __call__(
        self, gm: fx.GraphModule, example_inputs: list, *, mode: str | None = None, options: dict | None = None
    ) -> Callable:
        config_patches = {**self.config_patches, **self._config_patches(mode, options)}
        graph_id = next(_graph_ids)
        if self.rewrite:
            graph_report = run_passes(gm, graph_id)
        else:
            graph_report = GraphReport(graph_id)
        if graph_report.near_misses and _compiling_ddp_bucket_pieces():
            graph_report.near_misses = [
                NearMiss(miss.where, f"{miss.reason}; {_DDP_BUCKET_HINT}") for miss in graph_report.near_misses
            ]
        if self.rewrite and self.inner == "inductor" and dora_linear.host_paced(gm):
            graph_report.inductor_config = dict(HOST_PACED_INDUCTOR_CONFIG)
            config_patches = {**HOST_PACED_INDUCTOR_CONFIG, **config_patches}
        self.report.graphs.append(graph_report)
        _last_report.graphs.append(graph_report)
        breaks = graph_break_counts()
        self.report.graph_breaks = dict(breaks - self._breaks_from)
        _last_report.graph_breaks = dict(breaks - _last_report_breaks_from)
        log.info(
            "dora_fx: graph %d: %d DoRA region(s) rewritten, %d near-miss(es), pass %.3f s; compiling with %s%s",
            graph_id,
            len(graph_report.rewrites),
            len(graph_report.near_misses),
            graph_report.pass_seconds,
            self.inner if isinstance(self.inner, str) else getattr(self.inner, "__name__", repr(self.inner)),
            f" {config_patches}" if config_patches else "",
        )
        gm, lifted = lift_norms(gm)
        if lifted:
            example_inputs = [*example_inputs, *norm_inputs.example_norms(lifted, example_inputs)]
        compiled = self._compile(gm, example_inputs, config_patches)
        return norm_inputs.with_norm_inputs(compiled, lifted) if lifted else compiled

    def _compile(self, gm: fx.GraphModule, example_inputs: list, config_patches: dict) -> Callable:
        if self.inner == "inductor":
            from torch._inductor.compile_fx import compile_fx

            if recompute.has_kept_outputs(gm):
                config_patches = {**config_patches, "joint_custom_pre_pass": _recompute_pass(config_patches)}
            return compile_fx(gm, example_inputs, config_patches=config_patches or None)
        return _resolve(self.inner)(gm, example_inputs)

    def __repr__(self) -> str:
        settings = "".join(
            f", {name}={value!r}" for name, value in (("mode", self.mode), ("options", self.options)) if value
        )
        return f"DoraBackend(inner={self.inner!r}, rewrite={self.rewrite}{settings})"


def _recompute_pass(config_patches: dict) -> recompute.RecomputeFromKeptOutputs:
    """dora_fx's joint-graph pass (:mod:`dora_fx.passes.recompute`), followed by the
    ``joint_custom_pre_pass`` that ``config_patches`` or Inductor's config already holds."""
    then = config_patches.get("joint_custom_pre_pass", torch._inductor.config.joint_custom_pre_pass)
    return recompute.RecomputeFromKeptOutputs(then=then)


def reset_report() -> None:
    """Forget the graphs and graph breaks that :func:`last_report` holds."""
    global _last_report_breaks_from
    _last_report.graphs.clear()
    _last_report.graph_breaks = {}
    _last_report_breaks_from = graph_break_counts()


def last_report() -> Report:
    """The report over every graph any dora_fx backend compiled since the last :func:`reset_report`."""
    return _last_report


def _dora_backend(
    gm: fx.GraphModule, example_inputs: list, *, mode: str | None = None, options: dict | None = None
) -> Callable:
    """``torch.compile(model, backend=dora_backend)`` (or ``backend="dora"``): rewrite DoRA regions,
    compile with Inductor. ``torch.compile``'s ``mode`` and ``options`` reach Inductor as they would
    with ``backend="inductor"``."""
    return _default_backend()(gm, example_inputs, mode=mode, options=options)


_dora_backend.__name__ = _dora_backend.__qualname__ = "dora_backend"


@functools.cache
def _default_backend() -> DoraBackend:
    return DoraBackend()


def __getattr__(name: str):
    """``dora_backend``, looked up: the first lookup registers the PEFT stand-ins (see the module docstring)."""
    if name == "dora_backend":
        compat.install()
        return _dora_backend
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
