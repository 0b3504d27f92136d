"""Reading a feature store: items, labels and tap arrays, out of core.

`FeatureStore` opens the merged index as columns (`workbench.store.table`), so opening a store costs
a few bytes per item; `load` reads one tap (or a channel view such as ``"fusion.input[ocr]"``) for the
items asked for, touching only the shards and the tensor it needs through safetensors' lazy
``get_slice``; `iter_batches` does the same batch by batch, so memory is bounded by one batch whatever
the number of items. Every shard is verified against the digest recorded when it was written the
first time it is read (`StoreDamagedError` names it and says how to repair).
"""
from __future__ import annotations

import functools
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from workbench.store.errors import StoreDamagedError, StoreFormatError
from workbench.store.index import shard_key
from workbench.store.labels import MISSING, label_array
from workbench.store.manifest import SHARDS, parse_tap, read_manifest
from workbench.store.provenance import ProvenanceMixin
from workbench.store.shards import open_shard, shard_problem
from workbench.store.table import load_table
from workbench.store.verify import check_store


class FeatureStore(ProvenanceMixin):
    """Read-only view of a feature store: the merged index, labels, and tap arrays.

    ``items`` are the ids stored ok, sorted; ``failed`` maps ids that could not be captured to their
    error. ``verify=False`` skips the per-shard digest check (a stat is still done)."""

    def __init__(self, path: str | os.PathLike[str], *, verify: bool = True):
        self.path = Path(path)
        if not self.path.is_dir():
            raise StoreFormatError(f"{self.path} is not a feature store directory (it does not exist or is a file)")
        self.manifest: dict[str, Any] = read_manifest(self.path)
        self._taps: dict[str, dict[str, Any]] = self.manifest.get("taps") or {}
        self.taps: list[str] = list(self._taps)
        self.views: dict[str, dict[str, list[int]]] = self.manifest.get("views") or {}
        self._table = load_table(self.path)
        self.failed: dict[str, str] = {i: r.get("error") or "" for i, r in sorted(self._table.failed.items())}
        self._verify = verify
        self._verified: set[str] = set()

    @functools.cached_property
    def items(self) -> list[str]:
        """Ids stored ok, sorted (built on first use; `iter_batches` does not need it)."""
        return [i.decode("utf-8") for i in self._table.ids.tolist()]

    def __len__(self) -> int:
        return len(self._table)

    def __contains__(self, item_id: object) -> bool:
        return isinstance(item_id, str) and not self._table.positions([item_id])[1]

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.path)!r}, items={len(self)}, failed={len(self.failed)}, taps={self.taps})"

    @property
    def view_names(self) -> list[str]:
        """All loadable view names, e.g. ``fusion.input[ocr]``."""
        return [f"{base}[{v}]" for base, vs in self.views.items() for v in vs]

    def index(self) -> list[dict[str, Any]]:
        """The merged index: one row per item (ok or failed), sorted by id."""
        t = self._table
        rows = [{"id": t.id_at(p), "status": "ok", "shard": t.shard_names[t.shard[p]], "row": int(t.row[p]),
                 "error": None, "labels": t.labels_at(p)} for p in range(len(t))]
        rows += [{**r, "labels": dict(r.get("labels") or {})} for r in t.failed.values()]
        return sorted(rows, key=lambda r: r["id"])

    @functools.cached_property
    def _label_names(self) -> list[str]:
        names: set[str] = set()
        for p in range(len(self._table)):
            names.update(self._table.labels_at(p))
        return sorted(names)

    def label_names(self) -> list[str]:
        return list(self._label_names)

    def labels(self, items: list[str] | None = None) -> dict[str, np.ndarray]:
        """Labels as arrays aligned with ``items`` (default: all ok items); missing values are NaN/None."""
        rows = [self._table.labels_at(p) for p in self._positions(items)]
        return {name: label_array([r.get(name, MISSING) for r in rows]) for name in self._label_names}

    def tap_shape(self, tap: str) -> tuple[int, ...]:
        """Per-item shape of a tap or view."""
        base, channels = self._resolve(tap)
        shape = tuple(self._taps[base]["shape"])
        return shape if channels is None else (*shape[:-1], channels[1] - channels[0])

    def load(self, tap: str, items: list[str] | slice | None = None, *, as_: str = "numpy", dtype: Any = None) -> Any:
        """Array ``(len(items), *shape)`` of one tap or view, rows aligned with ``items`` (ids, or a slice
        of the sorted items; default: all ok items)."""
        if as_ not in ("numpy", "torch"):
            raise ValueError(f"as_ must be 'numpy' or 'torch', got {as_!r}")
        out = self._load_positions(tap, self._positions(items), dtype)
        if as_ == "torch":
            import torch

            return torch.from_numpy(out)
        return out

    def iter_batches(self, tap: str, batch_size: int, items: list[str] | None = None, *, order: str = "items",
                     as_: str = "numpy", dtype: Any = None) -> Iterator[tuple[list[str], Any]]:
        """Yield ``(ids, array)`` batches; memory is bounded by one batch.

        ``order="items"`` follows ``items`` (sorted ids, aligned with ``labels()``); ``order="storage"``
        follows shard order, which reads files sequentially."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if order not in ("items", "storage"):
            raise ValueError(f"order must be 'items' or 'storage', got {order!r}")
        self._resolve(tap)
        pos = self._positions(items)
        if order == "storage":
            keys = np.array([shard_key(n)[:2] for n in self._table.shard_names], dtype=np.int64).reshape(-1, 2)
            sk = keys[self._table.shard[pos]] if len(pos) else np.zeros((0, 2), np.int64)
            pos = pos[np.lexsort((self._table.row[pos], sk[:, 1], sk[:, 0]))] if len(pos) else pos
        for start in range(0, len(pos), batch_size):
            chunk = pos[start:start + batch_size]
            arr = self._load_positions(tap, chunk, dtype)
            ids = [self._table.id_at(p) for p in chunk]
            if as_ == "torch":
                import torch

                arr = torch.from_numpy(arr)
            yield ids, arr

    def items_in_shards(self, shards: Iterable[str]) -> set[str]:
        """Ids whose current row lies in one of ``shards``."""
        names = {k for k, n in enumerate(self._table.shard_names) if n in set(shards)}
        return {self._table.id_at(p) for p in np.flatnonzero(np.isin(self._table.shard, list(names)))}

    def check(self) -> list[str]:
        """Problems found by verifying every shard that holds items (missing, truncated or altered files,
        wrong shapes, id mismatches)."""
        return [f"{p.shard}: {p.problem}" for p in check_store(self)]

    # -- internals ----------------------------------------------------------------------

    def _resolve(self, tap: str) -> tuple[str, tuple[int, int] | None]:
        base, view = parse_tap(tap)
        if base not in self._taps:
            raise ValueError(
                f"tap {tap!r} is not in {self.path}; stored taps: {', '.join(self.taps)}"
                + (f"; views: {', '.join(self.view_names)}" if self.views else "")
            )
        if view is None:
            return base, None
        views = self.views.get(base, {})
        if view not in views:
            known = ", ".join(views) or "none"
            raise ValueError(f"tap {base!r} has no view {view!r} in {self.path}; its views: {known}")
        start, stop = views[view]
        return base, (start, stop)

    def _positions(self, items: Iterable[str] | slice | None) -> np.ndarray:
        if items is None:
            return np.arange(len(self._table), dtype=np.int64)
        if isinstance(items, slice):
            return np.arange(len(self._table), dtype=np.int64)[items]
        if isinstance(items, str):
            raise TypeError("items must be a list of ids, not a single string")
        items = list(items)
        pos, missing = self._table.positions(items)
        if missing:
            failed = [i for i in missing if i in self.failed]
            detail = f" ({len(failed)} of them failed at capture: see .failed)" if failed else ""
            raise KeyError(f"{len(missing)} items are not stored in {self.path}: {missing[:5]}{detail}")
        return pos

    def _load_positions(self, tap: str, pos: np.ndarray, dtype: Any) -> np.ndarray:
        base, channels = self._resolve(tap)
        stored = np.dtype(self._taps[base]["dtype"])
        out = np.empty((len(pos), *self.tap_shape(tap)), dtype=_np_dtype(dtype) if dtype is not None else stored)
        shards = self._table.shard[pos]
        for k in sorted(set(shards.tolist()), key=lambda k: shard_key(self._table.shard_names[k])):
            where = np.flatnonzero(shards == k)
            rows = self._table.row[pos[where]]
            order = np.argsort(rows, kind="stable")
            self._read_rows(self._table.shard_names[k], base, channels, rows[order].tolist(),
                            where[order].tolist(), out)
        return out

    def _shard_path(self, shard: str) -> Path:
        """The shard's path, verified on first use."""
        path = self.path / SHARDS / shard
        if shard not in self._verified:
            sha, size = self._table.shard_info.get(shard, (None, None))
            problem = shard_problem(path, sha if self._verify else None, size, full=self._verify)
            if problem:
                n_items = int(np.count_nonzero(self._table.shard == self._table.shard_names.index(shard)))
                raise StoreDamagedError(
                    f"shard {path} is {problem}; it holds {n_items} of this store's items. Run "
                    f"`fvl store verify {self.path} --repair`, then rerun the same `fvl capture` command to "
                    "capture those items again"
                )
            self._verified.add(shard)
        return path

    def _read_rows(self, shard: str, tap: str, channels: tuple[int, int] | None, rows: list[int],
                   positions: list[int], out: np.ndarray) -> None:
        """Fill ``out[positions]`` from ``shard``'s tensor ``tap`` rows, reading contiguous runs only."""
        path = self._shard_path(shard)
        nd = len(self._taps[tap]["shape"])
        tail = (slice(None),) * (nd - 1) + ((slice(*channels),) if channels else (slice(None),) if nd else ())
        try:
            with open_shard(path) as fh:
                _read_runs(fh.get_slice(tap), path, tail, rows, positions, out)
        except StoreFormatError:
            raise
        except Exception as exc:  # safetensors raises its own error types
            raise StoreDamagedError(f"shard {path} is unreadable ({exc}); run `fvl store verify {self.path} "
                                    "--repair`, then rerun the same `fvl capture` command") from exc


