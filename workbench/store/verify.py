"""Verifying a whole store, and repairing it so that the same capture re-captures what was lost.

`check_store` verifies every shard that holds current items: the file exists, has the size and sha256
recorded when it was written, opens, holds every tap with the manifest's shape, and lists the item ids
the index expects. `verify_store(..., repair=True)` moves each damaged shard into ``damaged/`` and drops
its rows from the index (atomically, under every rank's lock), so readers see a consistent store
without those items and rerunning the same ``fvl capture`` command captures exactly them again.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workbench.store.errors import StoreLockedError
from workbench.store.index import RankLock, index_files, read_index_file, rewrite_index_file
from workbench.store.manifest import DAMAGED, INDEX, SHARDS
from workbench.store.shards import open_shard, shard_problem


@dataclass
class ShardProblem:
    shard: str
    problem: str
    items: int


def _shape_problems(store: Any, shard: str, path: Path, rows: dict[int, str]) -> list[str]:
    problems = []
    with open_shard(path) as fh:
        ids = json.loads((fh.metadata() or {}).get("ids", "null") or "null")
        for tap, spec in store._taps.items():
            if tap not in fh.keys():
                problems.append(f"tap {tap!r} missing")
                continue
            shape = fh.get_slice(tap).get_shape()
            if list(shape[1:]) != spec["shape"] or max(rows) >= shape[0]:
                problems.append(f"tap {tap!r} has shape {shape}, expected (>{max(rows)}, {spec['shape']})")
        if ids is not None:
            wrong = [i for r, i in rows.items() if r >= len(ids) or ids[r] != i]
            if wrong:
                problems.append(f"{len(wrong)} rows do not hold the items the index expects (e.g. {wrong[0]!r})")
    return problems


def check_store(store: Any) -> list[ShardProblem]:
    """Every problem of every shard holding current items of ``store`` (a `FeatureStore`)."""
    table = store._table
    by_shard: dict[int, dict[int, str]] = {}
    for pos in range(len(table)):
        by_shard.setdefault(int(table.shard[pos]), {})[int(table.row[pos])] = table.id_at(pos)
    found = []
    for k, rows in sorted(by_shard.items()):
        shard = table.shard_names[k]
        path = store.path / SHARDS / shard
        sha, size = table.shard_info.get(shard, (None, None))
        problem = shard_problem(path, sha, size, full=True)
        if problem is None:
            try:
                problem = "; ".join(_shape_problems(store, shard, path, rows)) or None
            except Exception as exc:  # safetensors raises its own error types
                problem = f"unreadable ({exc})"
        if problem:
            found.append(ShardProblem(shard, problem, len(rows)))
    return found


def verify_store(store: Any, *, repair: bool = False) -> dict[str, Any]:
    """Check every shard of ``store`` (a `FeatureStore`); with ``repair`` set damaged shards aside (see the
    module doc). Returns ``{"store", "items", "failed", "shards", "damaged": [{"shard", "problem",
    "items"}], "repaired"}``."""
    problems = check_store(store)
    report = {"store": str(store.path), "items": len(store), "failed": len(store.failed),
              "shards": len(set(store._table.shard.tolist())),
              "damaged": [p.__dict__ for p in problems], "repaired": False}
    if repair and problems:
        _repair(store.path, {p.shard for p in problems})
        report["repaired"] = True
    return report


def _repair(root: Path, damaged: set[str]) -> None:
    files = index_files(root)
    locks = []
    try:
        for rank in files:
            try:
                locks.append(RankLock(root / INDEX / f"rank{rank}.lock"))
            except BlockingIOError:  # held by a writer; other errors (a read-only store) say what they are
                raise StoreLockedError(f"a capture is still writing rank {rank} of {root}; wait for it to finish "
                                       "(or stop it), then repair") from None
        (root / DAMAGED).mkdir(exist_ok=True)
        for shard in sorted(damaged):
            src = root / SHARDS / shard
            if src.exists():
                os.replace(src, root / DAMAGED / shard)
        for rank, file in files.items():
            rows = read_index_file(file)
            kept = [r for r in rows if not (r["status"] == "ok" and r["shard"] in damaged)]
            if len(kept) != len(rows):
                rewrite_index_file(file, kept)
    finally:
        for lock in locks:
            lock.release()
