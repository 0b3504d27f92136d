"""Cheap measures of an encoder, computed from stored features only (no LLM training needed).

Why: training the VLM is what costs; if a measure of the encoder's features alone ranks the variants as their
VQA accuracy does, a researcher can choose an encoder before paying for that training. Per (variant, seed):

    alignment        the paper's vision-language alignment loss (`probes.alignment`) of the variant's streams
                     (channel concat, mean-pooled) against ONE fixed text side for every variant; lower is better
    probe            mean linear-probe accuracy (`probes.linear`, grouped CV) over the configured scene labels
    correspondence   how often an object's features in one augmented view are nearest (cosine) to the same
                     object's features in the other view, among all objects of the split (`views.py`); chance
                     is 1 / (number of objects)

and, for the paper's Fig. 5, the alignment loss of the full variant with each stream left out. The measures'
own randomness (probe folds, the alignment head's initialisation and split) follows the run's seed.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from model.loading import load_model
from model.tokens import to_vectors
from model.training.checkpoints import FINAL_DIR
from probes.alignment import alignment_by_stream, alignment_curve, text_features
from probes.linear import probe_matrix
from workbench.data.dataset import load_scenes
from workbench.data.files import atomic_write_json
from workbench.pipelines.compare.config import CompareConfig, Variant, fingerprint
from workbench.pipelines.compare.variants import RESULT_FILE, Context, read_json, seed_dir, store_dirs
from workbench.pipelines.compare.views import load_views
from workbench.store import FeatureStore

MEASURES_FILE = "measures.json"


def text_side(ctx: Context, items: list[str]) -> np.ndarray:
    """Mean-pooled last-layer text features of each item's caption from ONE text model for every variant and
    seed (so the loss compares vision features only): the reference variant's LLM trained with the first seed."""
    a = ctx.cfg.align
    ref = ctx.cfg.variant(a["reference"])
    ref_dir = seed_dir(ctx.out, ref, ctx.cfg.seeds[0])
    settings = {"caption": a["caption"], "items": list(items), "reference": read_json(ref_dir / RESULT_FILE)["fingerprint"]}
    path = ctx.out / "text_features.npz"
    if path.is_file():
        with np.load(path) as z:
            if str(z["fingerprint"]) == fingerprint(settings):
                return z["features"]
    key = "detailed_caption" if a["caption"] == "detailed" else "caption"
    by_id = {r["id"]: r[key] for r in load_scenes(ctx.data_dir)}
    model, processor = load_model(ref_dir / "finetune" / FINAL_DIR, device=ctx.device)
    feats = text_features([by_id[i] for i in items], model, processor=processor)
    np.savez(path, features=feats, fingerprint=np.array(fingerprint(settings)))
    return feats


def _streams(store: FeatureStore, v: Variant) -> dict[str, np.ndarray]:
    out = {"depth": to_vectors(store.load("depth", dtype=np.float32))}
    for p in v.prompts:
        out[p] = to_vectors(store.load(f"prompt.{p}", dtype=np.float32))
    return out


def _align_kwargs(cfg: CompareConfig, seed: int) -> dict:
    a = cfg.align
    return dict(steps=a["steps"], batch_size=a["batch_size"], lr=a["lr"], held_out=a["held_out"], seed=seed)


def _probe_accuracy(cfg: CompareConfig, store: FeatureStore, seed: int) -> tuple[float, dict]:
    p = cfg.probe
    labels = store.labels()
    feats = {tap: to_vectors(store.load(tap, dtype=np.float32)) for tap in p["taps"]}
    matrix = probe_matrix(feats, {lab: labels[lab] for lab in p["labels"]}, groups=np.asarray(store.items),
                          Cs=p["Cs"], n_folds=p["folds"], select=p["select"], seed=seed, progress=False)
    per = {f"{r['tap']}|{r['label']}": round(float(r["score_mean"]), 4) for r in matrix.to_dict()["results"]}
    return float(np.mean(list(per.values()))), per


def _object_descriptors(tokens: np.ndarray, boxes: list, size: int) -> dict[int, np.ndarray]:
    """Per object (index into the scene's objects), its features: the token map averaged with weights = the
    share of each grid cell that the object's box covers. `tokens` is (N, C) with the global token first."""
    grid = tokens[1:]
    side = int(round(np.sqrt(len(grid))))
    if side * side != len(grid):
        raise ValueError(f"views store holds {len(tokens)} tokens per image; expected a square grid plus a global "
                         "token")
    cell = size / side
    edges = np.arange(side + 1) * cell
    out = {}
    for k, box in enumerate(boxes):
        if box is None:
            continue
        x0, y0, x1, y1 = box
        wx = np.clip(np.minimum(edges[1:], x1) - np.maximum(edges[:-1], x0), 0, None)
        wy = np.clip(np.minimum(edges[1:], y1) - np.maximum(edges[:-1], y0), 0, None)
        w = np.outer(wy, wx).reshape(-1)
        if w.sum() > 0:
            out[k] = (w[:, None] * grid).sum(0) / w.sum()
    return out


