"""One view over every image source: synthetic dirs, LLaVA JSON files, COCO-style caption or
instance JSON, and image folders (with or without a Hugging Face `metadata.jsonl`).

Capture, probes and training only need "a sorted list of (id, image path, labels, split)",
so `open_dataset` turns each source into that. Items are sorted by id, so the same dataset
gives the same order on every machine and `shard(rank, world_size)` splits it the same way
on every rank of a torchrun job.

Images are not opened here. A listed image that is missing or broken stays an item and fails
when it is loaded, so a capture records it as failed and goes on, and `fvl data check` lists
every such item; only a data set none of whose images exist (a wrong `--image-folder`) is
refused up front.
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Any, Sequence

from workbench.data.coco import coco_items, is_coco
from workbench.data.imagefolder import METADATA_FILES, read_image_folder
from workbench.data.items import DatasetError, ImageDataset, Item, require_some_images
from workbench.data.llava import LlavaFormatError, read_llava

__all__ = ["DatasetError", "ImageDataset", "Item", "add_image_folder_option", "load_florence2_tasks", "load_qa",
           "load_scenes", "open_dataset", "read_labels_csv"]

IMAGE_FOLDER_HELP = ("for a LLaVA or COCO .json: the folder its image paths are relative to "
                     "(default: the file's own folder)")


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


def _answers(conversations: list[dict[str, str]]) -> list[str]:
    return [t["value"].strip() for t in conversations if t.get("from") == "gpt" and t["value"].strip()]


def _open_llava(path: Path, image_folder: Path | None, check_images: bool) -> ImageDataset:
    try:
        samples = read_llava(path, image_folder, check_images=False)  # missing images fail per item, on load
    except LlavaFormatError as exc:
        raise DatasetError(str(exc)) from None
    root = Path(image_folder) if image_folder is not None else path.parent
    # A LLaVA file written by `fvl data synth` sits next to scenes.jsonl: keep its labels and splits.
    truth: dict[Path, tuple[dict[str, Any], str | None]] = {}
    if (root / "scenes.jsonl").is_file():
        truth = {root / r["image"]: (dict(r.get("labels", {})), r.get("split")) for r in load_scenes(root)}
    ids: dict[Path, str] = {}
    captions: dict[Path, list[str]] = {}
    used: set[str] = set()
    for s in samples:
        if s.image_path is None:
            continue  # text-only samples have no image
        answers = _answers(s.conversations)
        captions.setdefault(s.image_path, []).extend(answers[:1])  # the first answer of each sample
        if s.image_path in ids:
            continue  # several samples may share one image
        iid, k = s.id, 1
        while iid in used:  # the same id on two different images
            iid, k = f"{s.id}#{k}", k + 1
        used.add(iid)
        ids[s.image_path] = iid
    if not ids:
        raise DatasetError(f"LLaVA file {path} has no samples with an image")
    items = [Item(iid, ip, *truth.get(ip, ({}, None)), tuple(captions[ip])) for ip, iid in ids.items()]
    if check_images:
        require_some_images(items, path, root, "pass --image-folder DIR, the folder its \"image\" paths are "
                                               "relative to")
    return ImageDataset(items, root, "llava", path)


def _open_coco(path: Path, doc: dict[str, Any], image_folder: Path | None, check_images: bool) -> ImageDataset:
    root = Path(image_folder) if image_folder is not None else path.parent
    if not root.is_dir():
        raise DatasetError(f"--image-folder {root} does not exist; pass the folder the \"file_name\" entries of "
                           f"{path} are relative to")
    items = coco_items(doc, path, root)
    if check_images:
        require_some_images(items, path, root, "pass --image-folder DIR, the folder its \"file_name\" entries "
                                               "are relative to")
    return ImageDataset(items, root, "coco", path)


def _open_folder(d: Path, check_images: bool) -> ImageDataset:
    items, metas = read_image_folder(d)
    if metas and check_images:
        require_some_images(items, metas[0], d, "the \"file_name\" entries are relative to the metadata file's "
                                               "folder; fix them")
    return ImageDataset(items, d, "folder", d)


def _read_json_doc(p: Path) -> Any:
    """The parsed file when it is a JSON object (COCO), None when it is a list (LLaVA, parsed later
    by its own reader with per-sample messages): the first character decides, so a 600k-sample LLaVA
    file is not parsed twice."""
    with open(p, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    if not head.startswith(b"{"):
        return None
    try:
        doc = json.loads(p.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{p}: invalid JSON ({exc}); fix the file") from None
    if not is_coco(doc):
        keys = ", ".join(list(doc)[:8]) if isinstance(doc, dict) else ""
        raise DatasetError(f"{p} is a JSON object with keys [{keys}], neither COCO (\"images\" + \"annotations\") "
                           "nor LLaVA (a list of samples); convert it to one of them")
    return doc


def open_dataset(path: str | Path, image_folder: str | Path | None = None, check_images: bool = True) -> ImageDataset:
    """A synthetic DIR (has scenes.jsonl), a LLaVA .json/.jsonl or a COCO-style .json (images
    relative to `image_folder`, default the file's directory) or a folder of images (searched
    recursively; ids are relative paths; labels from a `metadata.jsonl`/`.csv` or subfolder names).

    Missing image files do not refuse the data set (they fail when loaded); with `check_images`,
    one whose images are all missing is refused, since that is a wrong image folder."""
    p = Path(path)
    folder = Path(image_folder) if image_folder is not None else None
    if not p.exists():
        raise DatasetError(f"dataset {p} does not exist; pass a synthetic dir, a LLaVA or COCO .json "
                           "or an image folder")
    if p.is_dir():
        if (p / "scenes.jsonl").is_file() or (p / ".synth-in-progress.json").is_file():
            return _open_synthetic(_synthetic_dir(p))
        return _open_folder(p, check_images)
    if p.name in ("scenes.jsonl", "manifest.json"):
        return _open_synthetic(_synthetic_dir(p))
    if p.name in METADATA_FILES:
        return _open_folder(p.parent, check_images)
    if p.suffix in (".json", ".jsonl"):
        doc = _read_json_doc(p) if p.suffix == ".json" else None
        if doc is not None:
            return _open_coco(p, doc, folder, check_images)
        return _open_llava(p, folder, check_images)
    raise DatasetError(f"cannot open {p} as a dataset: expected a directory or a .json/.jsonl file")


def add_image_folder_option(parser: argparse.ArgumentParser) -> None:
    """`--image-folder DIR` for a command that reads `--data`: every such command takes the same option,
    passed on as `open_dataset(args.data, image_folder=args.image_folder)`."""
    parser.add_argument("--image-folder", default=None, metavar="DIR", help=IMAGE_FOLDER_HELP)


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
