"""The merged index held as columns, so that opening a store of 100k items costs a few bytes per item.

`merge_index` (rows as dicts) states the merge rules and serves writers; readers use `ItemTable`, which
applies the same rules to numpy columns: item ids as one fixed-width byte array (sorted, looked up by
binary search), shard and row numbers as int32, labels as one JSON blob with offsets, parsed only for
the rows asked for. Failed items are rare and kept as dicts.
"""
from __future__ import annotations

import json
import math
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from workbench.store.index import index_files, iter_index_file, row_json, shard_key


@dataclass
class ItemTable:
    ids: np.ndarray                 # (n,) bytes, sorted: the ids stored ok
    shard: np.ndarray               # (n,) int32 index into shard_names
    row: np.ndarray                 # (n,) int32 row inside the shard
    source_bytes: np.ndarray        # (n,) int64 image file size at capture, -1 when not recorded
    label_off: np.ndarray           # (n + 1,) int64 offsets into label_blob
    label_blob: bytes | bytearray
    shard_names: list[str]
    shard_info: dict[str, tuple[str | None, int | None]]  # shard -> (sha256, bytes) as written
    failed: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)

    def positions(self, items: list[str]) -> tuple[np.ndarray, list[str]]:
        """Positions of ``items`` in the table, and the ids that are not stored ok."""
        keys = np.array([i.encode("utf-8") for i in items], dtype=self.ids.dtype if len(self.ids) else "S1")
        pos = np.searchsorted(self.ids, keys)
        pos_c = np.minimum(pos, max(len(self.ids) - 1, 0))
        found = (pos < len(self.ids)) & (self.ids[pos_c] == keys) if len(self.ids) else np.zeros(len(items), bool)
        # a key longer than the column width is truncated by numpy: compare the lengths too
        found &= np.array([len(i.encode("utf-8")) <= self.ids.dtype.itemsize for i in items], bool) if items else found
        missing = [items[i] for i in np.flatnonzero(~found)]
        return pos_c.astype(np.int64), missing

    def labels_at(self, pos: int) -> dict[str, Any]:
        return json.loads(self.label_blob[self.label_off[pos]:self.label_off[pos + 1]])

    def id_at(self, pos: int) -> str:
        return self.ids[pos].decode("utf-8")


class _Columns:
    """Append-only columns of ok rows while the index files are streamed."""

    def __init__(self) -> None:
        self.id_blob, self.id_off = bytearray(), array("q", [0])
        self.shard, self.row, self.src = array("i"), array("i"), array("q")
        self.label_blob, self.label_off = bytearray(), array("q", [0])
        self.shard_names: list[str] = []
        self.shard_index: dict[str, int] = {}
        self.shard_info: dict[str, tuple[str | None, int | None]] = {}

    def add(self, r: dict[str, Any]) -> None:
        name = r["shard"]
        k = self.shard_index.get(name)
        if k is None:
            k = self.shard_index[name] = len(self.shard_names)
            self.shard_names.append(name)
        if r.get("sha256") and name not in self.shard_info:
            self.shard_info[name] = (r["sha256"], r.get("bytes"))
        self.id_blob += r["id"].encode("utf-8")
        self.id_off.append(len(self.id_blob))
        self.shard.append(k)
        self.row.append(r["row"])
        self.src.append(int(r.get("source_bytes", -1)))
        self.label_blob += json.dumps(r.get("labels") or {}, separators=(",", ":")).encode("utf-8")
        self.label_off.append(len(self.label_blob))

    def ids(self) -> np.ndarray:
        off = np.frombuffer(self.id_off, dtype=np.int64)
        width = max(1, int(np.diff(off).max(initial=1)))
        out = np.zeros(len(off) - 1, dtype=f"S{width}")
        view = memoryview(self.id_blob)
        for c in range(0, len(out), 4096):
            bounds = off[c:c + 4097].tolist()
            for i in range(len(bounds) - 1):
                out[c + i] = bytes(view[bounds[i]:bounds[i + 1]])
        return out


def load_table(path: Path) -> ItemTable:
    """Stream every rank's index into columns and merge them with `merge_index`'s rules."""
    cols = _Columns()
    failed_by_rank: list[dict[str, dict[str, Any]]] = []
    for file in index_files(path).values():
        last_failed: dict[str, dict[str, Any]] = {}
        for r in iter_index_file(file):
            if r["status"] == "ok":
                cols.add(r)
            else:
                last_failed[r["id"]] = r
        failed_by_rank.append(last_failed)
    ids = cols.ids()
    del cols.id_blob, cols.id_off  # the fixed-width column replaces them
    shard = np.frombuffer(cols.shard, dtype=np.int32)
    row = np.frombuffer(cols.row, dtype=np.int32)
    src = np.frombuffer(cols.src, dtype=np.int64)
    label_off = np.frombuffer(cols.label_off, dtype=np.int64)
    if len(ids) < 2 or bool(np.all(ids[1:] > ids[:-1])):
        # The common case (one writer, items in id order, nothing captured twice): already merged.
        table = ItemTable(ids, shard, row, src, label_off, cols.label_blob, cols.shard_names, cols.shard_info)
    else:
        win = _winners(ids, shard, row, cols.shard_names)
        table = ItemTable(ids[win], shard[win], row[win], src[win], *_take_labels(cols, label_off, win),
                          cols.shard_names, cols.shard_info)
    table.failed = _merge_failed(failed_by_rank, table)
    return table


def _winners(ids: np.ndarray, shard: np.ndarray, row: np.ndarray, shard_names: list[str]) -> np.ndarray:
    """Position of the winning ok row of every id: the latest shard (number, then rank), then row."""
    big = np.iinfo(np.int32).max  # a name that is not rank{r}-{k} sorts last, as in `shard_key`
    keys = [shard_key(n) for n in shard_names]
    num = np.array([k[0] if k[0] != math.inf else big for k in keys], dtype=np.int32)[shard]
    rank = np.array([k[1] if k[1] != math.inf else big for k in keys], dtype=np.int32)[shard]
    order = np.lexsort((row, rank, num, ids))  # by id, then the merge's preference, best last
    last = np.ones(len(order), dtype=bool)
    last[:-1] = ids[order][1:] != ids[order][:-1]
    return order[last]


def _take_labels(cols: _Columns, label_off: np.ndarray, win: np.ndarray) -> tuple[np.ndarray, bytes]:
    lengths = label_off[win + 1] - label_off[win]
    blob = bytearray()
    view = memoryview(cols.label_blob)
    for c in range(0, len(win), 4096):  # in chunks: a list of 100k offsets would outweigh the blob
        part = win[c:c + 4096]
        for a, b in zip(label_off[part].tolist(), label_off[part + 1].tolist()):
            blob += view[a:b]
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64), bytes(blob)


def _merge_failed(failed_by_rank: list[dict[str, dict[str, Any]]], table: ItemTable) -> dict:
    """Failed rows of ids with no ok row; across ranks the tie is broken by content, as in `merge_index`."""
    best: dict[str, dict[str, Any]] = {}
    for rows in failed_by_rank:
        for item_id, r in rows.items():
            cur = best.get(item_id)
            if cur is None or row_json(r) > row_json(cur):
                best[item_id] = r
    if not best:
        return {}
    _, missing = table.positions(sorted(best))
    return {i: best[i] for i in missing}
