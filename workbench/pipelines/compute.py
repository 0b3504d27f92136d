"""The app's computations, free of streamlit: token grids from a store, tap names, thumbnails,
results files as tables, and the live run of a model on one image.

The views wrap these in `st.cache_data` / `st.cache_resource` (see `cache.py`); keeping them
here means each can be tested directly and reused by the report writer.
"""
from __future__ import annotations

import base64
import io
import math
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

_PROMPT_LAYER = re.compile(r"^prompt\.(?P<p>[^.]+)\.layer(?P<i>\d+)$")
_PROMPT_LAST = re.compile(r"^prompt\.(?P<p>[^.\[]+)$")
_STAGE = re.compile(r"^vision\.(?P<kind>stage|block|layer)(?P<i>\d+)$")
_LLM = re.compile(r"^llm\.layer(?P<i>\d+)$")


# --------------------------------------------------------------------------- tap names
def tap_position(tap: str) -> tuple[str, str, int]:
    """(stream, depth label, order) of a tap, for depth x stream layouts of per-tap results.

    vision.stage2 -> ("vision", "stage2", 2); depth -> ("depth", "V", 100); prompt.ocr.layer1 ->
    ("ocr", "layer1", 201); prompt.ocr -> ("ocr", "last", 299); fusion.output -> ("fusion", "output", 400);
    llm.layer3 -> ("llm", "layer3", 503). The order sorts depth labels from the input upwards."""
    m = _STAGE.match(tap)
    if m:
        return "vision", f"{m['kind']}{m['i']}", int(m["i"])
    if tap == "depth":
        return "depth", "V", 100
    m = _PROMPT_LAYER.match(tap)
    if m:
        return m["p"], f"layer{m['i']}", 200 + int(m["i"])
    m = _PROMPT_LAST.match(tap)
    if m:
        return m["p"], "last", 299
    if tap.startswith("fusion."):
        return "fusion", tap.split(".", 1)[1], 400
    m = _LLM.match(tap)
    if m:
        return "llm", f"layer{m['i']}", 500 + int(m["i"])
    return tap, tap, 900


def spatial_taps(manifest: dict[str, Any]) -> list[str]:
    """Taps of a store that keep a spatial layout (pool none or grid{k}), so they can be drawn as maps."""
    pool = str(manifest.get("pool") or "none")
    if pool != "none" and not pool.startswith("grid"):
        return []
    out = []
    for tap, spec in (manifest.get("taps") or {}).items():
        if tap.startswith("llm."):
            continue
        if grid_side(spec["shape"], pool, manifest) is not None:
            out.append(tap)
    return out


def grid_side(shape: Sequence[int], pool: str, manifest: dict[str, Any] | None = None) -> int | None:
    """Side of the square token grid of one stored item of this shape, or None when it has none."""
    shape = list(shape)
    if len(shape) == 3:  # (C, H, W) map stored unpooled
        return shape[1] if shape[1] == shape[2] else None
    if len(shape) != 2:
        return None
    n = shape[0]
    if pool.startswith("grid"):
        side = int(round(math.sqrt(n)))
        return side if side * side == n else None
    side = int(round(math.sqrt(n - 1)))
    if n > 1 and side * side == n - 1:
        return side
    side = int(round(math.sqrt(n)))
    return side if side * side == n else None


def to_grid(item: np.ndarray, pool: str) -> np.ndarray:
    """One stored item as an (h, w, D) grid: (C, H, W) maps are transposed; (N, D) tokens lose a leading
    global token when N = h*w + 1."""
    x = np.asarray(item, dtype=np.float32)
    if x.ndim == 3:
        return np.transpose(x, (1, 2, 0))
    side = grid_side(x.shape, pool)
    if side is None:
        raise ValueError(f"an item of shape {x.shape} (pool {pool}) is not a square token grid")
    if x.shape[0] == side * side + 1 and not pool.startswith("grid"):
        x = x[1:]
    return x.reshape(side, side, x.shape[1])


# --------------------------------------------------------------------------- images
def thumbnail(path: str | Path, size: int = 96):
    """A small RGB copy of an image for galleries (validated by load_image)."""
    from workbench.data.images import load_image

    img = load_image(path)
    img.thumbnail((size, size))
    return img


def data_url(img, fmt: str = "PNG") -> str:
    """An image as a data: URL (for chart tooltips, which show an `image` field as a picture)."""
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def dataset_images(data_dir: str | Path | None, ids: Sequence[str],
                   image_folder: str | Path | None = None) -> dict[str, Path]:
    """id -> image path for the store's items that the data set holds (empty without a data set)."""
    if data_dir is None:
        return {}
    from workbench.data.dataset import DatasetError, open_dataset

    try:
        ds = open_dataset(data_dir, image_folder=image_folder, check_images=False)
    except (DatasetError, FileNotFoundError, ValueError):
        return {}
    want = set(ids)
    return {it.id: it.image_path for it in ds if it.id in want}


