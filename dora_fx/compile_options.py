"""``torch.compile``'s ``mode`` and ``options``, with Inductor's meaning, as Inductor config patches.

``torch.compile(model, backend="dora", mode=..., options=...)`` hands ``mode`` and ``options`` to the
backend; dora_fx passes them on to Inductor as ``compile_fx(..., config_patches=...)``, the way
``torch.compile``'s own Inductor backend does: a mode stands for the settings
``torch._inductor.list_mode_options(mode)`` lists, and each option names a ``torch._inductor.config``
setting (``torch._inductor.list_options()``), with ``-`` read as ``_``. Unknown modes, unknown
options and values of the wrong type raise a ``ValueError`` here rather than deep inside Inductor.
"""

from __future__ import annotations

import difflib
import typing
from typing import Any


def is_default(mode: str | None, options: dict | None) -> bool:
    """Whether ``mode`` and ``options`` ask for nothing beyond Inductor's defaults."""
    return mode in (None, "default") and not options


def inductor_config_patches(mode: str | None = None, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``torch._inductor.config`` patches that ``mode`` and then ``options`` stand for.

    ``options`` are applied after ``mode``, so an option overrides what the mode sets.
    """
    from torch._inductor import config, list_mode_options

    patches: dict[str, Any] = {}
    if mode is not None:
        modes = list_mode_options()
        if not isinstance(mode, str) or mode not in modes:
            raise ValueError(
                f"unknown torch.compile mode {mode!r} for the dora backend; Inductor's modes are "
                + ", ".join(repr(m) for m in modes)
            )
        patches.update(list_mode_options(mode))
    if options is None:
        return patches
    if not isinstance(options, dict):
        raise ValueError(f"options must be a dict of Inductor settings, got {type(options).__name__}")
    known = config.get_config_copy()
    for key, value in options.items():
        name = key.replace("-", "_") if isinstance(key, str) else key
        if name not in known:
            close = difflib.get_close_matches(str(name), list(known), n=3)
            hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
            raise ValueError(
                f"unknown Inductor option {key!r} for the dora backend{hint}; "
                "torch._inductor.list_options() lists them"
            )
        expected = config.get_type(name)
        if isinstance(expected, type) and typing.get_origin(expected) is None and not isinstance(value, expected):
            raise ValueError(
                f"Inductor option {key!r} takes a {expected.__name__}, got {value!r} ({type(value).__name__})"
            )
        patches[name] = value
    return patches
