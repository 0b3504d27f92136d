"""The on-disk feature store: safetensors shards plus an append-only index.

Capturing features from a large model over a large dataset takes hours, may be killed at
any moment, and may run on several ranks at once. The store is built so that none of this
loses or corrupts work:

* ``manifest.json`` says what is inside (model, config hash, taps with per-item shapes,
  pooling, dtype, dataset fingerprint); it is written once, atomically, and a resumed run
  with a different model or dataset is refused instead of silently mixing features.
* ``shards/rank{r}-{k:06d}.safetensors`` hold one tensor per tap, one row per item. A shard
  is written to a temporary file, fsynced and renamed into place, so a shard file either
  is complete or does not exist.
* ``index/rank{r}.jsonl`` holds one JSON line per item. Lines for a shard are appended (and
  fsynced) only after the shard is in place, so an index row never points at missing data.
  A torn last line (crash mid-append) is ignored; a shard without index rows (crash between
  rename and append) is an orphan that readers ignore and the next writer removes.

Memory is bounded by one shard: items are copied into a preallocated shard buffer (already
in the storage dtype) and the buffer is handed to safetensors without another copy. Readers
open only the shards they need and read only the requested tap (and channel range).
"""
from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

__all__ = [
    "FORMAT_VERSION", "FeatureStore", "StoreWriter", "StoreError", "StoreFormatError",
    "StoreMismatchError", "StoreLockedError", "StoreWriteError", "merge_index", "read_index_file",
    "fingerprint", "parse_tap",
]

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SHARDS = "shards"
INDEX = "index"
# Fields that must agree between a store and a run resuming into it.
IDENTITY_FIELDS = ("model_id", "config_hash", "taps", "pool", "dtype", "dataset_fingerprint", "views")
STORAGE_DTYPES = ("float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool")
_SHARD_RE = re.compile(r"^rank(\d+)-(\d+)\.safetensors$")
_INDEX_RE = re.compile(r"^rank(\d+)\.jsonl$")
_TAP_RE = re.compile(r"^(?P<base>[^\[\]]+)\[(?P<view>[^\[\]]+)\]$")
_FLOAT16_MAX = float(np.finfo(np.float16).max)
# numpy dtypes that torch.from_numpy and copy_ handle everywhere (the fast cast path).
_TORCH_DTYPES = frozenset({"float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool"})

# Test seam: called with a point name ("before_rename", "after_rename", "after_index")
# during flush, so crash tests can kill the process exactly there.
_fault_hook: Callable[[str], None] | None = None


class StoreError(Exception):
    """Base class of the store's own errors."""


class StoreFormatError(StoreError, ValueError):
    """The path is not a feature store, or one this version cannot read."""


class StoreMismatchError(StoreError, ValueError):
    """A run tries to resume into a store created for another model, config or dataset."""


class StoreLockedError(StoreError, RuntimeError):
    """Another live writer holds the same rank of this store."""


class StoreWriteError(StoreError, OSError):
    """Writing a shard or index rows failed (e.g. a full disk); flushed items are intact."""


def _fault(point: str) -> None:
    if _fault_hook is not None:
        _fault_hook(point)


# ----------------------------------------------------------------------------- helpers


def fingerprint(obj: Any) -> str:
    """A short stable hash of JSON-able data (config dicts, lists of item ids).

    Used for ``config_hash`` and ``dataset_fingerprint`` so that a resumed run can tell
    whether it is capturing the same thing as the run that created the store.
    """
    if not isinstance(obj, (str, bytes)):
        obj = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    data = obj.encode() if isinstance(obj, str) else obj
    return hashlib.sha256(data).hexdigest()[:16]


def parse_tap(name: str) -> tuple[str, str | None]:
    """Split ``"fusion.input[ocr]"`` into ``("fusion.input", "ocr")``; plain names give ``None``."""
    m = _TAP_RE.match(name)
    return (m.group("base"), m.group("view")) if m else (name, None)


def _package_version() -> str:
    try:
        from importlib.metadata import version

        return version("florence-vl-workbench")
    except Exception:  # not installed (running from a checkout)
        return "0+unknown"


def _fsync_dir(path: Path) -> None:
    """Make a rename or file creation durable; a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write_text(path: Path, text: str, *, exclusive: bool = False) -> bool:
    """Write ``text`` to ``path`` via temp + fsync + rename.

    With ``exclusive`` the file is only created if absent (hard link, atomic), returning
    False when another process created it first; this lets all ranks race to create the
    manifest without clobbering each other.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    try:
        if exclusive:
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
            except OSError:  # filesystem without hard links: fall back to create-if-absent check
                if path.exists():
                    return False
                os.replace(tmp, path)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)
    return True