def upsample_nearest(grid: np.ndarray, size: int) -> np.ndarray:
    """(h, w[, c]) -> (size, size[, c]) by repetition, so token maps display as crisp blocks."""
    h, w = grid.shape[:2]
    ry, rx = max(1, size // h), max(1, size // w)
    return np.repeat(np.repeat(grid, ry, axis=0), rx, axis=1)


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.55, cmap: str = "inferno") -> np.ndarray:
    """An (H, W, 3) uint8 image with `heat` ((h, w), any size) resized to it and blended on top."""
    from matplotlib import colormaps
    from PIL import Image

    h = np.asarray(heat, dtype=np.float64)
    lo, hi = np.nanmin(h), np.nanmax(h)
    h = (h - lo) / (hi - lo) if hi > lo else np.zeros_like(h)
    H, W = image.shape[:2]
    h_img = Image.fromarray((h * 255).astype(np.uint8)).resize((W, H), Image.BILINEAR)
    rgb = colormaps[cmap](np.asarray(h_img) / 255.0)[..., :3] * 255
    return (image.astype(np.float64) * (1 - alpha) + rgb * alpha).clip(0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- results as tables
def probe_rows(matrix: dict[str, Any]) -> list[dict[str, Any]]:
    """ProbeMatrix.to_dict() -> one flat row per (tap, label) with the tap's stream and depth."""
    rows = []
    for r in matrix.get("results", []):
        stream, depth, order = tap_position(r["tap"])
        rows.append({"tap": r["tap"], "label": r["label"], "stream": stream, "depth": depth, "order": order,
                     "metric": r["metric"], "score": r["score_mean"], "score_std": r["score_std"],
                     "control": r.get("control_mean"), "selectivity": r.get("selectivity_mean"),
                     "chance": r.get("chance"), "best_C": r.get("best_C"), "n": r.get("n")})
    return rows


def alignment_runs(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Normalise an alignment results file to {encoder: {config: curve}}.

    Accepts the `fvl align` file ({"results": {encoder: alignment_by_stream(...)}, ...}), a bare
    {encoder: alignment_by_stream(...)}, a single alignment_by_stream result, or an alignment_table
    result ({name: curve}); configs are stream names, "all", "-stream", "control" (`probes.alignment.flatten`)."""
    from probes.alignment import flatten

    def curves(res: Any) -> dict[str, dict[str, Any]]:
        if not isinstance(res, dict):
            return {}
        return {k: v for k, v in flatten(res).items() if isinstance(v, dict) and "eval_loss" in v}

    if not isinstance(data, dict):
        raise ValueError("an alignment results file holds a JSON object")
    if isinstance(data.get("results"), dict):
        data = data["results"]
    if "streams" in data or any(isinstance(v, dict) and "eval_loss" in v for v in data.values()):
        return {"model": curves(data)}
    return {enc: curves(res) for enc, res in data.items() if curves(res)}


def curve_rows(runs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Held-out loss curves as long rows (encoder, config, step, loss)."""
    rows = []
    for enc, configs in runs.items():
        for name, c in configs.items():
            for step, loss in c.get("eval_curve", []):
                rows.append({"encoder": enc, "config": name, "step": int(step), "loss": float(loss)})
    return rows


# --------------------------------------------------------------------------- live mode
LIVE_TAPS = ("vision.stage*", "depth", "prompt.*", "fusion.output")


def live_run(model, processor, image, question: str, max_new_tokens: int = 16) -> dict[str, Any]:
    """Run the model once on one image: every spatial tap (pool none) plus its answer to `question`.

    Returns {"taps": {tap: (h, w, D) grid}, "answer": str, "image": (S, S, 3) uint8 as the model saw it}."""
    import torch

    from workbench.data.images import load_image
    from workbench.taps import capture, resolve

    from model.training.vlm import qa_template

    img = load_image(image)
    template = qa_template(model)  # the question-answering template (plain ignores the question)
    batch = processor(images=[img], questions=[question], template=template)
    names = [n for n in resolve(model, list(LIVE_TAPS)) if not n.startswith("vision.block")]
    with torch.inference_mode(), capture(model, names, pool="none") as cache:
        feats = model.get_image_features(batch["pixel_values"])
    out = model.generate(batch["input_ids"], attention_mask=batch["attention_mask"], image_features=feats,
                         max_new_tokens=max_new_tokens, do_sample=False)
    answer = processor.decode(out[0].tolist(), template=template)
    grids = {}
    for n in names:
        x = cache[n][0].float().numpy()
        try:
            grids[n] = to_grid(x, "none")
        except ValueError:
            continue
    from probes.attribution import to_display_image

    return {"taps": grids, "answer": answer, "image": to_display_image(batch["pixel_values"])}


# --------------------------------------------------------------------------- PCA-as-RGB and differences
def pca_rgb(grids: dict[str, np.ndarray], background: str = "none") -> dict[str, np.ndarray]:
    """The paper's PCA-as-RGB maps with ONE shared PCA for all given (h, w, D) grids (same D), so equal
    colours mean similar features across taps and prompts (`probes.projection.pca_rgb_many`);
    returns {name: (h, w, 3) uint8}."""
    from probes.projection import pca_rgb_many

    if not grids:
        return {}
    return {k: v.rgb for k, v in pca_rgb_many(dict(grids), background=background).items()}


def difference_maps(grids: dict[str, np.ndarray], reference: str, metric: str = "distance") -> dict[str, np.ndarray]:
    """Per-patch change of each (h, w, D) grid from `reference` (`probes.similarity.difference_maps`):
    "distance" = 1 - cosine, "l2" = ||x - r|| / ||r||. With reference = the depth stream V this shows
    where each prompt's encoder pass changed V most."""
    from probes.similarity import difference_maps as _diff

    same = {k: g for k, g in grids.items() if g.shape == grids[reference].shape}
    flat = {k: g.reshape(-1, g.shape[-1]) for k, g in same.items()}
    h, w = grids[reference].shape[:2]
    return _diff(flat, reference=reference, grid=(h, w), metric=metric)


def layout_rows(taps: Sequence[str]) -> list[tuple[str, list[str]]]:
    """Group taps into display rows: one row per depth label (vision stages each alone; depth V sits in
    every prompt row's first column), each row listing its taps in stream order."""
    rows: dict[str, list[str]] = {}
    order: dict[str, int] = {}
    for t in taps:
        stream, depth, o = tap_position(t)
        key = depth if stream not in ("vision", "fusion", "llm") else f"{stream}.{depth}"
        rows.setdefault(key, []).append(t)
        order[key] = min(order.get(key, 10**6), o)
    return [(k, rows[k]) for k in sorted(rows, key=lambda k: order[k])]


def embed_2d(X: np.ndarray, method: str = "umap", n_neighbors: int = 15, seed: int = 0) -> np.ndarray:
    """(n, ...) features -> (n, 2): token maps mean-pooled, standardised, then `probes.projection.embed_2d`
    (UMAP, or PCA)."""
    from model.tokens import to_vectors
    from probes.projection import embed_2d as _embed

    Z = to_vectors(np.asarray(X, dtype=np.float32), has_global=False)
    Z = (Z - Z.mean(0)) / (Z.std(0) + 1e-6)
    return np.asarray(_embed(Z, method=method, seed=seed, n_neighbors=n_neighbors).coords, dtype=np.float64)


def cka_matrix(features: dict[str, np.ndarray]) -> np.ndarray:
    """Linear CKA between every pair of feature sets (rows aligned; token maps mean-pooled first),
    by `probes.similarity.cka_matrix`."""
    from model.tokens import to_vectors
    from probes.similarity import cka_matrix as _cka

    pooled = {k: to_vectors(np.asarray(v, dtype=np.float32), has_global=False).astype(np.float64)
              for k, v in features.items()}
    return np.asarray(_cka(pooled)[1])


def compare_parts(data: Any) -> tuple[dict[str, list[dict]], dict[str, tuple[list[str], list[list[float]]]]]:
    """Split a comparison results file into tables ({name: rows}) and CKA matrices ({name: (labels, matrix)}).

    Accepted: {"tables": {name: rows}, "cka": {name: {"labels": [...], "matrix": [[...]]}}}, a list of
    rows (one table), or {name: rows | {"labels","matrix"}} mixed."""
    tables: dict[str, list[dict]] = {}
    mats: dict[str, tuple[list[str], list[list[float]]]] = {}
    if isinstance(data, list):
        return {"results": [r for r in data if isinstance(r, dict)]}, {}
    if not isinstance(data, dict):
        return {}, {}

    def take(name: str, value: Any) -> None:
        if isinstance(value, list) and value and all(isinstance(r, dict) for r in value):
            tables[name] = value
        elif isinstance(value, dict) and "matrix" in value:
            labels = value.get("labels") or value.get("names") or [str(i) for i in range(len(value["matrix"]))]
            mats[name] = (list(map(str, labels)), value["matrix"])
        elif isinstance(value, dict):
            for k, v in value.items():
                take(f"{name}: {k}" if name else k, v)

    for key, value in data.items():
        if key in ("meta", "columns", "settings"):
            continue  # run metadata, shown separately
        take("" if key in ("tables", "cka") else key, value)
    order = data.get("columns")
    if isinstance(order, list) and "results" in tables:  # `fvl compare` names its column order
        tables["results"] = [{c: r.get(c) for c in order if c in r} | {k: v for k, v in r.items() if k not in order}
                             for r in tables["results"]]
    return tables, mats


def attribution_records(data: Any) -> list[dict[str, Any]]:
    """Records of an attribution file: the demo's {"items": [...]}, or one `fvl attribute` result."""
    if not isinstance(data, dict):
        return []
    if isinstance(data.get("items"), list):
        return [r for r in data["items"] if isinstance(r, dict) and "image" in r]
    if "pixels" in data and "image" in data:
        target = (data.get("pixels") or {}).get("target") or {}
        return [{"id": Path(str(data["image"])).name, "image": data["image"], "question": target.get("question", ""),
                 "answer": target.get("answer", ""), "pixels": data.get("pixels"), "streams": data.get("streams")}]
    return []
