"""`fvl bench NAME --json`: run one benchmark from `benchmarks/` and print its result.

A benchmark module `benchmarks/<name with underscores>.py` exposes
`add_arguments(parser)` and `run(args) -> dict`; every benchmark compares two things
in one run and reports their ratio.
"""
from __future__ import annotations

import argparse
import importlib
import json
import pkgutil


def available() -> list[str]:
    import benchmarks

    return sorted(m.name.replace("_", "-") for m in pkgutil.iter_modules(benchmarks.__path__) if not m.name.startswith("_"))


def register(sub) -> None:
    p = sub.add_parser("bench", help="run a benchmark: fvl bench NAME [--json] [options]; fvl bench --list")
    p.add_argument("name", nargs="?", help="benchmark name (see --list)")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="options of the benchmark (fvl bench NAME --help)")
    p.add_argument("--list", action="store_true", help="list the benchmarks")
    p.set_defaults(func=run)


def run(args) -> int:
    from workbench.commands._common import UserError

    names = available()
    if args.list or not args.name:
        print("benchmarks: " + ", ".join(names))
        return 0
    if args.name not in names:
        raise UserError(f"unknown benchmark {args.name!r}; choose one of: {', '.join(names)}")
    module = importlib.import_module("benchmarks." + args.name.replace("-", "_"))
    parser = argparse.ArgumentParser(prog=f"fvl bench {args.name}", description=module.__doc__)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    module.add_arguments(parser)
    bench_args = parser.parse_args(args.rest)
    result = module.run(bench_args)
    if bench_args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>24}: {value}")
    return 0
