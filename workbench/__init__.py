"""Instrumentation and pipelines around the model: taps, capture, the feature store, data, the CLI.

Public names are imported lazily so that `fvl --help` does not pay for torch."""
from __future__ import annotations

import importlib

_EXPORTS = {
    "FeatureStore": "workbench.store", "StoreWriter": "workbench.store", "StoreError": "workbench.store",
    "StoreMismatchError": "workbench.store", "merge_index": "workbench.store",
    "TapError": "workbench.taps", "ablate": "workbench.taps", "capture": "workbench.taps", "patch": "workbench.taps",
    "resolve": "workbench.taps", "tap_shapes": "workbench.taps", "tap_table": "workbench.taps",
    "capture_dataset": "workbench.capture",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'workbench' has no attribute {name!r}")