def _normalize_manifest(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """Validate a manifest given by a caller and fill in defaults; JSON-round-trippable."""
    if not isinstance(manifest, Mapping):
        raise TypeError(f"manifest must be a dict, got {type(manifest).__name__}")
    out = dict(manifest)
    if not out.get("model_id"):
        raise ValueError("manifest needs 'model_id' (the model name or path the features come from)")
    dtype = str(out.get("dtype") or "float16")
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"manifest dtype {dtype!r} is not supported; use one of {', '.join(STORAGE_DTYPES)}")
    taps_in = out.get("taps")
    if not isinstance(taps_in, Mapping) or not taps_in:
        raise ValueError("manifest needs 'taps': {name: {'shape': [...], 'dtype': ...}} with at least one tap")
    taps: dict[str, dict[str, Any]] = {}
    for name, spec in taps_in.items():
        if not isinstance(name, str) or not name or "[" in name or "]" in name:
            raise ValueError(f"tap name {name!r} is invalid: use a non-empty name without brackets")
        if not isinstance(spec, Mapping) or "shape" not in spec:
            raise ValueError(f"tap {name!r} needs a 'shape' (per item, without the batch dimension)")
        try:
            shape = [int(d) for d in spec["shape"]]
        except (TypeError, ValueError):
            raise ValueError(f"tap {name!r} shape {spec['shape']!r} must be a list of integers") from None
        if any(d < 0 for d in shape):
            raise ValueError(f"tap {name!r} shape {shape} has a negative dimension")
        tdtype = str(spec.get("dtype") or dtype)
        if tdtype not in STORAGE_DTYPES:
            raise ValueError(f"tap {name!r} dtype {tdtype!r} is not supported; use one of {', '.join(STORAGE_DTYPES)}")
        taps[name] = {"shape": shape, "dtype": tdtype}
    views: dict[str, dict[str, list[int]]] = {}
    for base, slices in (out.get("views") or {}).items():
        if base not in taps:
            raise ValueError(f"manifest view base {base!r} is not a tap; taps are: {', '.join(taps)}")
        shape = taps[base]["shape"]
        if not shape:
            raise ValueError(f"tap {base!r} is a scalar per item; views slice the last dimension")
        views[base] = {}
        for vname, rng in slices.items():
            try:
                start, stop = (int(v) for v in rng)
            except (TypeError, ValueError):
                raise ValueError(f"view {base}[{vname}] must be [start, stop], got {rng!r}") from None
            if not 0 <= start < stop <= shape[-1]:
                raise ValueError(f"view {base}[{vname}] = [{start}, {stop}] is outside the last dimension ({shape[-1]})")
            views[base][str(vname)] = [start, stop]
    out.update(
        format_version=FORMAT_VERSION, dtype=dtype, taps=taps, views=views,
        pool=out.get("pool") or "none",
        config_hash=out.get("config_hash"), dataset_fingerprint=out.get("dataset_fingerprint"),
    )
    out.setdefault("package_version", _package_version())
    out.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    return json.loads(json.dumps(out, default=str))


def _read_manifest(path: Path) -> dict[str, Any]:
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise StoreFormatError(
            f"{path} is not a feature store (no {MANIFEST}); pass the --out directory of a capture run"
        )
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise StoreFormatError(f"{mpath} is unreadable ({exc}); the store is damaged, capture it again") from exc
    version = manifest.get("format_version")
    if not isinstance(version, int) or version < 1 or version > FORMAT_VERSION:
        raise StoreFormatError(
            f"{path} has store format_version {version!r}; this workbench reads versions 1..{FORMAT_VERSION}"
            " (upgrade the workbench, or capture the store again)"
        )
    return manifest


def _describe_mismatch(field: str, old: Any, new: Any) -> str:
    if field == "taps" and isinstance(old, dict) and isinstance(new, dict):
        parts = []
        if missing := sorted(set(old) - set(new)):
            parts.append(f"store has taps {missing} that this run lacks")
        if extra := sorted(set(new) - set(old)):
            parts.append(f"this run adds taps {extra}")
        for name in sorted(set(old) & set(new)):
            if old[name] != new[name]:
                parts.append(f"tap {name!r} is {old[name]} in the store but {new[name]} in this run")
        return "; ".join(parts)
    return f"store has {old!r}, this run has {new!r}"


