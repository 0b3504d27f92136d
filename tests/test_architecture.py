"""The shape of the project: the import-layer contracts hold, the public names are what they say, and the
command line refuses bad arguments before any heavy library loads."""
from __future__ import annotations

import inspect
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def test_import_layers_and_no_cycles():
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    kinds = {c["type"] for c in contracts}
    assert {"layers", "acyclic_siblings"} <= kinds
    top = next(c for c in contracts if c["type"] == "layers" and "containers" not in c)
    layered = " ".join(top["layers"])
    assert all(pkg in layered for pkg in ("model", "workbench", "probes"))
    proc = subprocess.run([str(BIN / "lint-imports")], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def test_package_exports_are_the_functions_not_submodules():
    from workbench import capture, capture_dataset

    assert inspect.isfunction(capture) and inspect.isfunction(capture_dataset)


def test_bad_arguments_are_refused_before_torch_loads():
    """`fvl info --preset nope` names the known presets, and never imports torch to say so."""
    code = ("import sys\nfrom workbench.cli import main\nrc = main(['info', '--preset', 'nope'])\n"
            "assert 'torch' not in sys.modules, 'torch was imported to refuse a preset name'\nsys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert "unknown preset" in proc.stderr and "florence-vl-3b" in proc.stderr
