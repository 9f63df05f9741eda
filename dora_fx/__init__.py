"""dora_fx: a torch.compile backend that rewrites PEFT DoRA layers into a factored norm and one fused
composition.

    model = torch.compile(peft_model, backend=dora_fx.dora_backend)   # or backend="dora"
    print(dora_fx.last_report())

Logging goes to the ``dora_fx`` logger, which has a ``NullHandler`` as libraries' loggers do: nothing
is shown unless the application configures logging (``logging.getLogger("dora_fx").setLevel(logging.INFO)``
with a handler, or ``logging.basicConfig(level=logging.INFO)``: one line per compiled graph).
"""

import logging

from dora_fx import backend as _backend
from dora_fx.backend import DoraBackend, last_report, reset_report
from dora_fx.report import GraphReport, NearMiss, Report, Rewrite

__all__ = [
    "DoraBackend",
    "GraphReport",
    "NearMiss",
    "Report",
    "Rewrite",
    "dora_backend",
    "last_report",
    "reset_report",
]
__version__ = "0.1.0"

# A library adds no handler of its own beyond this one: records go nowhere until the application
# configures logging (``logging.basicConfig()``), and Python's last-resort handler stays quiet.
logging.getLogger(__name__).addHandler(logging.NullHandler())


def __getattr__(name: str):
    """``dora_fx.dora_backend``: looked up in :mod:`dora_fx.backend`, whose first lookup registers the
    PEFT stand-ins (not ``import dora_fx``)."""
    if name == "dora_backend":
        return _backend.dora_backend
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
