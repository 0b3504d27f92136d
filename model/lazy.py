"""Lazy package exports (PEP 562), shared by the packages' `__init__` files.

A package lists `name -> module` and gets a module-level `__getattr__` that imports the module on first
use, so `import model` (or `workbench`, `probes`) is instant and torch, transformers or matplotlib load
only when a name that needs them is used.
"""
from __future__ import annotations

import importlib
import sys
from typing import Any, Callable


def lazy_exports(package: str, exports: dict[str, str],
                 submodules: tuple[str, ...] = ()) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """(`__getattr__`, `__dir__`) for ``package``: ``exports`` maps a public name to the module defining it;
    ``submodules`` are names of the package's own modules that `package.NAME` may return."""

    def __getattr__(name: str) -> Any:
        if name in exports:
            value = getattr(importlib.import_module(exports[name]), name)
            setattr(sys.modules[package], name, value)  # later lookups skip this function
            return value
        if name in submodules:
            return importlib.import_module(f"{package}.{name}")
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(exports) | set(submodules))

    return __getattr__, __dir__
