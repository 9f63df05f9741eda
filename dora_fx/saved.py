"""A PEFT adapter saved with ``save_pretrained``, loaded over its base model from local folders, and
inputs for it: what ``python -m dora_fx audit --model DIR`` audits.

Nothing is downloaded. The base model is the folder ``--base DIR`` names or, without it, the
adapter's ``base_model_name_or_path`` (``adapter_config.json``), which PEFT records when the base
was itself loaded from a folder; either must hold a transformers model saved with
``save_pretrained`` (``config.json`` and its weights).
"""

from __future__ import annotations

import pathlib

import torch
from torch import nn

ADAPTER_CONFIG = "adapter_config.json"


def is_adapter_dir(path: str | pathlib.Path) -> bool:
    """Whether ``path`` is a folder holding a saved PEFT adapter."""
    return (pathlib.Path(path) / ADAPTER_CONFIG).is_file()


def load_adapter(adapter_dir: str | pathlib.Path, base_dir: str | pathlib.Path | None = None, *, trainable: bool = False) -> nn.Module:
    """The PEFT model of the adapter in ``adapter_dir`` over the base model in ``base_dir`` (default:
    the adapter's ``base_model_name_or_path``). ``trainable`` loads the adapter with gradients, as
    for training. Raises ``ValueError`` when either folder is missing or not what it should be."""
    from peft import PeftConfig, PeftModel

    adapter_dir = pathlib.Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise ValueError(f"{str(adapter_dir)!r} is not a folder")
    if not is_adapter_dir(adapter_dir):
        raise ValueError(f"{str(adapter_dir)!r} holds no {ADAPTER_CONFIG}: not a PEFT adapter saved with save_pretrained")
    config = PeftConfig.from_pretrained(str(adapter_dir))
    if base_dir is None:
        base_dir = config.base_model_name_or_path
        if not base_dir or not pathlib.Path(base_dir).is_dir():
            raise ValueError(
                f"the adapter's base model {base_dir!r} ({ADAPTER_CONFIG}'s base_model_name_or_path) is not a "
                "local folder, and the audit downloads nothing: pass --base DIR, a folder with the base model "
                "saved by save_pretrained"
            )
    base = _load_base(pathlib.Path(base_dir))
    return PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=trainable)


def _load_base(path: pathlib.Path) -> nn.Module:
    """The transformers model saved in ``path``, as the class its ``config.json`` names."""
    import transformers

    if not (path / "config.json").is_file():
        raise ValueError(f"{str(path)!r} holds no config.json: not a base model saved with save_pretrained")
    config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    architectures = getattr(config, "architectures", None) or []
    model_class = getattr(transformers, architectures[0], None) if architectures else None
    if model_class is None:
        model_class = transformers.AutoModel
    return model_class.from_pretrained(str(path), local_files_only=True)


def make_inputs(model: nn.Module, generator: torch.Generator, batch: int = 2, tokens: int = 12) -> dict:
    """Random ``input_ids`` of shape ``[batch, tokens]`` within the model's vocabulary."""
    name = getattr(model, "main_input_name", "input_ids")
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab = getattr(text_config, "vocab_size", None)
    if name != "input_ids" or not vocab:
        raise ValueError(
            f"the audit builds token inputs (input_ids) only; this model takes {name!r}: "
            "call dora_fx.audit.audit(model, **inputs) with its inputs instead"
        )
    return {"input_ids": torch.randint(0, vocab, (batch, tokens), generator=generator)}
