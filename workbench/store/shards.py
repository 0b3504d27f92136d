"""Shard files as readers see them: opening lazily, and verifying the digest recorded at write time.

A shard is one safetensors file per flush, one tensor per tap, one row per item, with the item ids in
its metadata. The writer (`workbench.store.writer.write_shard_file`) hashes the file it wrote before
renaming it into place, so the digest in the index is the digest of what reached the disk.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from safetensors import safe_open


_CHUNK = 1 << 20


def file_digest(path: Path) -> str:
    """sha256 of a file, read in 1 MiB chunks (memory stays flat whatever the shard size)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def shard_problem(path: Path, sha256: str | None, size: int | None, *, full: bool = True) -> str | None:
    """Why the shard at ``path`` cannot be trusted, or None when it checks out.

    ``full=False`` checks only existence and size (a stat: cheap enough at every resume); ``full=True``
    also recomputes the digest. Shards of format-1 stores have no recorded digest: only existence is
    checked."""
    try:
        actual = path.stat().st_size
    except FileNotFoundError:
        return "missing"
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    if size is not None and actual != size:
        return f"truncated or altered ({actual} bytes, {size} written)"
    if full and sha256 is not None:
        try:
            if file_digest(path) != sha256:
                return "altered (its sha256 differs from the one recorded when it was written)"
        except OSError as exc:
            return f"unreadable ({exc.strerror or exc})"
    return None


def open_shard(path: Path) -> Any:
    """Open a shard lazily (header only); a seam so tests can watch which tensors are read."""
    return safe_open(str(path), framework="numpy")
