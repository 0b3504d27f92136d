"""Instrumentation and pipelines around the model: taps, capture, the feature store, data, the CLI."""
from workbench.store import FeatureStore, StoreError, StoreMismatchError, StoreWriter, merge_index
from workbench.taps import TapError, ablate, capture, patch, resolve, tap_shapes, tap_table

__all__ = ["FeatureStore", "StoreError", "StoreMismatchError", "StoreWriter", "TapError", "ablate", "capture",
           "merge_index", "patch", "resolve", "tap_shapes", "tap_table"]
