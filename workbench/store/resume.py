"""Housekeeping when a writer opens a store: refuse what is not a store, find shards that went missing
or were truncated, cut a torn index line, remove orphan shards and half-written temp files, and tidy
ranks of a larger world that is gone.

Kept apart from `workbench.store.writer` because none of it is on the path of a feature to disk: it
runs once, before the first item, and only undoes what a crash left behind."""
from __future__ import annotations

import os
import re
from pathlib import Path

from typing import Any

from workbench.store.errors import StoreFormatError
from workbench.store.index import SHARD_RE, RankLock, index_files, read_index_file
from workbench.store.manifest import INDEX, MANIFEST, SHARDS, read_manifest
from workbench.store.shards import shard_problem


def prepare_dirs(path: Path) -> None:
    """Refuse a path that is a file, a data set or another tool's directory (before creating anything),
    then make ``shards/`` and ``index/``."""
    if path.exists() and not path.is_dir():
        raise StoreFormatError(f"{path} is a file, not a feature store directory; choose another --out")
    if (path / MANIFEST).exists():
        read_manifest(path)  # refuses a data set's (or a newer store's) manifest
    elif path.is_dir():
        foreign = [p.name for p in path.iterdir() if p.name not in (SHARDS, INDEX) and not p.name.startswith(".")]
        if foreign:
            raise StoreFormatError(
                f"{path} exists and is not a feature store (it holds {', '.join(sorted(foreign)[:3])}"
                f"{', ...' if len(foreign) > 3 else ''}); choose a new --out or an empty directory"
            )
    for sub in (SHARDS, INDEX):
        (path / sub).mkdir(parents=True, exist_ok=True)


def damaged_shards(root: Path, snapshot: list[dict[str, Any]]) -> dict[str, str]:
    """Shards holding current items that are missing or have another size than written (a stat each:
    cheap enough for every resume; `fvl store verify` also checks digests)."""
    damaged: dict[str, str] = {}
    seen: set[str] = set()
    for row in snapshot:
        if row["status"] == "ok" and row["shard"] not in seen:
            seen.add(row["shard"])
            problem = shard_problem(root / SHARDS / row["shard"], None, row.get("bytes"), full=False)
            if problem:
                damaged[row["shard"]] = problem
    return damaged


def highest_shard(snapshot: list[dict[str, Any]]) -> int:
    """The highest shard number of any rank among current rows (-1 when none)."""
    numbers = [int(m.group(2)) for r in snapshot if r["status"] == "ok" and (m := SHARD_RE.match(r["shard"]))]
    return max(numbers, default=-1)


def repair_index_tail(index_path: Path) -> None:
    """Cut a torn last line so that the next append does not glue onto garbage."""
    try:
        size = index_path.stat().st_size
    except FileNotFoundError:
        return
    if size == 0:
        return
    with open(index_path, "r+b") as fh:
        fh.seek(max(0, size - 1))
        if fh.read(1) == b"\n":
            return
        pos, keep = size, 0  # scan back in blocks for the last newline
        while pos > 0:
            start = max(0, pos - 65536)
            fh.seek(start)
            block = fh.read(pos - start)
            nl = block.rfind(b"\n")
            if nl >= 0:
                keep = start + nl + 1
                break
            pos = start
        fh.truncate(keep)
        fh.flush()
        os.fsync(fh.fileno())


def clean_rank(root: Path, rank: int) -> int:
    """Remove a rank's orphan shards and temp files; return its highest indexed shard number."""
    rows = read_index_file(root / INDEX / f"rank{rank}.jsonl")
    referenced = {r["shard"] for r in rows if r["status"] == "ok"}
    highest = -1
    for name in referenced:
        m = SHARD_RE.match(name)
        if m and int(m.group(1)) == rank:
            highest = max(highest, int(m.group(2)))
    for p in (root / SHARDS).iterdir():
        m = SHARD_RE.match(p.name)
        if m and int(m.group(1)) == rank and p.name not in referenced:
            p.unlink(missing_ok=True)  # orphan: renamed in, but the crash came before its index rows
        elif p.name.startswith(f".rank{rank}-") and p.name.endswith(".tmp"):
            p.unlink(missing_ok=True)  # half-written shard
    return highest


def clean_departed_ranks(root: Path, world_size: int) -> None:
    """Rank 0 tidies orphans of ranks beyond the current world size (a run resumed smaller)."""
    ranks = set(index_files(root))
    for p in (root / SHARDS).iterdir():
        if (m := SHARD_RE.match(p.name)) or (m := re.match(r"^\.rank(\d+)-", p.name)):
            ranks.add(int(m.group(1)))
    for r in sorted(x for x in ranks if x >= world_size):
        try:
            lock = RankLock(root / INDEX / f"rank{r}.lock")
        except BlockingIOError:
            continue  # a writer of an older, larger world is still alive; leave it alone
        try:
            clean_rank(root, r)
        finally:
            lock.release()
