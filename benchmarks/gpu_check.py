"""`python benchmarks/gpu_check.py [--preset full|tiny] [--device auto|cpu|cuda]`: the GPU check as a script.

The same as `fvl bench gpu --json` (benchmarks/gpu.py), for a lent GPU machine where the package may not be
installed: run it from the repository root; it prints exactly one JSON object on stdout.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for `model` and `benchmarks`
    from benchmarks import gpu

    parser = argparse.ArgumentParser(prog="gpu_check.py", description=gpu.__doc__)
    parser.add_argument("--json", action="store_true", help="accepted for symmetry with fvl bench; output is JSON")
    gpu.add_arguments(parser)
    print(json.dumps(gpu.run(parser.parse_args())))
