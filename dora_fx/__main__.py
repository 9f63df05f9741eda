"""Command line: ``python -m dora_fx audit`` and ``python -m dora_fx demo``."""

from __future__ import annotations

import argparse
import logging

import torch

from dora_fx import demo, models
from dora_fx.audit import audit


def _audit_command(args: argparse.Namespace) -> None:
    example = models.build(args.model, rank=args.rank, dropout=args.dropout, layers=args.layers)
    example.model.train(args.train)
    report = audit(example.model, dump_dir=args.dump, **example.make_inputs(torch.Generator().manual_seed(0)))
    print(report.to_json(indent=2) if args.json else report.to_text())
    if args.dump:
        print(f"\nFX code before and after each rewrite written to {args.dump}/")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dora_fx", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    audit_parser = commands.add_parser("audit", help="show what the dora backend rewrites in an example model")
    audit_parser.add_argument("--model", choices=models.EXAMPLES, default="llama")
    audit_parser.add_argument("--rank", type=int, default=8)
    audit_parser.add_argument("--layers", type=int, default=2)
    audit_parser.add_argument("--dropout", type=float, default=0.0)
    audit_parser.add_argument("--train", action="store_true", help="trace in train() mode (with --dropout: the dropout variant)")
    audit_parser.add_argument("--dump", metavar="DIR", help="write each region's FX code before/after to DIR")
    audit_parser.add_argument("--json", action="store_true", help="print the report as JSON")
    audit_parser.set_defaults(run=_audit_command)
    demo.add_arguments(commands.add_parser("demo", help="compile a PEFT DoRA model and compare with eager PEFT"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    args.run(args)


if __name__ == "__main__":
    main()
