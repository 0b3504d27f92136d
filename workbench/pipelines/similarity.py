"""Similarity maps over a store: CKA between taps, per-item difference and PCA-as-RGB maps, 2-D embeddings.

One library call, `similarity_over_store`, serves `fvl similarity`, the report, the app and the
notebooks. Memory does not grow with the store: CKA and the embeddings read a random sample of at most
``max_rows`` items (said in the result), because linear CKA over n items builds n x n Gram matrices.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from workbench.pipelines.probing import ProbeSetupError, _safe, _split, load_vectors, select_taps

MAX_ROWS = 5000


def sample_items(store, max_rows: int, seed: int = 0) -> tuple[list[str], dict]:
    """All items, or a seeded random sample of ``max_rows`` of them (kept in store order) when there are
    more; with a description of what was used, for the output."""
    items = list(store.items)
    if max_rows < 1:
        raise ProbeSetupError(f"--max-rows {max_rows}: give at least 1 (or a number above the item count)")
    if len(items) <= max_rows:
        return items, {"rows": len(items), "of": len(items), "sampled": False}
    pick = np.sort(np.random.default_rng(seed).choice(len(items), size=max_rows, replace=False))
    return [items[i] for i in pick], {"rows": max_rows, "of": len(items), "sampled": True, "seed": seed}


def pooled_features(store, taps: Sequence[str], items: list[str]) -> dict[str, np.ndarray]:
    """tap -> (n, d) float32 for ``items``, token maps pooled as at capture (`load_vectors`)."""
    return {t: load_vectors(store, t, "mean", items) for t in taps}


def item_maps(store, items: Sequence[str], taps: Sequence[str], reference: str | None, background: str,
              out: Path) -> tuple[dict, list[str]]:
    """Per item: per-patch cosine of every token-map tap against ``reference`` (diff_<item>.png) and the
    PCA-as-RGB maps with one shared PCA (pca_<item>.png). Taps whose width differs from the reference's
    cannot be compared patch by patch: they are left out with a warning, and the rest is still written."""
    from probes import plots
    from probes.projection import pca_rgb_many
    from probes.similarity import difference_maps

    unknown = [i for i in items if i not in store]
    if unknown:
        raise ProbeSetupError(f"--items: {unknown} are not stored items (e.g. {store.items[:3]})")
    maps_taps = [t for t in taps if len(store.tap_shape(t)) == 2]
    if len(maps_taps) < 2:
        raise ProbeSetupError("--items needs at least two token-map taps (N, D); capture with --pool none "
                              f"(tap shapes here: { {t: store.tap_shape(t) for t in taps} })")
    ref = reference or ("depth" if "depth" in maps_taps else maps_taps[0])
    if ref not in maps_taps:
        raise ProbeSetupError(f"--reference {ref}: not one of the token-map taps {maps_taps}")
    shape = store.tap_shape(ref)
    same = [t for t in maps_taps if store.tap_shape(t) == shape]
    left_out = {t: store.tap_shape(t) for t in maps_taps if t not in same}
    warnings = []
    if left_out:
        warnings.append(f"--items: token maps {left_out} differ in shape from the reference {ref!r} {shape}; "
                        "they are left out of the maps (pass --reference or --taps with taps of one width)")
    if len(same) < 2:
        warnings.append(f"--items: no other tap has the reference {ref!r}'s shape {shape}; no maps written")
        return {}, warnings
    entries = {}
    for item in items:
        streams = {t: store.load(t, [item], dtype="float32")[0] for t in same}
        diffs = difference_maps({ref: streams[ref], **{k: v for k, v in streams.items() if k != ref}}, reference=ref)
        plots.save(plots.plot_difference_maps(diffs), out / f"diff_{_safe(item)}.png")
        rgb = pca_rgb_many(streams, background=background)
        plots.save(plots.plot_pca_rgb_grid({item: rgb}), out / f"pca_{_safe(item)}.png")
        entries[item] = {"reference": ref, "taps": same, "mean_cosine": {k: float(v.mean()) for k, v in diffs.items()},
                         "foreground_fraction": {k: float(v.mask.mean()) for k, v in rgb.items()}}
    return entries, warnings


def similarity_over_store(store, out: str | Path, *, taps: str | Sequence[str] | None = None, debiased: bool = False,
                          items: str | Sequence[str] | None = None, reference: str | None = None,
                          background: str = "otsu", embed: str | None = None, method: str = "umap", seed: int = 0,
                          max_rows: int = MAX_ROWS) -> dict:
    """CKA between every pair of ``taps`` (cka.png), optional per-item maps and 2-D embeddings coloured by
    the label ``embed`` (embed_<tap>.png), all written under ``out``; returns the result (similarity.json
    is the caller's to write). ``result["warnings"]`` lists what could not be done and why."""
    from probes import plots
    from probes.similarity import cka_matrix

    tap_names = select_taps(store, taps)
    if len(store.items) < (4 if debiased else 2):
        raise ProbeSetupError(f"--store {store.path}: {len(store.items)} items is too few for CKA")
    if embed and embed not in store.label_names():
        raise ProbeSetupError(f"--embed {embed}: no such label; labels: {sorted(store.label_names())}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows, sample = sample_items(store, max_rows, seed)
    pooled = pooled_features(store, tap_names, rows)
    names, mat = cka_matrix(pooled, debiased=debiased)
    result: dict = {"store": str(store.path), "n": len(store.items), "debiased": debiased,
                    "cka": {"labels": names, "matrix": np.round(mat, 6).tolist(), **sample}, "warnings": []}
    plots.save(plots.plot_cka_matrix(names, mat), out / "cka.png")
    wanted = _split(items)
    if wanted:
        result["items"], warnings = item_maps(store, wanted, tap_names, reference, background, out)
        result["warnings"] += warnings
    if embed:
        from probes.projection import embed_2d

        label = store.labels(rows)[embed]
        result["embed"] = {}
        for t, x in pooled.items():
            e = embed_2d(x, method=method, seed=seed)
            plots.save(plots.plot_embedding(e, labels=label, title=f"{t} ({e.method})"), out / f"embed_{_safe(t)}.png")
            result["embed"][t] = {"method": e.method, "reason": e.reason, **sample}
    return result


def embed_store(store_path: str | Path, taps: Sequence[str], *, method: str = "umap", n_neighbors: int = 15,
                seed: int = 0) -> dict:
    """2-D embeddings (UMAP, or PCA) of the given taps, pooled as at capture, for the app's scatter view:
    {tap: {"ids", "xy", "method", "n_neighbors", "seed"}} for the taps the store holds."""
    from workbench.pipelines.compute import embed_2d
    from workbench.store import FeatureStore

    store = FeatureStore(store_path)
    items = list(store.items)
    out = {}
    for tap, x in pooled_features(store, [t for t in taps if t in store.taps], items).items():
        xy = embed_2d(x, method, n_neighbors=n_neighbors, seed=seed)
        out[tap] = {"ids": items, "xy": np.round(xy, 5).tolist(), "method": method, "n_neighbors": n_neighbors,
                    "seed": seed}
    return out
