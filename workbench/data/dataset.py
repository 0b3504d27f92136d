"""One view over every image source: synthetic dirs, LLaVA JSON files and image folders.

Capture, probes and training only need "a sorted list of (id, image path, labels, split)",
so `open_dataset` turns each source into that. Items are sorted by id, so the same dataset
gives the same order on every machine and `shard(rank, world_size)` splits it the same way
on every rank of a torchrun job.
"""
from __future__ import annotations

import csv
import functools
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence, overload

from PIL import Image

from workbench.data.images import IMAGE_EXTENSIONS, load_image
from workbench.data.llava import LlavaFormatError, read_llava


class DatasetError(ValueError):
    """A dataset path that cannot be opened; the message says why and what to pass instead."""


@dataclass(frozen=True)
class Item:
    id: str
    image_path: Path
    labels: dict[str, Any] = field(default_factory=dict)
    split: str | None = None


class ImageDataset(Sequence[Item]):
    """Sorted, immutable list of `Item`s with split/shard views."""

    def __init__(self, items: Sequence[Item], root: Path, kind: str, source: Path | None = None):
        self.items: list[Item] = sorted(items, key=lambda it: it.id)
        ids = [it.id for it in self.items]
        dup = next((a for a, b in zip(ids, ids[1:]) if a == b), None)
        if dup is not None:
            raise DatasetError(f"dataset {source or root} has two items with id {dup!r}; ids must be unique")
        self.root = Path(root)
        self.kind = kind  # "synthetic", "llava" or "folder"
        self.source = Path(source) if source is not None else self.root

    def __len__(self) -> int:
        return len(self.items)

    @overload
    def __getitem__(self, index: int) -> Item: ...
    @overload
    def __getitem__(self, index: slice) -> "ImageDataset": ...

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self._view(self.items[index])
        return self.items[index]

    def __iter__(self) -> Iterator[Item]:
        return iter(self.items)

    def __repr__(self) -> str:
        return f"ImageDataset(kind={self.kind!r}, source={str(self.source)!r}, n={len(self)}, splits={self.splits})"

    def _view(self, items: Sequence[Item]) -> "ImageDataset":
        return ImageDataset(items, self.root, self.kind, self.source)

    @property
    def ids(self) -> list[str]:
        return [it.id for it in self.items]

    @property
    def splits(self) -> list[str]:
        return sorted({it.split for it in self.items if it.split is not None})

    @property
    def label_names(self) -> list[str]:
        """Label keys, in first-seen order (the generator's order for synthetic data)."""
        names: dict[str, None] = {}
        for it in self.items:
            names.update(dict.fromkeys(it.labels))
        return list(names)

    def split(self, name: str) -> "ImageDataset":
        if name not in self.splits:
            raise DatasetError(f"dataset {self.source} has no split {name!r}; it has {self.splits or 'no splits'}")
        return self._view([it for it in self.items if it.split == name])

    def shard(self, rank: int, world_size: int) -> "ImageDataset":
        """Every world_size-th item starting at rank: disjoint, covering, and balanced to one item."""
        if not 0 <= rank < world_size:
            raise DatasetError(f"rank {rank} is not in 0..{world_size - 1}")
        return self._view(self.items[rank::world_size])

    def labels(self, name: str) -> list[Any]:
        """One label for every item (None where an item lacks it)."""
        return [it.labels.get(name) for it in self.items]

    def load(self, index: int, **kwargs) -> Image.Image:
        """The RGB image of item `index` via `load_image` (same validation)."""
        return load_image(self.items[index].image_path, **kwargs)

    def index_of(self, item_id: str) -> int:
        import bisect

        i = bisect.bisect_left(self.ids, item_id)
        if i == len(self.items) or self.items[i].id != item_id:
            raise KeyError(item_id)
        return i

    @functools.cached_property
    def fingerprint(self) -> str:
        """sha256 of ids, image paths relative to the root, splits and labels: names the content, not the location."""
        h = hashlib.sha256()
        for it in self.items:
            try:
                rel = it.image_path.relative_to(self.root).as_posix()
            except ValueError:
                rel = it.image_path.as_posix()
            h.update(json.dumps([it.id, rel, it.split, it.labels], sort_keys=True).encode())
            h.update(b"\n")
        return h.hexdigest()


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DatasetError(f"{path}: line {lineno}: invalid JSON ({exc.msg}); "
                                       "regenerate the dataset with `fvl data synth`") from None
    return rows


def _synthetic_dir(path: str | Path) -> Path:
    d = Path(path)
    if d.is_file() and d.name in ("scenes.jsonl", "manifest.json"):
        d = d.parent
    if not (d / "scenes.jsonl").is_file():
        if (d / ".synth-in-progress.json").is_file():
            raise DatasetError(f"{d} is an unfinished `fvl data synth` run; rerun the same command to finish it")
        raise DatasetError(f"{d} is not a synthetic dataset (no scenes.jsonl); make one with `fvl data synth --out {d}`")
    return d


