"""COCO-style annotation files: `{"images": [...], "annotations": [...]}`.

Caption files (`captions_val2017.json`: annotations with `image_id` and `caption`) give each image
its captions, in annotation-id order; instance files (annotations with `category_id` and `bbox`,
plus `categories`) give each image the labels `category` (the category of its largest box) and
`n_objects`, so `fvl probe --label category` works on them. Image paths are the `file_name`s,
relative to the image folder (by default the JSON's own folder). The item id is the COCO image id.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from workbench.data.items import DatasetError, Item


def is_coco(doc: Any) -> bool:
    return isinstance(doc, dict) and "images" in doc and "annotations" in doc


def _check_image(img: Any, k: int, path: Path) -> tuple[str, str]:
    if not isinstance(img, dict) or not isinstance(img.get("file_name"), str) or "id" not in img:
        raise DatasetError(f"{path}: images[{k}] needs an \"id\" and a \"file_name\"; got {str(img)[:120]}")
    return str(img["id"]), img["file_name"]


def _ann_order(ann: Any, k: int) -> tuple[int, Any]:
    """Sort key: numeric annotation ids numerically, others as text, after the numeric ones."""
    aid = ann.get("id", k) if isinstance(ann, dict) else k
    return (0, aid) if isinstance(aid, int) and not isinstance(aid, bool) else (1, str(aid))


def _per_image(doc: dict[str, Any], path: Path, known: set[str]) -> tuple[dict[str, list[str]], dict[str, dict]]:
    """Captions and instance labels per image id, with annotations in id order."""
    names = {str(c.get("id")): c.get("name") for c in doc.get("categories") or [] if isinstance(c, dict)}
    captions: dict[str, list[str]] = {}
    largest: dict[str, tuple[float, Any]] = {}
    counts: dict[str, int] = {}
    anns = doc["annotations"]
    if not isinstance(anns, list):
        raise DatasetError(f"{path}: \"annotations\" must be a list, got {type(anns).__name__}")
    for k in sorted(range(len(anns)), key=lambda k: _ann_order(anns[k], k)):
        ann = anns[k]
        if not isinstance(ann, dict) or "image_id" not in ann:
            raise DatasetError(f"{path}: annotations[{k}] has no \"image_id\"; every annotation names its image")
        iid = str(ann["image_id"])
        if iid not in known:
            raise DatasetError(f"{path}: annotations[{k}] refers to image_id {ann['image_id']!r}, which is not "
                               "in \"images\"; fix the id or add the image")
        if isinstance(ann.get("caption"), str):
            captions.setdefault(iid, []).append(ann["caption"].strip())
        if "category_id" in ann:
            counts[iid] = counts.get(iid, 0) + 1
            box = ann.get("bbox") or [0, 0, 0, 0]
            area = float(ann.get("area") or (box[2] * box[3] if len(box) == 4 else 0.0))
            cat = names.get(str(ann["category_id"]), ann["category_id"])
            if iid not in largest or area > largest[iid][0]:
                largest[iid] = (area, cat)
    labels = {iid: {"category": largest[iid][1], "n_objects": counts[iid]} for iid in largest}
    return captions, labels


def coco_items(doc: dict[str, Any], path: Path, image_folder: Path) -> list[Item]:
    """One item per entry of `images` (images without annotations included)."""
    images = doc["images"]
    if not isinstance(images, list) or not images:
        raise DatasetError(f"{path}: \"images\" must be a non-empty list of {{\"id\", \"file_name\"}}")
    rows = [_check_image(img, k, path) for k, img in enumerate(images)]
    seen: dict[str, str] = {}
    for iid, name in rows:
        if iid in seen:
            raise DatasetError(f"{path}: image id {iid} is used twice ({seen[iid]} and {name}); ids must be unique")
        seen[iid] = name
    captions, labels = _per_image(doc, path, set(seen))
    return [Item(iid, image_folder / name, labels.get(iid, {}), None, tuple(captions.get(iid, ())))
            for iid, name in rows]
