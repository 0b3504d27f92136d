"""Writing (or resuming) one rank's share of a feature store.

Crash safety: a shard is written to a temporary path from `workbench.data.files.atomic_path`, fsynced,
hashed and renamed into place, so a shard file either is complete or does not exist; its index rows (with the shard's digest and size) are appended and fsynced
only after the rename. A resumed writer cuts a torn index line, removes its rank's orphan shards, and
treats the items of missing or truncated shards as not stored, so the same capture re-captures exactly
them (into later shards, whose rows win the merge).

Memory is bounded by one shard: items are copied into a preallocated buffer already in the storage
dtype (`put_item`), and safetensors writes the file straight from that buffer. The shard's bytes are
made and written here, through `workbench.data.files`, so a feature passes through no other module
of the store on its way to disk.
"""
from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import sys
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from workbench.data.files import atomic_path, fsync_dir
from workbench.store.errors import StoreLockedError, StoreWriteError
from workbench.store.index import RankLock, json_labels, merge_index, read_all_ranks, row_json
from workbench.store.manifest import (FORMAT_VERSION, INDEX, MANIFEST, SHARDS, check_identity, create_manifest,
                                      normalize_manifest, read_manifest)
from workbench.store.resume import (clean_departed_ranks, clean_rank, damaged_shards, highest_shard, prepare_dirs,
                                    repair_index_tail)

# Test seam: called with a point name ("before_rename", "after_rename", "after_index") during flush,
# so crash tests can kill the process exactly there.
_fault_hook: Callable[[str], None] | None = None


def _fault(point: str) -> None:
    if _fault_hook is not None:
        _fault_hook(point)


