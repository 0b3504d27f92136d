"""``manifest.json``: what a store holds and what it was captured from.

The manifest is written once, atomically, by the first writer (ranks race to create it; the loser
checks its own against the winner's). A run resuming into a store must agree on every identity field;
anything else (creation time, the model's path as typed, the data set's location) is informative.

Format versions: 1 recorded the model by the path the user typed; 2 (this version) records the
weights by content (``model_fingerprint``), a digest per shard in the index, and per-item source file
sizes. Version-1 stores stay readable; only resuming into one is refused (see `check_identity`).
"""
from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from workbench.data.files import atomic_write_text
from workbench.store.errors import StoreFormatError, StoreMismatchError

FORMAT_VERSION = 2
MANIFEST = "manifest.json"
SHARDS = "shards"
INDEX = "index"
DAMAGED = "damaged"  # where `fvl store verify --repair` moves shards that failed verification
# Fields that must agree between a store and a run resuming into it. The model is named by its weights
# (`model_fingerprint`), not by `model_id`, so the same weights under another path resume; `forward_batch`
# (images per forward at capture) because another grouping would round features differently.
IDENTITY_FIELDS = ("model_fingerprint", "config_hash", "taps", "pool", "dtype", "dataset_fingerprint", "views",
                   "forward_batch")
STORAGE_DTYPES = ("float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool")
_TAP_RE = re.compile(r"^(?P<base>[^\[\]]+)\[(?P<view>[^\[\]]+)\]$")
_FIX = "Use a new --out directory, or delete {path} to capture again from scratch."


def fingerprint(obj: Any) -> str:
    """A short stable hash of JSON-able data (config dicts, lists of item ids).

    Used for ``config_hash`` so that a resumed run can tell whether it captures the same thing as the
    run that created the store."""
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


def _normalize_taps(taps_in: Any, dtype: str) -> dict[str, dict[str, Any]]:
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
    return taps


def _normalize_views(views_in: Any, taps: dict[str, dict[str, Any]]) -> dict[str, dict[str, list[int]]]:
    views: dict[str, dict[str, list[int]]] = {}
    for base, slices in (views_in or {}).items():
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
    return views


def normalize_manifest(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """Validate a manifest given by a caller and fill in defaults; JSON-round-trippable."""
    if not isinstance(manifest, Mapping):
        raise TypeError(f"manifest must be a dict, got {type(manifest).__name__}")
    out = dict(manifest)
    if not out.get("model_id"):
        raise ValueError("manifest needs 'model_id' (the model name or path the features come from)")
    dtype = str(out.get("dtype") or "float16")
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"manifest dtype {dtype!r} is not supported; use one of {', '.join(STORAGE_DTYPES)}")
    taps = _normalize_taps(out.get("taps"), dtype)
    out.update(
        format_version=FORMAT_VERSION, dtype=dtype, taps=taps, views=_normalize_views(out.get("views"), taps),
        pool=out.get("pool") or "none", config_hash=out.get("config_hash"),
        dataset_fingerprint=out.get("dataset_fingerprint"), model_fingerprint=out.get("model_fingerprint"),
    )
    out.setdefault("package_version", _package_version())
    out.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    return json.loads(json.dumps(out, default=str))


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of the store at ``path``, or `StoreFormatError` saying what to do instead."""
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise StoreFormatError(
            f"{path} is not a feature store (no {MANIFEST}); pass the --out directory of a capture run"
        )
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StoreFormatError(f"{mpath} is unreadable ({exc}); the store is damaged, capture it again") from exc
    if not isinstance(manifest, dict) or "taps" not in manifest:
        raise StoreFormatError(
            f"{path} holds a {MANIFEST} that is not a feature store's (a data set, or another tool's output); "
            "pass the --out directory of a capture run, or choose a new --out outside it"
        )
    version = manifest.get("format_version")
    if not isinstance(version, int) or version < 1 or version > FORMAT_VERSION:
        raise StoreFormatError(
            f"{path} has store format_version {version!r}; this workbench reads versions 1..{FORMAT_VERSION}"
            " (upgrade the workbench, or capture the store again)"
        )
    return manifest


def create_manifest(path: Path, manifest: dict[str, Any]) -> bool:
    """Create ``manifest.json`` unless another writer did first (then False). Key order is kept, so taps
    and views keep the order they were captured in."""
    return atomic_write_text(path / MANIFEST, json.dumps(manifest, indent=2) + "\n", exclusive=True)


def describe_mismatch(field: str, old: Any, new: Any, existing: Mapping[str, Any], requested: Mapping[str, Any]) -> str:
    """Why a field differs, in words a user can act on."""
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
    if field == "model_fingerprint":
        return (f"the model's weights changed: the store holds features of {existing.get('model_id')!r} with "
                f"weights {str(old)[:12]}, this run loads {requested.get('model_id')!r} with weights {str(new)[:12]}")
    if field == "dataset_fingerprint":
        return (f"the data set changed (ids, labels or image file sizes): the store was captured from "
                f"{existing.get('dataset_root') or 'a data set'} ({str(old)[:12]}), this run reads "
                f"{requested.get('dataset_root') or 'another'} ({str(new)[:12]})")
    return f"store has {old!r}, this run has {new!r}"


def check_identity(path: Path, existing: Mapping[str, Any], requested: Mapping[str, Any]) -> None:
    """Refuse a run whose manifest differs from the store's in an identity field, naming what differs."""
    fix = _FIX.format(path=path)
    if existing.get("format_version", 1) < 2 and requested.get("model_fingerprint"):
        raise StoreMismatchError(
            f"{path} was written by an older workbench (store format 1), which named the model by its path "
            f"instead of its weights; it stays readable, but cannot be resumed. {fix}"
        )
    for field in IDENTITY_FIELDS:
        old, new = existing.get(field), requested.get(field)
        if field == "views":
            old, new = old or {}, new or {}
        if old != new:
            raise StoreMismatchError(
                f"{path} was created for a different run: {field} differs "
                f"({describe_mismatch(field, old, new, existing, requested)}). {fix}"
            )