def channel_layout(feats: np.ndarray, n_streams: int) -> np.ndarray:
    """Token-concatenated `fusion.input` (n, K*M, C), K streams of M tokens each, rearranged to the channel
    layout (n, M, K*C) of channel fusion, so a token's streams sit side by side as in the paper's DBFusion and
    the correspondence score reads the same grid for every fusion mode."""
    if n_streams <= 1:
        return feats
    n, tokens, width = feats.shape
    if tokens % n_streams:
        raise ValueError(f"fusion.input holds {tokens} tokens per image, not {n_streams} equal streams")
    per = tokens // n_streams
    return feats.reshape(n, n_streams, per, width).transpose(0, 2, 1, 3).reshape(n, per, n_streams * width)


def correspondence(feats: np.ndarray, items: list[str], boxes: dict[str, dict], size: int) -> tuple[float, float, int]:
    """(score, chance, number of objects): the share of objects whose features in view a are nearest (cosine,
    channels standardised) to their own features in view b, and b to a, among ALL objects of all scenes visible
    in both views. Matching within one scene (2-4 objects) was tried first and measured uninformative: colour
    alone tells a scene's objects apart, so random towers scored as high as trained ones (docs/compare.md).

    `feats` (n, N, C): token maps of the views named `items` (`<scene>_a.png`, `<scene>_b.png`)."""
    row = {item: i for i, item in enumerate(items)}
    a_list, b_list = [], []
    for scene, entry in boxes.items():
        da = _object_descriptors(feats[row[f"{scene}_a.png"]], entry["a"], size)
        db = _object_descriptors(feats[row[f"{scene}_b.png"]], entry["b"], size)
        for k in sorted(set(da) & set(db)):
            a_list.append(da[k])
            b_list.append(db[k])
    n = len(a_list)
    if n < 2:
        return float("nan"), float("nan"), n
    a, b = np.stack(a_list), np.stack(b_list)
    both = np.concatenate([a, b])
    mu, sd = both.mean(0), both.std(0) + 1e-6
    a, b = (a - mu) / sd, (b - mu) / sd
    a /= np.linalg.norm(a, axis=1, keepdims=True) + 1e-9
    b /= np.linalg.norm(b, axis=1, keepdims=True) + 1e-9
    sim = a @ b.T
    hits = 0.5 * ((sim.argmax(1) == np.arange(n)).mean() + (sim.argmax(0) == np.arange(n)).mean())
    return float(hits), 1.0 / n, n


def measure_variant_seed(ctx: Context, v: Variant, seed: int, text: np.ndarray, items: list[str],
                         with_streams: bool) -> dict:
    """All cheap measures of one (variant, seed), cached in its directory as measures.json."""
    cfg = ctx.cfg
    sdir = seed_dir(ctx.out, v, seed)
    settings = {"align": cfg.align, "probe": cfg.probe, "measures": cfg.measures, "seed": seed,
                "text": fingerprint(text.tobytes().hex()),
                "run": read_json(sdir / RESULT_FILE)["fingerprint"], "streams": with_streams,
                "correspondence": "all objects"}  # the matching rule: results of another rule are not reused
    old = read_json(sdir / MEASURES_FILE)
    if old is not None and old.get("fingerprint") == fingerprint(settings):
        return old
    ctx.stage(v.name, seed, "cheap measures")
    store_dir, views_dir_ = store_dirs(cfg, ctx.out, v, seed)
    store = FeatureStore(store_dir)
    if list(store.items) != list(items):
        raise RuntimeError(f"variant {v.name} seed {seed}: its store holds other items than the reference; "
                           "rerun with --force")
    feats = _streams(store, v)
    kw = _align_kwargs(cfg, seed)
    fig5 = None
    if with_streams and len(feats) > 1:
        fig5 = alignment_by_stream(feats, text, single=False, leave_one_out=True, **kw)
        curve = fig5["all"]
        fig5 = {"all": curve["eval_loss"], "without": {s: r["eval_loss"] for s, r in fig5["without"].items()}}
    else:
        curve = alignment_curve(np.concatenate(list(feats.values()), axis=1), text, **kw)
    probe, per_label = _probe_accuracy(cfg, store, seed)
    views = FeatureStore(views_dir_)
    grid = channel_layout(views.load("fusion.input", dtype=np.float32), len(v.streams) if v.fusion == "token" else 1)
    score, chance, n_obj = correspondence(grid, list(views.items),
                                          load_views(ctx.views_dir), int(cfg.data["image_size"]))
    record = {"fingerprint": fingerprint(settings), "alignment": curve["eval_loss"],
              "alignment_chance": curve["chance"], "alignment_curve": curve["eval_curve"], "probe": probe,
              "probe_by_label": per_label, "correspondence": score, "correspondence_chance": chance,
              "correspondence_objects": n_obj, "fig5": fig5}
    atomic_write_json(sdir / MEASURES_FILE, record)
    return record


def views_dir(out: Path) -> Path:
    return out / "views"
