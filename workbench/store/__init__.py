"""The on-disk feature store: safetensors shards plus an append-only index.

Capturing features from a large model over a large data set takes hours, may be killed at any moment,
and may run on several ranks at once. The store is built so that none of this loses or corrupts work,
and so that features are never silently paired with the wrong model or data:

    manifest.json                      what is inside and what it came from (`manifest`, `provenance`)
    shards/rank{r}-{k:06d}.safetensors one tensor per tap, one row per item, written atomically (`writer`)
    index/rank{r}.jsonl                one JSON line per item, appended after its shard (`index`, `table`)

Modules by role: `manifest` (identity and format), `index` (rows, merge, locks), `table` (the merged
index as columns, for readers), `shards` (opening and verifying shard files), `writer` (`StoreWriter`:
buffers, shard bytes and digests, index appends), `resume` (what a writer tidies when it opens a store),
`reader` (`FeatureStore`), `provenance` (weights and data fingerprints, `FeatureStore.check_against`),
`verify` (whole-store check and repair), `labels` (label columns), `errors`.
"""
from __future__ import annotations

from workbench.store.errors import (StoreDamagedError, StoreError, StoreFormatError, StoreLockedError,
                                    StoreMismatchError, StoreWriteError)
from workbench.store.index import merge_index, read_index_file
from workbench.store.manifest import FORMAT_VERSION, fingerprint, parse_tap
from workbench.store.provenance import dataset_fingerprint, model_fingerprint, source_bytes, weights_fingerprint
from workbench.store.reader import FeatureStore
from workbench.store.verify import verify_store
from workbench.store.writer import StoreWriter

__all__ = [
    "FORMAT_VERSION", "FeatureStore", "StoreWriter", "StoreError", "StoreFormatError", "StoreDamagedError",
    "StoreMismatchError", "StoreLockedError", "StoreWriteError", "merge_index", "read_index_file",
    "fingerprint", "parse_tap", "dataset_fingerprint", "weights_fingerprint", "model_fingerprint", "source_bytes", "verify_store",
]
