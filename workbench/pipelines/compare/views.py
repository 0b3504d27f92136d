"""Two augmented views of each scene, with every object's box in each view: the correspondence score's data.

Why: the synthetic scenes know where every object is, so after a random crop (and mirror) of each view we know
where the same object lies in both. An encoder whose features of one object match across the two views - and
not those of the other objects - has what the "Law of Vision Representation in MLLMs" paper calls
correspondence, which it found (with alignment) to predict MLLM performance across encoders.

OUT/views/ holds `<scene>_a.png`, `<scene>_b.png` and `views.json` {scene: {"a": [[x0, y0, x1, y1] per object],
"b": [...]}} in the view's pixels; objects cut to less than half of their area in either view are dropped
(`null`), so every kept pair is visible in both.
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from workbench.data.dataset import load_scenes
from workbench.data.files import atomic_write_bytes, atomic_write_json
from workbench.pipelines.compare.config import fingerprint

VIEWS_FILE = "views.json"


def _crop_box(rng: np.random.Generator, size: int, scale: tuple[float, float]) -> tuple[int, int, int]:
    side = int(round(size * rng.uniform(*scale)))
    x0 = int(rng.integers(0, size - side + 1))
    y0 = int(rng.integers(0, size - side + 1))
    return x0, y0, side


def _box_in_view(box: list[float], x0: int, y0: int, side: int, size: int, flip: bool) -> list[float] | None:
    """An object's box in a view (crop at (x0, y0) of `side` pixels, resized to `size`, maybe mirrored), or None
    when less than half of it stays inside."""
    bx0, by0, bx1, by1 = box
    cx0, cy0, cx1, cy1 = max(bx0, x0), max(by0, y0), min(bx1, x0 + side), min(by1, y0 + side)
    area = max(bx1 - bx0, 1e-6) * max(by1 - by0, 1e-6)
    if cx1 <= cx0 or cy1 <= cy0 or (cx1 - cx0) * (cy1 - cy0) < 0.5 * area:
        return None
    s = size / side
    out = [(cx0 - x0) * s, (cy0 - y0) * s, (cx1 - x0) * s, (cy1 - y0) * s]
    if flip:
        out = [size - out[2], out[1], size - out[0], out[3]]
    return [round(v, 2) for v in out]


def _view(image: Image.Image, boxes: list[list[float]], rng: np.random.Generator, scale: tuple[float, float],
          allow_flip: bool) -> tuple[Image.Image, list[list[float] | None]]:
    size = image.size[0]
    x0, y0, side = _crop_box(rng, size, scale)
    flip = bool(allow_flip and rng.random() < 0.5)
    img = image.crop((x0, y0, x0 + side, y0 + side)).resize((size, size), Image.BICUBIC)
    if flip:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return img, [_box_in_view(b, x0, y0, side, size, flip) for b in boxes]


def make_views(data_dir: Path, out: Path, split: str, scale: tuple[float, float], flip: bool, seed: int) -> Path:
    """Write the two views of every scene of `split` into `out` (once: reused while the settings match)."""
    settings = {"data": str(Path(data_dir).resolve()), "split": split, "scale": list(scale), "flip": flip,
                "seed": seed}
    index = out / VIEWS_FILE
    if index.is_file():
        old = json.loads(index.read_text())
        if old.get("fingerprint") == fingerprint(settings):
            return out
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    boxes: dict[str, Any] = {}
    for row in load_scenes(data_dir, split=split):
        with Image.open(data_dir / row["image"]) as im:
            image = im.convert("RGB")
        objs = [list(map(float, o["bbox"])) for o in row["objects"]]
        entry = {}
        for tag in ("a", "b"):
            img, entry[tag] = _view(image, objs, rng, scale, flip)
            path = out / f"{row['id']}_{tag}.png"
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            atomic_write_bytes(path, buf.getvalue(), durable=False)
        boxes[row["id"]] = entry
    atomic_write_json(index, {"fingerprint": fingerprint(settings), "settings": settings, "boxes": boxes})
    return out


def load_views(views_dir: Path) -> dict[str, dict[str, list]]:
    return json.loads((views_dir / VIEWS_FILE).read_text())["boxes"]
