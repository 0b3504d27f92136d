"""The `fvl` command line.

Each subcommand lives in its own small module under `workbench/commands/` exposing `register(subparsers)`
and a run function; a command parses its arguments, calls one library function, and prints. Heavy
libraries load inside the run functions, so `fvl --help` and refusals of bad arguments are instant.

Errors: a `UserError`, an error type the project raises on purpose (any exception class defined in
`model`, `workbench` or `probes`) and an `OSError` (read-only or full disk, missing file, permission)
are printed as one line with exit status 2; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from workbench.commands._common import UserError
from workbench.data.files import describe_os_error

# Order is the order shown in `fvl --help`.
COMMAND_MODULES = [
    "info", "data", "train", "eval", "generate", "taps", "capture", "store", "probe", "align",
    "attribute", "similarity", "heatmap", "contributions", "compare", "convert", "bench", "demo", "app",
]
PROJECT_PACKAGES = ("model", "workbench", "probes", "benchmarks")


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


def _is_project_error(exc: BaseException) -> bool:
    """An exception class defined by the project is raised on purpose, with a message meant for users."""
    return type(exc).__module__.split(".")[0] in PROJECT_PACKAGES


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
    except OSError as exc:
        print(f"fvl {args.command}: error: {describe_os_error(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = ("; finished work is kept, rerun the same command to resume" if getattr(args, "resumable", False)
                else "")
        print(f"fvl {args.command}: interrupted{hint}", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - only the project's own error types are turned into messages
        if not _is_project_error(exc):
            raise
        print(f"fvl {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