def load_scenes(path: str | Path, split: str | None = None) -> list[dict[str, Any]]:
    """Full ground-truth rows of a synthetic dataset (objects, words, boxes, captions, QA)."""
    rows = _read_jsonl(_synthetic_dir(path) / "scenes.jsonl")
    return [r for r in rows if split is None or r.get("split") == split]


def _open_synthetic(d: Path) -> ImageDataset:
    items = [Item(r["id"], d / r["image"], dict(r.get("labels", {})), r.get("split")) for r in load_scenes(d)]
    return ImageDataset(items, d, "synthetic", d)


def _open_llava(path: Path, image_folder: Path | None, check_images: bool) -> ImageDataset:
    try:
        samples = read_llava(path, image_folder, check_images=check_images)
    except LlavaFormatError as exc:
        raise DatasetError(str(exc)) from None
    root = Path(image_folder) if image_folder is not None else path.parent
    # A LLaVA file written by `fvl data synth` sits next to scenes.jsonl: keep its labels and splits.
    truth: dict[Path, tuple[dict[str, Any], str | None]] = {}
    if (root / "scenes.jsonl").is_file():
        truth = {root / r["image"]: (dict(r.get("labels", {})), r.get("split")) for r in load_scenes(root)}
    items: dict[Path, Item] = {}
    used: set[str] = set()
    for s in samples:
        if s.image_path is None or s.image_path in items:
            continue  # text-only samples have no image; several samples may share one image
        iid = s.id
        k = 1
        while iid in used:  # the same id on two different images
            iid, k = f"{s.id}#{k}", k + 1
        used.add(iid)
        labels, split = truth.get(s.image_path, ({}, None))
        items[s.image_path] = Item(iid, s.image_path, labels, split)
    if not items:
        raise DatasetError(f"LLaVA file {path} has no samples with an image")
    return ImageDataset(list(items.values()), root, "llava", path)


def _open_folder(d: Path) -> ImageDataset:
    items = []
    for p in d.rglob("*"):
        rel = p.relative_to(d)
        if any(part.startswith(".") for part in rel.parts):
            continue  # hidden files and folders (.git, temp files of an interrupted write)
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file():
            items.append(Item(rel.as_posix(), p, {}, None))
    if not items:
        raise DatasetError(f"folder {d} has no image files ({', '.join(IMAGE_EXTENSIONS)}); "
                           "point at a folder of images, a LLaVA .json or a `fvl data synth` output")
    return ImageDataset(items, d, "folder", d)


def open_dataset(path: str | Path, image_folder: str | Path | None = None, check_images: bool = True) -> ImageDataset:
    """A synthetic DIR (has scenes.jsonl), a LLaVA .json/.jsonl (images relative to
    `image_folder`, default its directory) or a folder of images (searched recursively;
    ids are relative paths, no labels)."""
    p = Path(path)
    if not p.exists():
        raise DatasetError(f"dataset {p} does not exist; pass a synthetic dir, a LLaVA .json or an image folder")
    if p.is_dir():
        if (p / "scenes.jsonl").is_file() or (p / ".synth-in-progress.json").is_file():
            return _open_synthetic(_synthetic_dir(p))
        return _open_folder(p)
    if p.name in ("scenes.jsonl", "manifest.json"):
        return _open_synthetic(_synthetic_dir(p))
    if p.suffix in (".json", ".jsonl"):
        return _open_llava(p, Path(image_folder) if image_folder is not None else None, check_images)
    raise DatasetError(f"cannot open {p} as a dataset: expected a directory or a .json/.jsonl file")


def load_qa(path: str | Path, split: str | None = None, types: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """QA rows (id, image_id, image, question, answer, type, split) of a synthetic dataset;
    `image` is made absolute so the rows can be used from any working directory."""
    d = _synthetic_dir(path)
    if not (d / "qa.jsonl").is_file():
        raise DatasetError(f"{d} has no qa.jsonl; regenerate it with `fvl data synth`")
    rows = _read_jsonl(d / "qa.jsonl")
    out = []
    for r in rows:
        if (split is None or r.get("split") == split) and (types is None or r.get("type") in types):
            out.append({**r, "image": str(d / r["image"])})
    return out


def load_florence2_tasks(path: str | Path, split: str | None = None,
                         tasks: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Florence-2 task rows (id, image, split, task, target); `image` made absolute."""
    d = _synthetic_dir(path)
    f = d / "florence2_tasks.json"
    try:
        rows = json.loads(f.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError(f"{d} has no florence2_tasks.json; regenerate it with `fvl data synth`") from None
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{f}: line {exc.lineno}, column {exc.colno}: invalid JSON ({exc.msg})") from None
    return [{**r, "image": str(d / r["image"])} for r in rows
            if (split is None or r.get("split") == split) and (tasks is None or r.get("task") in tasks)]


def read_labels_csv(path: str | Path) -> list[dict[str, str]]:
    """labels.csv rows as dicts of strings (for tools that want the flat table)."""
    d = _synthetic_dir(path)
    with open(d / "labels.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))
