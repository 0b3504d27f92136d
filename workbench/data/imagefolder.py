"""Image folders, with the Hugging Face `imagefolder` conventions, so a folder prepared for
`datasets.load_dataset("imagefolder", ...)` opens here unchanged:

- `metadata.jsonl` or `metadata.csv` (at the top or in any subfolder) lists the images in a
  `file_name` column, relative to that metadata file; every other column with scalar values
  becomes a label of the item (so `fvl probe --label COLUMN` works), and a `caption`/`text`
  column is also the item's caption. A listed image that is missing stays an item that fails
  when loaded; images the metadata does not list are not items (as in `datasets`).
- Without metadata, when every image sits in a subfolder one level down (`cat/1.png`,
  `dog/2.png`), the subfolder name is the label `label`.
- A top-level folder named like a split (`train/`, `validation/`, `val/`, `test/`, ...) gives the
  item's split, normalised to the names synthetic data uses (`train`, `val`, `test`).

Ids are the image paths relative to the folder, in POSIX form.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from workbench.data.images import IMAGE_EXTENSIONS
from workbench.data.items import SCALAR_TYPES, DatasetError, Item

METADATA_FILES = ("metadata.jsonl", "metadata.csv")
CAPTION_COLUMNS = ("caption", "text", "captions")
SPLIT_DIRS = {"train": "train", "training": "train", "validation": "val", "valid": "val", "val": "val",
              "dev": "val", "test": "test", "testing": "test", "eval": "test", "evaluation": "test"}


def _visible(rel: Path) -> bool:
    """Hidden files and folders (.git, temp files of an interrupted write) are never items."""
    return not any(part.startswith(".") for part in rel.parts)


def _split_of(rel: Path) -> tuple[str | None, Path]:
    """(split, the path below the split folder) for a path relative to the data set root."""
    if len(rel.parts) > 1 and rel.parts[0].lower() in SPLIT_DIRS:
        return SPLIT_DIRS[rel.parts[0].lower()], Path(*rel.parts[1:])
    return None, rel


def _typed_csv(rows: list[dict[str, Any]]) -> list[tuple[int, dict[str, Any]]]:
    """CSV cells are text; a column whose every filled cell is an integer (or a number) becomes one, as
    `datasets` infers it, so a numeric label probes as a number. Empty cells are None."""
    def convert(values: list[str]) -> list[Any]:
        for kind in (int, float):
            try:
                return [kind(v) if v != "" else None for v in values]
            except ValueError:
                continue
        return [v if v != "" else None for v in values]

    columns = {c: convert([r.get(c) or "" for r in rows]) for c in (rows[0] if rows else {}) if c != "file_name"}
    return [(k + 2, {"file_name": r.get("file_name"), **{c: vals[k] for c, vals in columns.items()}})
            for k, r in enumerate(rows)]


def _read_rows(meta: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, row) of a metadata file; a syntax error names the file and the line."""
    try:
        text = meta.read_text(encoding="utf-8-sig")  # a BOM from a spreadsheet export is not data
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{meta} is not UTF-8 text ({exc.reason}); re-save it as UTF-8") from None
    if meta.suffix == ".csv":
        return _typed_csv(list(csv.DictReader(text.splitlines())))
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{meta}: line {lineno}, column {exc.colno}: invalid JSON ({exc.msg}); "
                               "metadata.jsonl needs one JSON object per line") from None
        if not isinstance(row, dict):
            raise DatasetError(f"{meta}: line {lineno} is a {type(row).__name__}, not an object with \"file_name\"")
        rows.append((lineno, row))
    return rows


def _metadata_items(root: Path, metas: list[Path]) -> list[Item]:
    items = []
    for meta in metas:
        for lineno, row in _read_rows(meta):
            name = row.get("file_name")
            if not isinstance(name, str) or not name:
                raise DatasetError(f"{meta}: line {lineno} has no \"file_name\" (the image path relative to "
                                   f"{meta.parent}); add one to every row")
            path = meta.parent / name
            try:
                rel = path.relative_to(root)
            except ValueError:  # an absolute file_name: keep it; the id is then the path as written
                rel = Path(name)
            split, _ = _split_of(rel)
            labels = {k: v for k, v in row.items() if k != "file_name" and isinstance(v, SCALAR_TYPES)}
            captions = _captions(row)
            items.append(Item(rel.as_posix(), path, labels, split, captions))
    return items


def _captions(row: dict[str, Any]) -> tuple[str, ...]:
    for col in CAPTION_COLUMNS:
        value = row.get(col)
        if isinstance(value, str) and value:
            return (value,)
        if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            return tuple(value)
    return ()


def _plain_items(root: Path) -> list[Item]:
    found = []
    for p in root.rglob("*"):
        rel = p.relative_to(root)
        if _visible(rel) and p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file():
            split, below = _split_of(rel)
            found.append((rel, split, below))
    # The folder name is a label only when every image has one, as with `datasets`' imagefolder.
    by_folder = bool(found) and all(len(below.parts) == 2 for _, _, below in found)
    return [Item(rel.as_posix(), root / rel, {"label": below.parts[0]} if by_folder else {}, split)
            for rel, split, below in found]


def read_image_folder(root: str | Path) -> tuple[list[Item], list[Path]]:
    """(items, the metadata files used) of an image folder; see the module docstring."""
    root = Path(root)
    metas = sorted(p for name in METADATA_FILES for p in root.rglob(name) if _visible(p.relative_to(root)))
    items = _metadata_items(root, metas) if metas else _plain_items(root)
    if not items:
        what = f"its metadata ({', '.join(str(m) for m in metas)}) lists no images" if metas else \
            f"it has no image files ({', '.join(IMAGE_EXTENSIONS)})"
        raise DatasetError(f"folder {root}: {what}; point at a folder of images, a LLaVA .json, a COCO captions "
                           ".json or a `fvl data synth` output")
    return items, metas
