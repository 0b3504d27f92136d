"""Low-dimensional views of features: PCA of token maps as RGB images, and 2-D embeddings.

PCA-as-RGB (the Florence-VL paper's Fig. 3, in the DINOv2 manner): the patch tokens of one
image (or of several images / prompt streams, with ONE shared PCA so colours are comparable)
are projected on their principal components.

1. Background removal (``background``):
   * ``"otsu"`` (default): fit PCA over all patch tokens; the first component's scores are
     split by Otsu's threshold (the cut maximising between-class variance of the histogram).
   * ``"zero"``: split PC1 scores at 0 (the DINOv2 recipe).
   * ``"none"``: keep every patch.
   PC1's sign is arbitrary, so it is chosen such that the FOREGROUND IS THE MINORITY side
   (objects usually cover less than half the image); a caller's ``fg_mask`` overrides all this.
2. A second PCA over the foreground tokens only; PCs 1-3 are min-max scaled (over all
   foreground tokens of all maps together) to the R, G, B channels; background is black.

Component signs are made deterministic (largest-magnitude loading positive).

``embed_2d``: UMAP (umap-learn, seeded) of pooled features with a PCA-2D fallback when there
are too few points for a neighbour graph; the result says which method ran and why.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

import numpy as np

from probes.similarity import split_global


@dataclass
class PcaRgb:
    """rgb (h, w, 3) uint8, mask (h, w) bool (True = foreground)."""
    rgb: np.ndarray
    mask: np.ndarray
    explained: list[float]        # variance ratio of the 3 colour PCs (foreground PCA)
    threshold: float | None       # PC1 cut used for the background, None if not used
    rule: str

    def to_dict(self) -> dict:
        d = asdict(self)
        d["rgb"] = self.rgb.tolist()
        d["mask"] = self.mask.tolist()
        return d


def _pca(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-k principal axes of x (m, D): (mean (D,), components (k', D), explained ratio (k',))."""
    mean = x.mean(0)
    c = x - mean
    _, s, vt = np.linalg.svd(c, full_matrices=False)
    k = min(k, vt.shape[0])
    comps = vt[:k]
    # deterministic signs: the largest-magnitude loading of each component is positive
    signs = np.sign(comps[np.arange(k), np.abs(comps).argmax(1)])
    comps = comps * np.where(signs == 0, 1.0, signs)[:, None]
    var = s ** 2
    ratio = var[:k] / var.sum() if var.sum() > 0 else np.zeros(k)
    return mean, comps, ratio


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold: the cut of the histogram maximising the between-class variance."""
    v = np.asarray(values, dtype=np.float64).ravel()
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        return lo
    hist, edges = np.histogram(v, bins=bins, range=(lo, hi))
    centers = 0.5 * (edges[:-1] + edges[1:])
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centers)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = (w0 * w1 * (mu0 - mu1) ** 2)[:-1]
    best = np.flatnonzero(between >= between.max() * (1 - 1e-12))
    # ties (e.g. an empty gap between two clusters) -> the middle of the tied cuts
    return float(0.5 * (edges[best[0] + 1] + edges[best[-1] + 1]))


def _patch_maps(maps: Sequence, grid: tuple[int, int] | None) -> list[np.ndarray]:
    out = []
    for i, m in enumerate(maps):
        a = np.asarray(m, dtype=np.float64)
        if a.ndim == 3:  # already a patch grid (h, w, D)
            out.append(a)
            continue
        if a.ndim != 2:
            raise ValueError(f"map {i}: expected a token map (N, D) or a patch grid (h, w, D), got shape {a.shape}")
        _, p = split_global(a, grid)
        out.append(p)
    dims = {p.shape[-1] for p in out}
    if len(dims) != 1:
        raise ValueError(f"maps have different token widths {sorted(dims)}; a shared PCA needs one width")
    return out


def pca_rgb_many(maps: Sequence | Mapping[str, np.ndarray], grid: tuple[int, int] | None = None,
                 background: str = "otsu", fg_masks: Sequence[np.ndarray] | None = None
                 ) -> list[PcaRgb] | dict[str, PcaRgb]:
    """PCA-as-RGB of several token maps with ONE shared PCA (and shared colour scaling), so
    the same colour means the same feature direction in every image / prompt stream.
    Accepts a list (returns a list) or a dict (returns a dict with the same keys)."""
    if background not in ("otsu", "zero", "none"):
        raise ValueError(f"background={background!r}: use 'otsu', 'zero' or 'none'")
    keys = list(maps) if isinstance(maps, Mapping) else None
    seq = [maps[k] for k in keys] if keys is not None else list(maps)
    if not seq:
        raise ValueError("maps: give at least one token map")
    patches = _patch_maps(seq, grid)
    flat = [p.reshape(-1, p.shape[-1]) for p in patches]
    allt = np.concatenate(flat)
    if not np.all(np.isfinite(allt)):
        raise ValueError("maps contain NaN or inf")
    sizes = [f.shape[0] for f in flat]
    threshold = None
    if fg_masks is not None:
        if len(fg_masks) != len(patches):
            raise ValueError(f"fg_masks: {len(fg_masks)} masks for {len(patches)} maps")
        fg = np.concatenate([np.asarray(m, dtype=bool).reshape(-1) for m in fg_masks])
        if fg.shape[0] != allt.shape[0]:
            raise ValueError("fg_masks: each mask must have the (h, w) shape of its map")
        rule = "foreground given by fg_masks"
    elif background == "none":
        fg = np.ones(allt.shape[0], dtype=bool)
        rule = "no background removal"
    else:
        mean, comps, _ = _pca(allt, 1)
        s = (allt - mean) @ comps[0]
        thr = otsu_threshold(s) if background == "otsu" else 0.0
        fg = s > thr
        if fg.mean() > 0.5:  # orient PC1 so the foreground is the minority side
            fg = s < thr
        threshold = float(thr)
        rule = (f"PC1 of all patch tokens cut at {'Otsu' if background == 'otsu' else 'zero'} "
                f"({thr:.4g}); sign chosen so the foreground is the minority")
    if not fg.any():
        fg = np.ones_like(fg)
        rule += "; no foreground found, all patches kept"
    mean, comps, ratio = _pca(allt[fg], 3)
    proj = np.zeros((allt.shape[0], 3))
    proj[:, :comps.shape[0]] = (allt - mean) @ comps.T
    lo = proj[fg].min(0)
    hi = proj[fg].max(0)
    scaled = (proj - lo) / np.where(hi > lo, hi - lo, 1.0)
    rgb_all = np.clip(np.round(scaled * 255.0), 0, 255).astype(np.uint8)
    rgb_all[~fg] = 0
    results = []
    start = 0
    for p, size in zip(patches, sizes):
        h, w = p.shape[:2]
        sl = slice(start, start + size)
        results.append(PcaRgb(rgb=rgb_all[sl].reshape(h, w, 3), mask=fg[sl].reshape(h, w),
                              explained=[float(r) for r in ratio] + [0.0] * (3 - len(ratio)),
                              threshold=threshold, rule=rule))
        start += size
    return dict(zip(keys, results)) if keys is not None else results


def pca_rgb(tokens, grid: tuple[int, int] | None = None, background: str = "otsu",
            fg_mask: np.ndarray | None = None) -> PcaRgb:
    """PCA-as-RGB of one token map (N, D) (global token dropped) or patch grid (h, w, D)."""
    return pca_rgb_many([tokens], grid, background, None if fg_mask is None else [fg_mask])[0]


# --------------------------------------------------------------------------- 2-D embeddings
@dataclass
class Embedding:
    coords: np.ndarray            # (n, 2)
    method: str                   # "umap" or "pca"
    reason: str
    params: dict

    def to_dict(self) -> dict:
        d = asdict(self)
        d["coords"] = self.coords.tolist()
        return d


def embed_2d(X, method: str = "umap", seed: int = 0, n_neighbors: int = 15, min_dist: float = 0.1,
             metric: str = "euclidean", pre_pca: int | None = 50) -> Embedding:
    """2-D embedding of pooled features X (n, d).

    ``method="umap"``: umap-learn with ``random_state=seed`` (deterministic, single-threaded),
    after an optional PCA to ``pre_pca`` dims (usual practice: faster, less noise). Falls back
    to PCA-2D when n < n_neighbors + 2 (no meaningful neighbour graph), saying so in ``reason``.
    ``method="pca"``: PCA-2D directly."""
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2:
        raise ValueError(f"X: expected pooled features (n, d), got shape {X.shape}")
    if X.shape[0] < 3:
        raise ValueError(f"X: need at least 3 points to embed, got {X.shape[0]}")
    if not np.all(np.isfinite(X)):
        raise ValueError("X contains NaN or inf")
    if method not in ("umap", "pca"):
        raise ValueError(f"method={method!r}: use 'umap' or 'pca'")
    n = X.shape[0]
    if method == "pca" or n < n_neighbors + 2:
        reason = ("PCA requested" if method == "pca" else
                  f"PCA-2D fallback: n={n} points is too few for UMAP with n_neighbors={n_neighbors} "
                  f"(need >= {n_neighbors + 2})")
        mean, comps, ratio = _pca(X, 2)
        coords = np.zeros((n, 2))
        coords[:, :comps.shape[0]] = (X - mean) @ comps.T
        return Embedding(coords, "pca", reason, {"explained": [float(r) for r in ratio]})
    import umap  # heavy (numba); imported only when used

    Z = X
    if pre_pca and X.shape[1] > pre_pca:
        mean, comps, _ = _pca(X, pre_pca)
        Z = (X - mean) @ comps.T
    # a seeded UMAP runs single-threaded anyway; saying n_jobs=1 avoids its warning about overriding n_jobs
    reducer = umap.UMAP(n_components=2, n_neighbors=n_neighbors, min_dist=min_dist, metric=metric, random_state=seed,
                        n_jobs=1 if seed is not None else -1)
    coords = np.asarray(reducer.fit_transform(Z), dtype=np.float64)
    return Embedding(coords, "umap", f"UMAP on {Z.shape[1]} dims",
                     {"n_neighbors": n_neighbors, "min_dist": min_dist, "metric": metric, "seed": seed,
                      "pre_pca": pre_pca if Z is not X else None})
