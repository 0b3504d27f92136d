"""The items every data set reader produces, and the sorted, immutable list that holds them.

Kept apart from the readers (`dataset.py`, `coco.py`, `imagefolder.py`) so that each reader can
build `Item`s without importing the dispatcher that chooses among them.
"""
from __future__ import annotations

import bisect
import functools
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence, overload

from PIL import Image

from workbench.data.images import load_image

# Label values a probe can use; nested values (lists, dicts) of a metadata row are not labels.
SCALAR_TYPES = (str, int, float, bool, type(None))


class DatasetError(ValueError):
    """A dataset path that cannot be opened; the message says why and what to pass instead."""


@dataclass(frozen=True)
class Item:
    """One image of a data set. The image file is not opened here: a missing or broken file fails
    when it is loaded, so a capture records that item as failed and goes on with the others."""
    id: str
    image_path: Path
    labels: dict[str, Any] = field(default_factory=dict)
    split: str | None = None
    captions: tuple[str, ...] = ()


class ImageDataset(Sequence[Item]):
    """Sorted, immutable list of `Item`s with split/shard views."""

    def __init__(self, items: Sequence[Item], root: Path, kind: str, source: Path | None = None):
        self.items: list[Item] = sorted(items, key=lambda it: it.id)
        ids = [it.id for it in self.items]
        dup = next((a for a, b in zip(ids, ids[1:]) if a == b), None)
        if dup is not None:
            raise DatasetError(f"dataset {source or root} has two items with id {dup!r}; ids must be unique")
        self.root = Path(root)
        self.kind = kind  # "synthetic", "llava", "coco" or "folder"
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

    def captions(self) -> dict[str, str]:
        """item id -> its first caption, for the items that have one (LLaVA answers, COCO captions,
        a caption column of a metadata file)."""
        return {it.id: it.captions[0] for it in self.items if it.captions}

    def load(self, index: int, **kwargs) -> Image.Image:
        """The RGB image of item `index` via `load_image` (same validation)."""
        return load_image(self.items[index].image_path, **kwargs)

    def index_of(self, item_id: str) -> int:
        ids = self.ids
        i = bisect.bisect_left(ids, item_id)
        if i == len(self.items) or self.items[i].id != item_id:
            raise KeyError(item_id)
        return i

    def missing(self) -> list[Item]:
        """Items whose image file does not exist (a stat per item; no image is decoded)."""
        return [it for it in self.items if not it.image_path.is_file()]

    @functools.cached_property
    def fingerprint(self) -> str:
        """sha256 of ids, image paths relative to the root, splits, labels and captions: names the
        content, not the location."""
        h = hashlib.sha256()
        for it in self.items:
            try:
                rel = it.image_path.relative_to(self.root).as_posix()
            except ValueError:
                rel = it.image_path.as_posix()
            row: list[Any] = [it.id, rel, it.split, it.labels]
            if it.captions:  # only readers with text carry captions; other fingerprints stay as they were
                row.append(list(it.captions))
            h.update(json.dumps(row, sort_keys=True).encode())
            h.update(b"\n")
        return h.hexdigest()


def require_some_images(items: Sequence[Item], source: Path, folder: Path, hint: str) -> None:
    """Refuse a data set none of whose images exist: that is a wrong image folder, not a few bad
    files, and capturing it would only record every item as failed. Stops at the first image found."""
    if items and not any(it.image_path.is_file() for it in items):
        raise DatasetError(f"{source}: none of its {len(items)} images exist under {folder} "
                           f"(e.g. {items[0].image_path}); {hint}")
