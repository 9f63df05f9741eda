"""Audit what the dora backend does to a model, without running a full compile.

``audit(model, *args, **kwargs)`` traces ``model`` once with Dynamo, runs the dora_fx passes and
returns the :class:`~dora_fx.report.Report`; ``dump_dir`` writes each rewritten region's FX code
before and after the rewrite, for review. The graph runs eagerly afterwards (no Inductor), so this
is quick even on a CPU.
"""

from __future__ import annotations

import pathlib
import re

import torch

from dora_fx.backend import DoraBackend
from dora_fx.report import Report


def audit(model: torch.nn.Module, *args, dump_dir: str | pathlib.Path | None = None, **kwargs) -> Report:
    """Trace ``model(*args, **kwargs)`` under the dora backend and return what it rewrote."""
    backend = DoraBackend(inner="eager")
    torch._dynamo.reset()
    try:
        torch.compile(model, backend=backend)(*args, **kwargs)
    finally:
        torch._dynamo.reset()
    if dump_dir is not None:
        write_region_code(backend.report, pathlib.Path(dump_dir))
    return backend.report


def write_region_code(report: Report, directory: pathlib.Path) -> list[pathlib.Path]:
    """Write ``<n>_<module>.before.py`` and ``.after.py`` per rewrite; returns the paths written."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, rewrite in enumerate(report.rewrites):
        stem = f"{index:03d}_{re.sub(r'[^A-Za-z0-9_.-]', '_', rewrite.module)}"
        for suffix, code in (("before", rewrite.code_before), ("after", rewrite.code_after)):
            path = directory / f"{stem}.{suffix}.py"
            path.write_text(f"# {rewrite.module}: {rewrite.variant}\n{code}\n")
            paths.append(path)
    return paths
