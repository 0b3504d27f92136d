"""The `fvl` command line.

Each subcommand lives in its own small module under `workbench/commands/` exposing
`register(subparsers)`; heavy imports (torch, transformers) happen inside the command's
run function so that `fvl --help` stays instant.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# Order is the order shown in `fvl --help`.
COMMAND_MODULES = [
    "info", "data", "train", "eval", "generate", "taps", "capture", "probe", "align",
    "attribute", "similarity", "heatmap", "contributions", "compare", "convert", "bench", "demo", "app",
]


class UserError(Exception):
    """An error caused by the user's input; printed without a traceback, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fvl", description="Florence-VL workbench: build, train, capture and analyse visual features."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"workbench.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"workbench.commands.{name}":
                continue  # command not present in this build
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        result = args.func(args)
    except UserError as exc:
        print(f"fvl {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and the like
        return 0
    except KeyboardInterrupt:
        print(f"fvl {args.command}: interrupted; finished work is kept, rerun the same command to resume", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