class StoreWriter:
    """Writes (or resumes) one rank's share of a feature store.

    Typical use in a capture loop::

        with StoreWriter(out, manifest, rank=rank, world_size=world) as w:
            done = w.done_ids()
            for item in my_items:
                if item.id in done: continue
                try: feats = model_features(item)
                except Exception as e: w.add_failure(item.id, repr(e)); continue
                w.add(item.id, feats, labels=item.labels)

    ``manifest`` needs ``model_id`` and ``taps`` ({name: {"shape": per-item shape, "dtype": stored
    dtype (default: the store's ``dtype``)}}); ``model_fingerprint``, ``config_hash``, ``pool``,
    ``dataset_fingerprint``, ``views`` and any extra keys are recorded too. A shard is flushed every
    ``shard_size`` items, or sooner so that it stays under ``max_shard_mb``. ``damaged`` maps the
    shards found missing or truncated at open to why; their items are offered again by `done_ids`.
    """

    def __init__(self, path: str | os.PathLike[str], manifest: Mapping[str, Any], *, rank: int = 0,
                 world_size: int = 1, shard_size: int = 256, retry_failed: bool = False,
                 max_shard_mb: float = 128.0):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.path = Path(path)
        self.rank, self.world_size, self.retry_failed = rank, world_size, retry_failed
        self._closed = True
        self._lock: RankLock | None = None
        self._index_fd: int | None = None

        requested = normalize_manifest(manifest)
        prepare_dirs(self.path)
        self.manifest = self._create_or_check_manifest(requested)
        self.taps: dict[str, dict[str, Any]] = self.manifest["taps"]
        self._dtypes = {t: np.dtype(s["dtype"]) for t, s in self.taps.items()}
        self._shapes = {t: tuple(s["shape"]) for t, s in self.taps.items()}
        item_bytes = sum(math.prod(self._shapes[t]) * self._dtypes[t].itemsize for t in self.taps)
        self.rows_per_shard = max(1, min(shard_size, int(max_shard_mb * 2**20) // max(item_bytes, 1)))
        self._open_rank()
        snapshot = merge_index(read_all_ranks(self.path))
        self.damaged = damaged_shards(self.path, snapshot)
        self._stored_ok = {r["id"] for r in snapshot if r["status"] == "ok" and r["shard"] not in self.damaged}
        # new shards are numbered after every shard of every rank, so re-captured rows win the merge
        self._next_shard = max(self._next_shard, highest_shard(snapshot) + 1)
        self._buffers: dict[str, np.ndarray] | None = None
        self._pending: list[dict[str, Any]] = []
        self._pending_ids: set[str] = set()
        self._n = 0  # ok rows in the buffer
        self._warned_nonfinite: set[str] = set()
        self.items_written = 0
        self._closed = False

    # -- opening ------------------------------------------------------------------------

    def _create_or_check_manifest(self, requested: dict[str, Any]) -> dict[str, Any]:
        if not (self.path / MANIFEST).exists() and create_manifest(self.path, requested):
            return requested
        existing = read_manifest(self.path)
        check_identity(self.path, existing, requested)
        return existing

    def _open_rank(self) -> None:
        try:
            self._lock = RankLock(self.path / INDEX / f"rank{self.rank}.lock")
        except BlockingIOError:  # held by a live writer; other errors (a read-only store) say what they are
            raise StoreLockedError(
                f"another writer is already writing rank {self.rank} of {self.path}; wait for it or stop it"
            ) from None
        try:
            self._index_path = self.path / INDEX / f"rank{self.rank}.jsonl"
            repair_index_tail(self._index_path)
            self._next_shard = clean_rank(self.path, self.rank) + 1
            if self.rank == 0:
                clean_departed_ranks(self.path, self.world_size)
            self._index_fd = os.open(self._index_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            fsync_dir(self._index_path.parent)
        except BaseException:
            self._lock.release()
            raise

    # -- public API ---------------------------------------------------------------------

    def done_ids(self) -> set[str]:
        """Ids already recorded by any rank (ok in an intact shard, plus failed unless ``retry_failed``)
        or added in this run."""
        done = {r["id"] for r in merge_index(read_all_ranks(self.path))
                if (r["status"] == "ok" and r["shard"] not in self.damaged) or (r["status"] == "failed"
                                                                                and not self.retry_failed)}
        return done | self._stored_ok | self._pending_ids

    def add(self, item_id: str, tensors: Mapping[str, Any], labels: Mapping[str, Any] | None = None, *,
            source_bytes: int | None = None) -> None:
        """Buffer one item's features (per-item tensors, no batch dimension); flush when a shard is full.
        ``source_bytes`` (the size of the item's image file) lets the store tell which items changed."""
        self._check_open()
        self._check_id(item_id)
        if self._n >= self.rows_per_shard:  # an earlier flush failed; retry before reusing the buffer
            self.flush()
        if not isinstance(tensors, Mapping):
            raise TypeError(f"tensors of item {item_id!r} must be a dict tap -> tensor")
        missing = [t for t in self.taps if t not in tensors]
        extra = [t for t in tensors if t not in self.taps]
        if missing or extra:
            raise ValueError(
                f"item {item_id!r}: taps do not match the store's manifest"
                + (f"; missing {missing}" if missing else "") + (f"; unexpected {extra}" if extra else "")
                + f" (the store holds {list(self.taps)})"
            )
        row = {"id": item_id, "shard": None, "row": self._n, "status": "ok", "error": None,
               "labels": json_labels(item_id, labels)}
        if source_bytes is not None:
            row["source_bytes"] = int(source_bytes)
        if self._buffers is None:
            # np.empty only reserves address space; pages become resident as rows are written.
            self._buffers = {t: np.empty((self.rows_per_shard, *self._shapes[t]), self._dtypes[t]) for t in self.taps}
        for tap in self.taps:
            put_item(item_id, tap, tensors[tap], self._buffers[tap][self._n, ...], self._warned_nonfinite)
        self._pending.append(row)
        self._pending_ids.add(item_id)
        self._n += 1
        if self._n >= self.rows_per_shard or len(self._pending) >= self.rows_per_shard:
            self.flush()

    def add_failure(self, item_id: str, error: str, labels: Mapping[str, Any] | None = None) -> None:
        """Record that an item could not be captured, with why; it is skipped on resume unless retry_failed."""
        self._check_open()
        self._check_id(item_id)
        self._pending.append({"id": item_id, "shard": None, "row": None, "status": "failed",
                              "error": str(error), "labels": json_labels(item_id, labels)})
        self._pending_ids.add(item_id)
        if len(self._pending) >= self.rows_per_shard:
            self.flush()

    def flush(self) -> None:
        """Write buffered items: shard (temp, fsync, rename), then their index rows (append, fsync)."""
        self._check_open()
        if not self._pending:
            return
        shard_name, digest, size = None, None, None
        if self._n:
            shard_name = f"rank{self.rank}-{self._next_shard:06d}.safetensors"
            digest, size = self._write_shard(shard_name)
        rows = []
        for row in self._pending:
            if row["status"] == "ok":
                row = {**row, "shard": shard_name, "sha256": digest, "bytes": size}
            rows.append(row)
        self._append_index(rows)
        if shard_name is not None:
            self._next_shard += 1
        self._stored_ok.update(r["id"] for r in rows if r["status"] == "ok")
        self.items_written += self._n
        self._pending, self._pending_ids, self._n = [], set(), 0

    def close(self) -> None:
        """Flush what is buffered and release the rank."""
        if self._closed:
            return
        try:
            self.flush()
        finally:
            self._release()

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        # An error or interrupt in the caller's loop: keep the complete items buffered so far, but never
        # mask the original exception with a flush error.
        try:
            if not self._closed:
                self.flush()
        except Exception as flush_exc:
            warnings.warn(f"could not flush buffered items while handling {exc_type.__name__}: {flush_exc}", RuntimeWarning)
        finally:
            self._release()

    def __del__(self) -> None:
        if getattr(self, "_closed", True) is False and (self._pending or self._n):
            warnings.warn(f"StoreWriter for {self.path} was not closed; {len(self._pending)} buffered items "
                          "were not written", RuntimeWarning)
        try:
            self._release()
        except Exception:
            pass

    # -- internals ----------------------------------------------------------------------

    def _release(self) -> None:
        self._closed = True
        if self._index_fd is not None:
            os.close(self._index_fd)
            self._index_fd = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"StoreWriter for {self.path} is closed")

    def _check_id(self, item_id: str) -> None:
        if not isinstance(item_id, str) or not item_id:
            raise TypeError(f"item ids must be non-empty strings, got {item_id!r}")
        if item_id in self._pending_ids:
            raise ValueError(f"item {item_id!r} was already added in this run")
        if item_id in self._stored_ok:
            raise ValueError(f"item {item_id!r} is already stored; skip the ids in done_ids()")

    def _write_shard(self, name: str) -> tuple[str, int]:
        """Write one shard atomically; returns (sha256, size in bytes) of the file as written."""
        assert self._buffers is not None
        final = self.path / SHARDS / name
        ids = [r["id"] for r in self._pending if r["status"] == "ok"]
        try:
            with atomic_path(final) as tmp:
                digest, size = write_shard_file(tmp, {t: buf[: self._n] for t, buf in self._buffers.items()}, ids)
                _fault("before_rename")
            fsync_dir(final.parent)
        except Exception as exc:
            raise self._write_error(f"writing shard {final}", exc) from exc
        _fault("after_rename")
        return digest, size

    def _append_index(self, rows: list[dict[str, Any]]) -> None:
        assert self._index_fd is not None
        data = "".join(row_json(r) + "\n" for r in rows).encode("utf-8")
        start = os.lseek(self._index_fd, 0, os.SEEK_END)
        try:
            view = memoryview(data)
            while view:
                written = os.write(self._index_fd, view)
                view = view[written:]
            os.fsync(self._index_fd)
        except OSError as exc:
            # Undo a partial append; the shard stays: with no rows it is an orphan, overwritten by a
            # retried flush or removed on resume.
            try:
                os.ftruncate(self._index_fd, start)
            except OSError:
                pass
            raise self._write_error(f"appending to {self._index_path}", exc) from exc
        _fault("after_index")

    def _write_error(self, what: str, exc: BaseException) -> StoreWriteError:
        reason = "the disk is full" if getattr(exc, "errno", None) == errno.ENOSPC else str(exc)
        return StoreWriteError(
            getattr(exc, "errno", None) or errno.EIO,
            f"{what} failed: {reason}. Items flushed earlier are intact ({self.items_written} in this run); "
            f"{len(self._pending)} buffered items were not written. Fix the cause and rerun the same command to resume.",
        )


# ----------------------------------------------------------------------------- bytes of a shard


def write_shard_file(path: Path, tensors: dict[str, np.ndarray], ids: list[str]) -> tuple[str, int]:
    """Write a safetensors file straight from the buffers (no serialised copy in memory), fsync it, and
    hash it by reading it back from the page cache: (sha256, size). The digest costs one read of the
    shard; computing it from the buffers would mean re-implementing safetensors' byte layout."""
    metadata = {"format": "fvl-feature-store", "format_version": str(FORMAT_VERSION), "ids": json.dumps(ids)}
    save_file(tensors, str(path), metadata=metadata)
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
        os.fsync(fh.fileno())
    return h.hexdigest(), path.stat().st_size


_FLOAT16_MAX = float(np.finfo(np.float16).max)
# numpy dtypes that torch.from_numpy and copy_ handle everywhere (the fast cast path).
_TORCH_DTYPES = frozenset({"float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool"})
_COPY_CHUNK = 16384  # elements; below torch's parallel grain size (32768)


def _describe(value: Any, torch: Any) -> tuple[Any, np.ndarray | None, str, tuple, str]:
    """(torch tensor or None, numpy array or None, kind letter, shape, dtype name) of a value."""
    if torch is not None and isinstance(value, torch.Tensor):
        t = value.detach()
        kind = "f" if t.is_floating_point() else "b" if t.dtype == torch.bool else "c" if t.is_complex() else "i"
        return t, None, kind, tuple(t.shape), str(t.dtype).removeprefix("torch.")
    a = np.asarray(value)
    return None, a, ("i" if a.dtype.kind == "u" else a.dtype.kind), a.shape, a.dtype.name


def put_item(item_id: str, tap: str, value: Any, dst: np.ndarray, warned: set[str]) -> None:
    """``dst[...] = value`` with checks: shape, numeric dtype, and float16 overflow (an error instead of
    silent inf; checked on the stored row with one integer pass, never a multi-threaded reduction)."""
    torch = sys.modules.get("torch")
    t, a, kind, shape, src_dtype = _describe(value, torch)
    if shape != dst.shape:
        hint = ""
        if len(shape) == dst.ndim + 1 and shape[0] == 1 and shape[1:] == dst.shape:
            hint = "; pass per-item tensors without the batch dimension (x[0])"
        raise ValueError(f"item {item_id!r}: tap {tap!r} has shape {shape}, the manifest says {dst.shape}{hint}")
    if kind not in "fib":
        raise ValueError(f"item {item_id!r}: tap {tap!r} has non-numeric dtype {src_dtype}")
    if dst.dtype.kind in "iub" and kind == "f":
        raise ValueError(f"item {item_id!r}: tap {tap!r} is stored as {dst.dtype} but got {src_dtype} values")
    if t is not None and t.device.type != "cpu":
        if t.is_floating_point():
            t = t.to(getattr(torch, dst.dtype.name))  # cast on the device: less to copy to the host
        torch.from_numpy(dst).copy_(t)  # one device-to-host transfer
    elif t is not None:
        _torch_copy(torch, dst, t)
    elif torch is not None and a.flags.writeable and a.dtype.name in _TORCH_DTYPES and a.dtype.isnative:
        _torch_copy(torch, dst, torch.from_numpy(a))
    else:
        with np.errstate(over="ignore", invalid="ignore"):  # range is checked just below
            np.copyto(dst, a, casting="unsafe")
    # float16 inf/NaN have all exponent bits set; one integer pass over the stored row finds them.
    if dst.dtype == np.float16 and src_dtype != "float16" and ((dst.view(np.uint16) & 0x7C00) == 0x7C00).any():
        source = t.detach().double().cpu().numpy() if t is not None else a
        _range_problem(item_id, tap, source, warned)


def _range_problem(item_id: str, tap: str, source: np.ndarray, warned: set[str]) -> None:
    """Overflowing finite values are an error; NaN/inf already in the source are kept (with a warning)."""
    finite = np.isfinite(source)
    if np.abs(np.where(finite, source, 0)).max(initial=0) >= 65520.0:
        raise ValueError(
            f"item {item_id!r}: tap {tap!r} has values beyond float16's range (±{_FLOAT16_MAX:.0f}); "
            "create the store with dtype 'float32' (or that tap's dtype 'float32')"
        )
    if not finite.all() and tap not in warned:
        warned.add(tap)
        warnings.warn(f"tap {tap!r} of item {item_id!r} holds NaN/inf values; stored as they are", RuntimeWarning)


def _torch_copy(torch: Any, dst: np.ndarray, src: Any) -> None:
    """``dst[...] = src`` with torch's fast casts, in chunks small enough to stay on one thread.

    A single large ``copy_`` opens an OpenMP parallel region; on a busy machine (or next to a model
    using every core) that region can be 100x slower than a serial copy."""
    out = torch.from_numpy(dst).view(-1)
    flat = src.reshape(-1)
    n = out.numel()
    for start in range(0, n, _COPY_CHUNK):
        out[start : start + _COPY_CHUNK].copy_(flat[start : start + _COPY_CHUNK])
