"""Provenance by content: which weights and which data a store was captured from.

* Weights: the sha256 of a model directory's ``*.safetensors`` files (names relative to the directory,
  so the same weights under another path, absolute or with a trailing slash, give the same digest), or
  of the state dict for a model built in memory (a preset). Reading a 3B model's 6 GB takes a few
  seconds; a tqdm bar shows it.
* Data: the sha256 of every item's id, path relative to the data set's root, split, labels and image
  file size. A stat per image is cheap at 100k images (no image is read); the file size catches a
  regenerated or edited image in practice. Modification times are left out on purpose: copying a data
  set (``cp -r``, ``rsync`` without ``-t``) changes them and would refuse a store for its own data.
  Each index row also records its image's size, so a mismatch can name the items that changed.

`ProvenanceMixin.check_against` is what analyses call before pairing stored features with a data set
or applying them to a model.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from workbench.store.errors import StoreMismatchError

_CHUNK = 1 << 22


def source_bytes(image_path: Any) -> int:
    """Size of an item's image file, or -1 when it cannot be stat'ed (a missing image fails at capture)."""
    try:
        return os.stat(image_path).st_size
    except (OSError, TypeError, ValueError):
        return -1


def _labels_json(labels: Any) -> str:
    return json.dumps(labels or {}, sort_keys=True, separators=(",", ":"), default=str)


def dataset_fingerprint(dataset: Iterable[Any], root: str | os.PathLike[str] | None = None) -> str:
    """sha256 of (id, relative path, split, labels, file size) of every item, in the data set's order."""
    root = Path(root if root is not None else getattr(dataset, "root", "") or "")
    h = hashlib.sha256()
    for it in dataset:
        path = Path(it.image_path)
        try:
            rel = path.relative_to(root).as_posix()
        except ValueError:
            rel = path.as_posix()
        h.update(json.dumps([it.id, rel, getattr(it, "split", None), _labels_json(it.labels),
                             source_bytes(path)]).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def weights_fingerprint(source: Any) -> str:
    """sha256 of a model directory's safetensors files, or of a module's state dict.

    A directory without safetensors files (a pickle checkpoint) raises ValueError: pass the loaded model
    instead."""
    if isinstance(source, (str, os.PathLike)):
        return _directory_digest(Path(source))
    return _state_dict_digest(source)


def model_fingerprint(model: Any, path: str | os.PathLike[str] | None = None) -> str:
    """The fingerprint a capture records for a model opened from ``path`` (a directory or hub id, or None
    for a preset): the directory's safetensors files when it has them, else the loaded state dict. Every
    command computes it this way, so a store and the model an analysis is handed compare equal."""
    if path is not None and Path(path).is_dir() and any(Path(path).rglob("*.safetensors")):
        return weights_fingerprint(path)
    return weights_fingerprint(model)


def _directory_digest(path: Path) -> str:
    files = sorted(p for p in path.resolve().rglob("*.safetensors") if p.is_file())
    if not files:
        raise ValueError(f"{path} holds no *.safetensors files to fingerprint")
    root = path.resolve()
    total = sum(p.stat().st_size for p in files)
    h = hashlib.sha256()
    with tqdm(total=total, unit="B", unit_scale=True, desc="fingerprint weights", disable=total < 2**30) as bar:
        for p in files:
            h.update(p.relative_to(root).as_posix().encode("utf-8") + b"\0")
            with open(p, "rb") as fh:
                while chunk := fh.read(_CHUNK):
                    h.update(chunk)
                    bar.update(len(chunk))
    return h.hexdigest()


def _state_dict_digest(model: Any) -> str:
    import torch

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\0".encode("utf-8"))
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def describe_data_change(table: Any, dataset: Iterable[Any], *, extra_ok: bool) -> list[str]:
    """What differs between a store's items and a data set: items absent from the data, items whose labels
    or image file size changed, and (unless ``extra_ok``) items of the data the store does not hold."""
    by_id = {it.id: it for it in dataset}
    gone, relabelled, resized = [], [], []
    for pos in range(len(table)):
        item_id = table.id_at(pos)
        it = by_id.pop(item_id, None)
        if it is None:
            gone.append(item_id)
            continue
        stored = table.labels_at(pos)
        if stored and _labels_json(stored) != _labels_json(json.loads(_labels_json(it.labels))):
            relabelled.append(item_id)  # a store written without labels (by a script) is not compared
        recorded = int(table.source_bytes[pos])
        if recorded >= 0 and recorded != source_bytes(it.image_path):
            resized.append(item_id)
    added = [] if extra_ok else sorted(set(by_id) - set(table.failed))
    out = []
    for what, ids in (("are not in the data set", gone), ("have other labels in the data set", relabelled),
                      ("have an image file of another size", resized), ("of the data set are new", added)):
        if ids:
            out.append(f"{len(ids)} items {what} (e.g. {', '.join(ids[:3])})")
    return out


class ProvenanceMixin:
    """`check_against` for `FeatureStore` (needs ``path``, ``manifest`` and ``_table``)."""

    def data_changes(self, dataset: Any, *, extra_ok: bool = True) -> list[str]:
        """What differs between the stored items and ``dataset`` (see `describe_data_change`)."""
        return describe_data_change(self._table, dataset, extra_ok=extra_ok)

    def check_against(self, *, dataset: Any = None, model_fingerprint: str | None = None,
                      force: bool = False) -> list[str]:
        """Refuse to pair this store with a data set or a model it was not captured from.

        Returns the mismatches found (empty when none); with a mismatch and ``force=False`` raises
        `StoreMismatchError` naming it and the fix. Callers that let a user ``--force`` record the
        returned list in their output. Format-1 stores hold no weights digest: the model is not checked."""
        problems = []
        stored = self.manifest.get("model_fingerprint")
        if model_fingerprint is not None and stored and stored != model_fingerprint:
            problems.append(f"its features come from other weights ({self.manifest.get('model_id')!r}, "
                            f"weights {stored[:12]}; the model given has weights {model_fingerprint[:12]})")
        if dataset is not None:
            same = self.manifest.get("dataset_fingerprint") == dataset_fingerprint(dataset)
            if not same:
                problems += self.data_changes(dataset)
        if problems and not force:
            raise StoreMismatchError(
                f"store {self.path} does not belong to the data or model given: {'; '.join(problems)}. Pass the "
                "data set and model the store was captured from (see its manifest.json), capture a new store, "
                "or pass --force to go on anyway (recorded in the output)"
            )
        return problems
