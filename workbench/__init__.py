"""Instrumentation and pipelines around the model: taps, capture, the feature store, data, the CLI.

Public names are imported lazily (PEP 562), so `fvl --help` does not pay for torch. No submodule
shares a name with an export (the capture of a data set lives in `workbench.capturing`), so
`from workbench import capture` is always the context manager.
"""
from __future__ import annotations

from model.lazy import lazy_exports

_EXPORTS = {
    "FeatureStore": "workbench.store", "StoreWriter": "workbench.store", "StoreError": "workbench.store",
    "StoreMismatchError": "workbench.store", "merge_index": "workbench.store",
    "TapError": "workbench.taps", "ablate": "workbench.taps", "capture": "workbench.taps", "patch": "workbench.taps",
    "resolve": "workbench.taps", "tap_shapes": "workbench.taps", "tap_table": "workbench.taps",
    "TapName": "workbench.tap_names",
    "capture_dataset": "workbench.capturing",
}
__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