def _row_json(row: dict[str, Any]) -> str:
    return json.dumps(row, sort_keys=True, separators=(",", ":"))


def _json_labels(item_id: str, labels: Mapping[str, Any] | None) -> dict[str, Any]:
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


# ----------------------------------------------------------------------------- index


def read_index_file(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Rows of one rank's index file, in write order.

    A last line without a newline is a torn write (the process died mid-append) and is
    ignored; a complete line that does not parse is skipped with a warning.
    """
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return []
    lines = data.split(b"\n")
    lines.pop()  # after the final newline: b"" normally, or a torn line
    rows = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            ok = isinstance(row, dict) and isinstance(row.get("id"), str) and row.get("status") in ("ok", "failed")
            if ok and row["status"] == "ok":
                ok = isinstance(row.get("shard"), str) and isinstance(row.get("row"), int)
        except (json.JSONDecodeError, UnicodeDecodeError):
            ok = False
        if not ok:
            warnings.warn(f"{path}:{lineno}: skipping a malformed index line", RuntimeWarning, stacklevel=2)
            continue
        row.setdefault("error", None)
        row.setdefault("labels", {})
        rows.append(row)
    return rows


def _shard_key(shard: str) -> tuple:
    m = _SHARD_RE.match(shard)
    return (int(m.group(2)), int(m.group(1)), shard) if m else (math.inf, math.inf, shard)


def merge_index(rows_by_rank: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Merge per-rank index rows into one row per item id, sorted by id.

    Deterministic and independent of the order of the rank lists: an ``ok`` row always
    beats a ``failed`` one; among ``ok`` rows the one in the latest shard (higher shard
    number, then higher rank, then higher row) wins; among ``failed`` rows the last one in
    its rank's list wins within a rank, and ties across ranks are broken by content.
    """
    best: dict[str, tuple[tuple, dict[str, Any]]] = {}
    for rank_rows in rows_by_rank:
        last_failed: dict[str, dict[str, Any]] = {}
        for row in rank_rows:
            if row.get("status") == "ok":
                key = (1, _shard_key(row["shard"]), row["row"], _row_json(row))
                cur = best.get(row["id"])
                if cur is None or key > cur[0]:
                    best[row["id"]] = (key, row)
            else:
                last_failed[row["id"]] = row
        for item_id, row in last_failed.items():
            key = (0, (), 0, _row_json(row))
            cur = best.get(item_id)
            if cur is None or key > cur[0]:
                best[item_id] = (key, row)
    return [best[i][1] for i in sorted(best)]


def _index_files(path: Path) -> dict[int, Path]:
    files = {}
    idir = path / INDEX
    if idir.is_dir():
        for p in idir.iterdir():
            if m := _INDEX_RE.match(p.name):
                files[int(m.group(1))] = p
    return dict(sorted(files.items()))


def _read_all_ranks(path: Path) -> list[list[dict[str, Any]]]:
    return [read_index_file(p) for p in _index_files(path).values()]


# ----------------------------------------------------------------------------- writer


class _RankLock:
    """An advisory lock per rank, so two writers never append to one index file."""

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

    ``manifest`` needs ``model_id`` and ``taps`` ({name: {"shape": per-item shape,
    "dtype": stored dtype (default: the store's ``dtype``)}}); ``config_hash``, ``pool``,
    ``dataset_fingerprint``, ``views`` and any extra keys are recorded too. A shard is
    flushed every ``shard_size`` items, or sooner so that it stays under ``max_shard_mb``.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        manifest: Mapping[str, Any],
        *,
        rank: int = 0,
        world_size: int = 1,
        shard_size: int = 256,
        retry_failed: bool = False,
        max_shard_mb: float = 128.0,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.path = Path(path)
        self.rank = rank
        self.world_size = world_size
        self.retry_failed = retry_failed
        self._closed = True
        self._lock: _RankLock | None = None
        self._index_fd: int | None = None

        requested = _normalize_manifest(manifest)
        self._prepare_dirs()
        self.manifest = self._create_or_check_manifest(requested)
        self.taps: dict[str, dict[str, Any]] = self.manifest["taps"]
        self._dtypes = {t: np.dtype(s["dtype"]) for t, s in self.taps.items()}
        self._shapes = {t: tuple(s["shape"]) for t, s in self.taps.items()}
        item_bytes = sum(math.prod(self._shapes[t]) * self._dtypes[t].itemsize for t in self.taps)
        self.rows_per_shard = max(1, min(shard_size, int(max_shard_mb * 2**20) // max(item_bytes, 1)))

        try:
            self._lock = _RankLock(self.path / INDEX / f"rank{rank}.lock")
        except OSError:
            raise StoreLockedError(
                f"another writer is already writing rank {rank} of {self.path}; wait for it or stop it"
            ) from None
        try:
            self._index_path = self.path / INDEX / f"rank{rank}.jsonl"
            self._repair_index_tail()
            self._next_shard = self._clean_rank(rank) + 1
            if rank == 0:
                self._clean_departed_ranks()
            self._index_fd = os.open(self._index_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            _fsync_dir(self._index_path.parent)
        except BaseException:
            self._lock.release()
            raise
        snapshot = merge_index(_read_all_ranks(self.path))
        self._stored_ok = {r["id"] for r in snapshot if r["status"] == "ok"}
        self._buffers: dict[str, np.ndarray] | None = None
        self._pending: list[dict[str, Any]] = []
        self._pending_ids: set[str] = set()
        self._n = 0  # ok rows in the buffer
        self._warned_nonfinite: set[str] = set()
        self.items_written = 0
        self._closed = False

    # -- opening ------------------------------------------------------------------------

    def _prepare_dirs(self) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise StoreFormatError(f"{self.path} is a file, not a feature store directory; choose another --out")
        if self.path.is_dir() and not (self.path / MANIFEST).exists():
            foreign = [p.name for p in self.path.iterdir() if p.name not in (SHARDS, INDEX) and not p.name.startswith(".")]
            if foreign:
                raise StoreFormatError(
                    f"{self.path} exists and is not a feature store (it holds {', '.join(sorted(foreign)[:3])}"
                    f"{', ...' if len(foreign) > 3 else ''}); choose a new --out or an empty directory"
                )
        for sub in (SHARDS, INDEX):
            (self.path / sub).mkdir(parents=True, exist_ok=True)

    def _create_or_check_manifest(self, requested: dict[str, Any]) -> dict[str, Any]:
        mpath = self.path / MANIFEST
        if not mpath.exists():
            text = json.dumps(requested, indent=2) + "\n"  # key order kept: taps and views keep their order
            if _atomic_write_text(mpath, text, exclusive=True):
                return requested
        existing = _read_manifest(self.path)
        for field in IDENTITY_FIELDS:
            old, new = existing.get(field), requested.get(field)
            if field == "views":
                old, new = old or {}, new or {}
            if old != new:
                raise StoreMismatchError(
                    f"{self.path} was created for a different run: {field} differs "
                    f"({_describe_mismatch(field, old, new)}). Use a new --out directory, "
                    f"or delete {self.path} to capture again from scratch."
                )
        return existing

    def _repair_index_tail(self) -> None:
        """Cut a torn last line so that the next append does not glue onto garbage."""
        try:
            size = self._index_path.stat().st_size
        except FileNotFoundError:
            return
        if size == 0:
            return
        with open(self._index_path, "r+b") as fh:
            fh.seek(max(0, size - 1))
            if fh.read(1) == b"\n":
                return
            # Scan back in blocks for the last newline.
            pos, keep = size, 0
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

    def _clean_rank(self, rank: int) -> int:
        """Remove a rank's orphan shards and temp files; return its highest indexed shard number."""
        rows = read_index_file(self.path / INDEX / f"rank{rank}.jsonl")
        referenced = {r["shard"] for r in rows if r["status"] == "ok"}
        highest = -1
        for name in referenced:
            m = _SHARD_RE.match(name)
            if m and int(m.group(1)) == rank:
                highest = max(highest, int(m.group(2)))
        for p in (self.path / SHARDS).iterdir():
            m = _SHARD_RE.match(p.name)
            if m and int(m.group(1)) == rank and p.name not in referenced:
                p.unlink(missing_ok=True)  # orphan: renamed in, but the crash came before its index rows
            elif p.name.startswith(f".rank{rank}-") and p.name.endswith(".tmp"):
                p.unlink(missing_ok=True)  # half-written shard
        return highest

    def _clean_departed_ranks(self) -> None:
        """Rank 0 tidies orphans of ranks beyond the current world size (a run resumed smaller)."""
        ranks = set(_index_files(self.path))
        for p in (self.path / SHARDS).iterdir():
            if (m := _SHARD_RE.match(p.name)) or (m := re.match(r"^\.rank(\d+)-", p.name)):
                ranks.add(int(m.group(1)))
        for r in sorted(x for x in ranks if x >= self.world_size):
            try:
                lock = _RankLock(self.path / INDEX / f"rank{r}.lock")
            except OSError:
                continue  # a writer of an older, larger world is still alive; leave it alone
            try:
                self._clean_rank(r)
            finally:
                lock.release()

    # -- public API ---------------------------------------------------------------------

    def done_ids(self) -> set[str]:
        """Ids already recorded by any rank (ok, plus failed unless ``retry_failed``) or added in this run."""
        done = {
            r["id"] for r in merge_index(_read_all_ranks(self.path))
            if r["status"] == "ok" or not self.retry_failed
        }
        return done | self._pending_ids

    def add(
        self,
        item_id: str,
        tensors: Mapping[str, Any],
        labels: Mapping[str, Any] | None = None,
    ) -> None:
        """Buffer one item's features (per-item tensors, no batch dimension); flush when a shard is full."""
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
        json_labels = _json_labels(item_id, labels)
        if self._buffers is None:
            # np.empty only reserves address space; pages become resident as rows are written.
            self._buffers = {t: np.empty((self.rows_per_shard, *self._shapes[t]), self._dtypes[t]) for t in self.taps}
        slot = self._n
        for tap in self.taps:
            self._put(item_id, tap, tensors[tap], self._buffers[tap][slot, ...])  # a view, also for scalars
        self._pending.append({"id": item_id, "shard": None, "row": slot, "status": "ok", "error": None, "labels": json_labels})
        self._pending_ids.add(item_id)
        self._n += 1
        if self._n >= self.rows_per_shard or len(self._pending) >= self.rows_per_shard:
            self.flush()

    def add_failure(self, item_id: str, error: str, labels: Mapping[str, Any] | None = None) -> None:
        """Record that an item could not be captured, with why; it is skipped on resume unless retry_failed."""
        self._check_open()
        self._check_id(item_id)
        self._pending.append({
            "id": item_id, "shard": None, "row": None, "status": "failed",
            "error": str(error), "labels": _json_labels(item_id, labels),
        })
        self._pending_ids.add(item_id)
        if len(self._pending) >= self.rows_per_shard:
            self.flush()

    def flush(self) -> None:
        """Write buffered items: shard (temp, fsync, rename), then their index rows (append, fsync)."""
        self._check_open()
        if not self._pending:
            return
        shard_name = None
        if self._n:
            shard_name = f"rank{self.rank}-{self._next_shard:06d}.safetensors"
            self._write_shard(shard_name)
        rows = []
        for row in self._pending:
            if row["status"] == "ok":
                row = {**row, "shard": shard_name}
            rows.append(row)
        self._append_index(rows, shard_name)
        if shard_name is not None:
            self._next_shard += 1
        self._stored_ok.update(r["id"] for r in rows if r["status"] == "ok")
        self.items_written += self._n
        self._pending = []
        self._pending_ids = set()
        self._n = 0

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
        # An error or interrupt in the caller's loop: keep the complete items buffered so far,
        # but never mask the original exception with a flush error.
        try:
            if not self._closed:
                self.flush()
        except Exception as flush_exc:
            warnings.warn(f"could not flush buffered items while handling {exc_type.__name__}: {flush_exc}", RuntimeWarning)
        finally:
            self._release()

    def __del__(self) -> None:
        if getattr(self, "_closed", True) is False and (self._pending or self._n):
            warnings.warn(
                f"StoreWriter for {self.path} was not closed; {len(self._pending)} buffered items were not written",
                RuntimeWarning,
            )
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

    def _put(self, item_id: str, tap: str, value: Any, dst: np.ndarray) -> None:
        """Copy one tap of one item into its buffer row, converting to the storage dtype.

        When torch is loaded (as in a capture loop) the cast runs in torch, which converts
        float32 -> float16 with SIMD; numpy's cast is several times slower. Float16 overflow
        is an error instead of silent inf (checked on the stored row, without a
        multi-threaded torch reduction).
        """
        torch = sys.modules.get("torch")
        t = None
        if torch is not None and isinstance(value, torch.Tensor):
            t = value.detach()
            kind = "f" if t.is_floating_point() else "b" if t.dtype == torch.bool else "c" if t.is_complex() else "i"
            shape, src_dtype = tuple(t.shape), str(t.dtype).removeprefix("torch.")
        else:
            a = np.asarray(value)
            kind = "i" if a.dtype.kind == "u" else a.dtype.kind
            shape, src_dtype = a.shape, a.dtype.name
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
        # float16 inf/NaN have all exponent bits set; one integer pass over the stored row
        # finds them (cheaper than isfinite on float16, and never multi-threaded).
        if dst.dtype == np.float16 and src_dtype != "float16" and ((dst.view(np.uint16) & 0x7C00) == 0x7C00).any():
            self._range_problem(item_id, tap, t.detach().double().cpu().numpy() if t is not None else a)

    def _range_problem(self, item_id: str, tap: str, source: np.ndarray) -> None:
        """Overflowing finite values are an error; NaN/inf already in the source are kept (with a warning)."""
        finite = np.isfinite(source)
        if np.abs(np.where(finite, source, 0)).max(initial=0) >= 65520.0:
            raise ValueError(
                f"item {item_id!r}: tap {tap!r} has values beyond float16's range (±{_FLOAT16_MAX:.0f}); "
                "create the store with dtype 'float32' (or that tap's dtype 'float32')"
            )
        if not finite.all() and tap not in self._warned_nonfinite:
            self._warned_nonfinite.add(tap)
            warnings.warn(f"tap {tap!r} of item {item_id!r} holds NaN/inf values; stored as they are", RuntimeWarning)

    def _write_shard(self, name: str) -> None:
        assert self._buffers is not None
        final = self.path / SHARDS / name
        tmp = final.with_name(f".{name}.{os.getpid()}.tmp")
        ids = [r["id"] for r in self._pending if r["status"] == "ok"]
        tensors = {t: buf[: self._n] for t, buf in self._buffers.items()}
        metadata = {"format": "fvl-feature-store", "format_version": str(FORMAT_VERSION), "ids": json.dumps(ids)}
        try:
            save_file(tensors, tmp, metadata=metadata)
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            _fault("before_rename")
            os.replace(tmp, final)
            _fsync_dir(final.parent)
        except Exception as exc:
            tmp.unlink(missing_ok=True)
            raise self._write_error(f"writing shard {final}", exc) from exc
        _fault("after_rename")

    def _append_index(self, rows: list[dict[str, Any]], shard_name: str | None) -> None:
        assert self._index_fd is not None
        data = "".join(_row_json(r) + "\n" for r in rows).encode("utf-8")
        start = os.lseek(self._index_fd, 0, os.SEEK_END)
        try:
            view = memoryview(data)
            while view:
                written = os.write(self._index_fd, view)
                view = view[written:]
            os.fsync(self._index_fd)
        except OSError as exc:
            # Undo a partial append; the shard (if any) becomes an orphan cleaned up on resume.
            # The shard stays: with no rows it is an orphan, overwritten by a retried flush or
            # removed on resume.
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


def _torch_copy(torch: Any, dst: np.ndarray, src: Any) -> None:
    """``dst[...] = src`` with torch's fast casts, in chunks small enough to stay on one thread.

    A single large ``copy_`` opens an OpenMP parallel region; on a busy machine (or next
    to a model using every core) that region can be 100x slower than a serial copy.
    """
    out = torch.from_numpy(dst).view(-1)
    flat = src.reshape(-1)
    n = out.numel()
    for start in range(0, n, _COPY_CHUNK):
        out[start : start + _COPY_CHUNK].copy_(flat[start : start + _COPY_CHUNK])


_COPY_CHUNK = 16384  # elements; below torch's parallel grain size (32768)


# ----------------------------------------------------------------------------- reader


class FeatureStore:
    """Read-only view of a feature store: the merged index, labels, and tap arrays.

    ``items`` are the ids stored ok, sorted; ``failed`` maps ids that could not be captured
    to their error. ``load`` reads one tap (or a channel view such as
    ``"fusion.input[ocr]"``) for chosen items, touching only the shards and the tensor it
    needs; ``iter_batches`` does the same in bounded memory.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        if not self.path.is_dir():
            raise StoreFormatError(f"{self.path} is not a feature store directory (it does not exist or is a file)")
        self.manifest: dict[str, Any] = _read_manifest(self.path)
        self._taps: dict[str, dict[str, Any]] = self.manifest.get("taps") or {}
        self.taps: list[str] = list(self._taps)
        self.views: dict[str, dict[str, list[int]]] = self.manifest.get("views") or {}
        self._index = merge_index(_read_all_ranks(self.path))
        self._ok = {r["id"]: r for r in self._index if r["status"] == "ok"}
        self.items: list[str] = sorted(self._ok)
        self.failed: dict[str, str] = {r["id"]: r.get("error") or "" for r in self._index if r["status"] == "failed"}

    def __len__(self) -> int:
        return len(self.items)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._ok

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.path)!r}, items={len(self)}, failed={len(self.failed)}, taps={self.taps})"

    @property
    def view_names(self) -> list[str]:
        """All loadable view names, e.g. ``fusion.input[ocr]``."""
        return [f"{base}[{v}]" for base, vs in self.views.items() for v in vs]

    def index(self) -> list[dict[str, Any]]:
        """The merged index: one row per item (ok or failed), sorted by id."""
        return [{**r, "labels": dict(r.get("labels") or {})} for r in self._index]

    def label_names(self) -> list[str]:
        names: set[str] = set()
        for row in self._ok.values():
            names.update(row.get("labels") or {})
        return sorted(names)

    def labels(self, items: list[str] | None = None) -> dict[str, np.ndarray]:
        """Labels as arrays aligned with ``items`` (default: all ok items); missing values are NaN/None."""
        rows = self._rows(items)
        return {name: _label_array([(r.get("labels") or {}).get(name, _MISSING) for r in rows]) for name in self.label_names()}

    def tap_shape(self, tap: str) -> tuple[int, ...]:
        """Per-item shape of a tap or view."""
        base, channels = self._resolve(tap)
        shape = tuple(self._taps[base]["shape"])
        return shape if channels is None else (*shape[:-1], channels[1] - channels[0])

    def load(
        self,
        tap: str,
        items: list[str] | None = None,
        *,
        as_: str = "numpy",
        dtype: Any = None,
    ) -> Any:
        """Array ``(len(items), *shape)`` of one tap or view, rows aligned with ``items`` (default: all ok items)."""
        if as_ not in ("numpy", "torch"):
            raise ValueError(f"as_ must be 'numpy' or 'torch', got {as_!r}")
        base, channels = self._resolve(tap)
        rows = self._rows(items)
        stored = np.dtype(self._taps[base]["dtype"])
        out_dtype = _np_dtype(dtype) if dtype is not None else stored
        out = np.empty((len(rows), *self.tap_shape(tap)), dtype=out_dtype)
        by_shard: dict[str, list[tuple[int, int]]] = {}
        for pos, row in enumerate(rows):
            by_shard.setdefault(row["shard"], []).append((row["row"], pos))
        for shard in sorted(by_shard, key=_shard_key):
            self._read_rows(shard, base, channels, sorted(by_shard[shard]), out)
        if as_ == "torch":
            import torch

            return torch.from_numpy(out)
        return out

    def iter_batches(
        self,
        tap: str,
        batch_size: int,
        items: list[str] | None = None,
        *,
        order: str = "items",
        as_: str = "numpy",
        dtype: Any = None,
    ) -> Iterator[tuple[list[str], Any]]:
        """Yield ``(ids, array)`` batches; memory is bounded by one batch.

        ``order="items"`` follows ``items`` (sorted ids, aligned with ``labels()``);
        ``order="storage"`` follows shard order, which reads files sequentially.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if order not in ("items", "storage"):
            raise ValueError(f"order must be 'items' or 'storage', got {order!r}")
        self._resolve(tap)
        ids = list(self.items if items is None else items)
        if order == "storage":
            rows = self._rows(ids)
            ids = [r["id"] for r in sorted(rows, key=lambda r: (_shard_key(r["shard"]), r["row"]))]
        for start in range(0, len(ids), batch_size):
            chunk = ids[start : start + batch_size]
            yield chunk, self.load(tap, chunk, as_=as_, dtype=dtype)

    def check(self) -> list[str]:
        """Problems found by opening every indexed shard (missing files, wrong shapes, id mismatches)."""
        problems = []
        by_shard: dict[str, list[dict[str, Any]]] = {}
        for row in self._ok.values():
            by_shard.setdefault(row["shard"], []).append(row)
        for shard, rows in sorted(by_shard.items()):
            path = self.path / SHARDS / shard
            try:
                with _open_shard(path) as fh:
                    ids = json.loads((fh.metadata() or {}).get("ids", "null") or "null")
                    for tap, spec in self._taps.items():
                        if tap not in fh.keys():
                            problems.append(f"{shard}: tap {tap!r} missing")
                            continue
                        shape = fh.get_slice(tap).get_shape()
                        if list(shape[1:]) != spec["shape"] or any(r["row"] >= shape[0] for r in rows):
                            problems.append(f"{shard}: tap {tap!r} has shape {shape}, expected (>{max(r['row'] for r in rows)}, {spec['shape']})")
                    if ids is not None:
                        for r in rows:
                            if r["row"] >= len(ids) or ids[r["row"]] != r["id"]:
                                problems.append(f"{shard}: row {r['row']} is not item {r['id']!r}")
            except Exception as exc:  # safetensors raises its own error types
                problems.append(f"{shard}: unreadable ({exc})")
        return problems

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

    def _rows(self, items: Iterable[str] | None) -> list[dict[str, Any]]:
        if items is None:
            return [self._ok[i] for i in self.items]
        if isinstance(items, str):
            raise TypeError("items must be a list of ids, not a single string")
        rows, missing = [], []
        for item_id in items:
            row = self._ok.get(item_id)
            if row is None:
                missing.append(item_id)
            else:
                rows.append(row)
        if missing:
            failed = [i for i in missing if i in self.failed]
            detail = f" ({len(failed)} of them failed at capture: see .failed)" if failed else ""
            raise KeyError(f"{len(missing)} items are not stored in {self.path}: {missing[:5]}{detail}")
        return rows

    def _read_rows(
        self,
        shard: str,
        tap: str,
        channels: tuple[int, int] | None,
        rows_pos: list[tuple[int, int]],
        out: np.ndarray,
    ) -> None:
        """Fill ``out[pos]`` from ``shard``'s tensor ``tap`` rows, reading contiguous runs only."""
        path = self.path / SHARDS / shard
        if not path.is_file():
            raise StoreFormatError(
                f"{path} is missing but the index lists {len(rows_pos)} items in it; the store is damaged "
                "(restore the file, or delete the store and capture again)"
            )
        nd = len(self._taps[tap]["shape"])
        tail = (slice(None),) * (nd - 1) + ((slice(*channels),) if channels else (slice(None),) if nd else ())
        with _open_shard(path) as fh:
            sl = fh.get_slice(tap)
            n_rows = sl.get_shape()[0]
            rows = [r for r, _ in rows_pos]
            if rows[-1] >= n_rows:
                raise StoreFormatError(f"{path} has {n_rows} rows but the index refers to row {rows[-1]}")
            lo, hi = rows[0], rows[-1] + 1
            positions = [p for _, p in rows_pos]
            if hi - lo == len(rows) and positions[-1] - positions[0] + 1 == len(rows) and positions == sorted(positions):
                out[positions[0] : positions[-1] + 1] = sl[(slice(lo, hi), *tail)]  # the common case: plain slices
                return
            if hi - lo <= 2 * len(rows):  # dense enough: one read of the span
                block = sl[(slice(lo, hi), *tail)]
                out[positions] = block[[r - lo for r in rows]]
                return
            i = 0
            while i < len(rows_pos):  # sparse: one read per contiguous run
                j = i + 1
                while j < len(rows_pos) and rows_pos[j][0] == rows_pos[j - 1][0] + 1:
                    j += 1
                block = sl[(slice(rows_pos[i][0], rows_pos[j - 1][0] + 1), *tail)]
                out[positions[i:j]] = block
                i = j


def _open_shard(path: Path):
    """Open a shard lazily (header only); a seam so tests can watch which tensors are read."""
    return safe_open(str(path), framework="numpy")


def _np_dtype(dtype: Any) -> np.dtype:
    if "torch" in sys.modules and isinstance(dtype, sys.modules["torch"].dtype):
        dtype = str(dtype).removeprefix("torch.")
    try:
        return np.dtype(dtype)
    except TypeError:
        raise ValueError(f"dtype {dtype!r} is not a numpy dtype name (e.g. 'float32')") from None


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


_MISSING = _Missing()


def _label_array(values: list[Any]) -> np.ndarray:
    """One label column as an array: typed when all values share a simple type, else objects.

    Missing numbers become NaN (float column); other missing values become None.
    """
    present = [v for v in values if v is not _MISSING]
    kinds = {_label_kind(v) for v in present}
    if len(present) < len(values):
        if kinds and kinds <= {"int", "float"}:
            return np.array([np.nan if v is _MISSING else v for v in values], dtype=np.float64)
        values = [None if v is _MISSING else v for v in values]
    elif kinds == {"bool"}:
        return np.array(values, dtype=bool)
    elif kinds and kinds <= {"int", "float"}:
        return np.array(values, dtype=np.int64 if kinds == {"int"} else np.float64)
    elif kinds == {"str"}:
        return np.array(values, dtype=str)
    elif kinds == {"list"}:
        try:
            arr = np.array(values)
            if arr.dtype.kind in "biuf":
                return arr
        except ValueError:  # ragged
            pass
    arr = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        arr[i] = v
    return arr


def _label_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "str"
    if isinstance(value, list):
        return "list"
    return "other"