def _read_runs(sl: Any, path: Path, tail: tuple, rows: list[int], positions: list[int], out: np.ndarray) -> None:
    """Rows sorted ascending: one read when they are dense, else one read per contiguous run."""
    n_rows = sl.get_shape()[0]
    if rows[-1] >= n_rows:
        raise StoreFormatError(f"{path} has {n_rows} rows but the index refers to row {rows[-1]}")
    lo, hi = rows[0], rows[-1] + 1
    if hi - lo == len(rows) and positions == list(range(positions[0], positions[0] + len(rows))):
        out[positions[0]:positions[0] + len(rows)] = sl[(slice(lo, hi), *tail)]  # the common case
        return
    if hi - lo <= 2 * len(rows):  # dense enough: one read of the span
        block = sl[(slice(lo, hi), *tail)]
        out[positions] = block[[r - lo for r in rows]]
        return
    i = 0
    while i < len(rows):  # sparse: one read per contiguous run
        j = i + 1
        while j < len(rows) and rows[j] == rows[j - 1] + 1:
            j += 1
        out[positions[i:j]] = sl[(slice(rows[i], rows[j - 1] + 1), *tail)]
        i = j


def _np_dtype(dtype: Any) -> np.dtype:
    if "torch" in sys.modules and isinstance(dtype, sys.modules["torch"].dtype):
        dtype = str(dtype).removeprefix("torch.")
    try:
        return np.dtype(dtype)
    except TypeError:
        raise ValueError(f"dtype {dtype!r} is not a numpy dtype name (e.g. 'float32')") from None
