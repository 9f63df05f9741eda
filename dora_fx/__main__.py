"""Command line: ``python -m dora_fx audit`` and ``python -m dora_fx demo``.

``audit --model NAME`` audits a built-in example model; ``audit --model DIR`` a PEFT adapter saved
with ``save_pretrained``, over its base model from a local folder (``--base DIR``, or the adapter's
``base_model_name_or_path``), on random token inputs.
"""

from __future__ import annotations

import argparse
import logging
import pathlib

import torch

from dora_fx import saved
from dora_fx.audit import audit
from dora_fx.examples import EXAMPLES

_EXAMPLE_DEFAULTS = {"rank": 8, "layers": 2, "dropout": 0.0}


def _model_and_inputs(args: argparse.Namespace, parser: argparse.ArgumentParser) -> tuple[torch.nn.Module, dict]:
    generator = torch.Generator().manual_seed(0)
    if args.model in EXAMPLES:
        from dora_fx.examples import models

        if args.base is not None:
            parser.error("--base applies to a saved adapter (--model DIR), not to a built-in example")
        settings = {k: default if getattr(args, k) is None else getattr(args, k) for k, default in _EXAMPLE_DEFAULTS.items()}
        example = models.build(args.model, **settings)
        return example.model, example.make_inputs(generator)
    if not pathlib.Path(args.model).exists():
        parser.error(
            f"--model {args.model!r} is neither a built-in example ({', '.join(EXAMPLES)}) nor a folder "
            "holding a PEFT adapter saved with save_pretrained"
        )
    given = [f"--{k}" for k in _EXAMPLE_DEFAULTS if getattr(args, k) is not None]
    if given:
        parser.error(f"{', '.join(given)} apply to the built-in examples; a saved adapter has its own settings")
    try:
        model = saved.load_adapter(args.model, args.base, trainable=args.train)
        return model, saved.make_inputs(model, generator)
    except ValueError as error:
        parser.error(str(error))


def _audit_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    model, inputs = _model_and_inputs(args, parser)
    model.train(args.train)
    report = audit(model, dump_dir=args.dump, **inputs)
    print(report.to_json(indent=2) if args.json else report.to_text())
    if args.dump:
        print(f"\nFX code before and after each rewrite written to {args.dump}/")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dora_fx", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    audit_parser = commands.add_parser("audit", help="show what the dora backend rewrites in a model")
    audit_parser.add_argument(
        "--model", default="llama", metavar="NAME|DIR",
        help=f"a built-in example ({', '.join(EXAMPLES)}; default llama) or a folder holding a PEFT "
        "adapter saved with save_pretrained",
    )
    audit_parser.add_argument(
        "--base", metavar="DIR", help="the saved adapter's base model folder (default: its base_model_name_or_path)"
    )
    audit_parser.add_argument("--rank", type=int, help="built-in examples: LoRA rank (default 8)")
    audit_parser.add_argument("--layers", type=int, help="built-in examples: decoder layers (default 2)")
    audit_parser.add_argument("--dropout", type=float, help="built-in examples: LoRA dropout (default 0)")
    audit_parser.add_argument("--train", action="store_true", help="trace in train() mode (with --dropout: the dropout variant)")
    audit_parser.add_argument("--dump", metavar="DIR", help="write each region's FX code before/after to DIR")
    audit_parser.add_argument("--json", action="store_true", help="print the report as JSON")
    # The demo's own parser reads the demo's arguments (``demo --help`` lists them), so the audit
    # command imports neither the demo nor, for a saved adapter, the example models.
    commands.add_parser("demo", help="compile a PEFT DoRA model and compare with eager PEFT", add_help=False)
    args, rest = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.command == "demo":
        from dora_fx.examples import demo

        demo.main(rest, prog="python -m dora_fx demo")
        return
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    _audit_command(args, audit_parser)

if __name__ == "__main__":
    main()
