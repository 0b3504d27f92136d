"""The index: one JSON line per item in ``index/rank{r}.jsonl``, merged across ranks.

A row is ``{"id", "status": "ok"|"failed", "shard", "row", "error", "labels"}``; format 2 adds
``"sha256"`` and ``"bytes"`` (the digest and size of the row's shard, recorded when the shard was
written, so readers can verify it) and ``"source_bytes"`` (the size of the item's image file, so a
store can say which items of a data set changed). Rows are appended after their shard is in place,
so an index row never points at data that was not written. A torn last line (a crash mid-append) is
ignored by readers and cut by the next writer.
"""
from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from workbench.data.files import atomic_write_bytes
from workbench.store.manifest import INDEX

SHARD_RE = re.compile(r"^rank(\d+)-(\d+)\.safetensors$")
_INDEX_RE = re.compile(r"^rank(\d+)\.jsonl$")


def row_json(row: Mapping[str, Any]) -> str:
    return json.dumps(row, sort_keys=True, separators=(",", ":"))


def json_labels(item_id: str, labels: Mapping[str, Any] | None) -> dict[str, Any]:
    """Labels must survive JSON; numpy scalars and arrays are converted, anything else refused."""
    if labels is None:
        return {}
    if not isinstance(labels, Mapping):
        raise TypeError(f"labels of item {item_id!r} must be a dict, got {type(labels).__name__}")

    def convert(value: Any) -> Any:
        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, np.ndarray):
            return value.tolist()
        if hasattr(value, "tolist") and type(value).__module__.startswith("torch"):
            return value.tolist()
        raise TypeError(f"label value {value!r} of item {item_id!r} is not JSON-serialisable")

    return json.loads(json.dumps({str(k): v for k, v in labels.items()}, default=convert))


def _valid_row(row: Any) -> bool:
    ok = isinstance(row, dict) and isinstance(row.get("id"), str) and row.get("status") in ("ok", "failed")
    if ok and row["status"] == "ok":
        ok = isinstance(row.get("shard"), str) and isinstance(row.get("row"), int)
    return ok


def iter_index_file(path: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """Rows of one rank's index file, in write order, read line by line (memory stays flat).

    A last line without a newline is a torn write (the process died mid-append) and is ignored; a
    complete line that does not parse is skipped with a warning."""
    try:
        fh = open(path, "rb")
    except FileNotFoundError:
        return
    with fh:
        for lineno, line in enumerate(fh, 1):
            if not line.endswith(b"\n"):
                return  # a torn last line
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                ok = _valid_row(row)
            except (json.JSONDecodeError, UnicodeDecodeError):
                ok = False
            if not ok:
                warnings.warn(f"{path}:{lineno}: skipping a malformed index line", RuntimeWarning, stacklevel=2)
                continue
            row.setdefault("error", None)
            row.setdefault("labels", {})
            yield row


def read_index_file(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """All rows of one rank's index file, in write order (see `iter_index_file`)."""
    return list(iter_index_file(path))


def shard_key(shard: str) -> tuple:
    """Sort key of a shard name: shard number first, then rank (later shards win in `merge_index`)."""
    m = SHARD_RE.match(shard)
    return (int(m.group(2)), int(m.group(1)), shard) if m else (math.inf, math.inf, shard)


def merge_index(rows_by_rank: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Merge per-rank index rows into one row per item id, sorted by id.

    Deterministic and independent of the order of the rank lists: an ``ok`` row always beats a
    ``failed`` one; among ``ok`` rows the one in the latest shard (higher shard number, then higher
    rank, then higher row) wins; among ``failed`` rows the last one in its rank's list wins within a
    rank, and ties across ranks are broken by content."""
    best: dict[str, tuple[tuple, dict[str, Any]]] = {}
    for rank_rows in rows_by_rank:
        last_failed: dict[str, dict[str, Any]] = {}
        for row in rank_rows:
            if row.get("status") == "ok":
                key = (1, shard_key(row["shard"]), row["row"], row_json(row))
                cur = best.get(row["id"])
                if cur is None or key > cur[0]:
                    best[row["id"]] = (key, row)
            else:
                last_failed[row["id"]] = row
        for item_id, row in last_failed.items():
            key = (0, (), 0, row_json(row))
            cur = best.get(item_id)
            if cur is None or key > cur[0]:
                best[item_id] = (key, row)
    return [best[i][1] for i in sorted(best)]


def index_files(path: Path) -> dict[int, Path]:
    """rank -> its index file."""
    files = {}
    idir = path / INDEX
    if idir.is_dir():
        for p in idir.iterdir():
            if m := _INDEX_RE.match(p.name):
                files[int(m.group(1))] = p
    return dict(sorted(files.items()))


def read_all_ranks(path: Path) -> list[list[dict[str, Any]]]:
    return [read_index_file(p) for p in index_files(path).values()]


def rewrite_index_file(path: Path, rows: list[dict[str, Any]]) -> None:
    """Replace one rank's index atomically (used by repair, under that rank's lock)."""
    atomic_write_bytes(path, "".join(row_json(r) + "\n" for r in rows).encode("utf-8"))


class RankLock:
    """An advisory lock per rank, so two writers (or a writer and a repair) never touch one index file."""

    def __init__(self, lock_path: Path):
        self.fd: int | None = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: no advisory locks
            return
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self.fd)
            self.fd = None
            raise

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock
            self.fd = None
