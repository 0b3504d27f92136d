"""Matplotlib figures shared by the app, the CLI and the notebooks.

Every ``plot_*`` function takes plain data (the analyses' results, their ``to_dict()`` form, or
arrays) and returns a ``matplotlib.figure.Figure`` drawn on an Agg canvas. pyplot is never
used, so there is no global figure state (safe inside Streamlit and threads) and nothing here
changes the caller's backend; ``save(fig, path)`` writes any format matplotlib supports.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def _figure(w: float, h: float) -> Figure:
    fig = Figure(figsize=(w, h), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _plain(obj: Any) -> Any:
    return obj.to_dict() if hasattr(obj, "to_dict") else obj


def save(fig: Figure, path: str | Path, dpi: int = 150) -> Path:
    """Write ``fig`` to ``path`` (format from the suffix; parent folders created), atomically: a reader
    never sees half a figure, and a failed write leaves the old file."""
    from workbench.data.files import atomic_path

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(p) as tmp:
        fig.savefig(tmp, dpi=dpi, format=p.suffix.lstrip(".").lower() or "png")
    return p


def _annotated_heatmap(ax, mat: np.ndarray, rows: Sequence[str], cols: Sequence[str], texts=None,
                       cmap: str = "viridis", vmin=None, vmax=None, cbar_label: str = ""):
    im = ax.imshow(mat, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(cols)), labels=[str(c) for c in cols], rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), labels=[str(r) for r in rows])
    if texts is not None:
        lo = np.nanmin(mat) if vmin is None else vmin
        hi = np.nanmax(mat) if vmax is None else vmax
        mid = (lo + hi) / 2 if np.isfinite(lo) and np.isfinite(hi) else 0
        for i in range(mat.shape[0]):
            for j in range(mat.shape[1]):
                if texts[i][j]:
                    color = "white" if np.isfinite(mat[i, j]) and mat[i, j] < mid else "black"
                    ax.text(j, i, texts[i][j], ha="center", va="center", fontsize=8, color=color)
    ax.figure.colorbar(im, ax=ax, label=cbar_label)
    return im


# --------------------------------------------------------------------------- probes
def plot_probe_matrix(matrix: Any, field: str = "score_mean") -> Figure:
    """Taps x labels heatmap of probe scores, each cell annotated 'score / sel' (selectivity)."""
    d = _plain(matrix)
    taps, labels = d["taps"], d["labels"]
    by = {(r["tap"], r["label"]): r for r in d["results"]}
    mat = np.full((len(taps), len(labels)), np.nan)
    texts = [["" for _ in labels] for _ in taps]
    for i, t in enumerate(taps):
        for j, lab in enumerate(labels):
            r = by.get((t, lab))
            if r is None or r.get(field) is None:
                continue
            mat[i, j] = r[field]
            sel = r.get("selectivity_mean")
            texts[i][j] = f"{r[field]:.2f}" + (f"\nsel {sel:+.2f}" if sel is not None else "")
    fig = _figure(1.6 + 1.1 * len(labels), 1.2 + 0.55 * len(taps))
    ax = fig.add_subplot()
    metrics = sorted({r["metric"] for r in d["results"]})
    _annotated_heatmap(ax, mat, taps, labels, texts, vmin=0.0 if field == "score_mean" else None,
                       vmax=1.0 if field == "score_mean" else None, cbar_label=" / ".join(metrics))
    ax.set_title(f"linear probes ({field}; sel = score - control)")
    return fig


def plot_regularisation_curve(results: Any | Sequence[Any]) -> Figure:
    """Probe score vs C (log axis), mean +- sd over folds, control task dashed, chosen C marked.
    ``results``: one ProbeResult (or its dict) or several."""
    items = [_plain(r) for r in (results if isinstance(results, (list, tuple)) else [results])]
    fig = _figure(6, 4)
    ax = fig.add_subplot()
    for r in items:
        Cs = np.asarray(r["Cs"])
        m, s = np.asarray(r["curve_mean"]), np.asarray(r["curve_std"])
        line, = ax.plot(Cs, m, marker="o", label=f"{r['tap']} / {r['label']}")
        ax.fill_between(Cs, m - s, m + s, color=line.get_color(), alpha=0.2)
        if r.get("control_curve_mean") is not None:
            ax.plot(Cs, r["control_curve_mean"], ls="--", color=line.get_color(), alpha=0.8)
        ax.axvline(r["best_C"], color=line.get_color(), ls=":", alpha=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("C (inverse L2 strength)")
    ax.set_ylabel(items[0]["metric"] if items else "score")
    ax.set_title("regularisation sweep (dashed: control task; dotted: chosen C)")
    ax.legend(fontsize=8)
    return fig


def plot_confusion(result: Any = None, *, matrix=None, classes: Sequence[str] | None = None,
                   normalize: bool = True) -> Figure:
    """Confusion matrix (rows true, columns predicted) of a classification ProbeResult, or of
    ``matrix`` with ``classes``; ``normalize`` shows row fractions, counts annotated."""
    if result is not None:
        r = _plain(result)
        matrix, classes = r.get("confusion"), r.get("classes")
        if matrix is None:
            raise ValueError(f"probe {r.get('tap')}/{r.get('label')} is a regression probe; it has no confusion matrix")
    cm = np.asarray(matrix, dtype=np.float64)
    classes = [str(c) for c in (classes if classes is not None else range(cm.shape[0]))]
    shown = cm / np.maximum(cm.sum(1, keepdims=True), 1) if normalize else cm
    texts = [[f"{int(cm[i, j])}" for j in range(cm.shape[1])] for i in range(cm.shape[0])]
    n = len(classes)
    fig = _figure(2.2 + 0.5 * n, 1.8 + 0.45 * n)
    ax = fig.add_subplot()
    _annotated_heatmap(ax, shown, classes, classes, texts if n <= 25 else None, cmap="Blues",
                       vmin=0, vmax=1 if normalize else None, cbar_label="row fraction" if normalize else "count")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion (chosen C, pooled over folds)")
    return fig


def plot_cka_matrix(names: Sequence[str], matrix) -> Figure:
    """Pairwise CKA as an annotated heatmap (0..1)."""
    mat = np.asarray(matrix, dtype=np.float64)
    texts = [[f"{v:.2f}" for v in row] for row in mat] if len(names) <= 20 else None
    fig = _figure(2.0 + 0.6 * len(names), 1.6 + 0.5 * len(names))
    ax = fig.add_subplot()
    _annotated_heatmap(ax, mat, names, names, texts, cmap="magma", vmin=0, vmax=1, cbar_label="linear CKA")
    ax.set_title("representation similarity (CKA)")
    return fig


# --------------------------------------------------------------------------- maps
def _rgb_of(cell: Any) -> np.ndarray:
    if hasattr(cell, "rgb"):
        return np.asarray(cell.rgb)
    if isinstance(cell, Mapping) and "rgb" in cell:
        return np.asarray(cell["rgb"], dtype=np.uint8)
    return np.asarray(cell)


def plot_pca_rgb_grid(grid: Sequence[Sequence[Any]] | Mapping[str, Mapping[str, Any]],
                      row_names: Sequence[str] | None = None, col_names: Sequence[str] | None = None,
                      images: Sequence[Any] | None = None) -> Figure:
    """Grid of PCA-RGB maps: rows are images, columns taps or prompt streams. Cells are PcaRgb
    results, their dicts, or (h, w, 3) arrays; ``images`` (one per row) adds the input image
    as a first column."""
    if isinstance(grid, Mapping):
        row_names = list(grid) if row_names is None else row_names
        col_names = list(next(iter(grid.values()))) if col_names is None else col_names
        cells = [[grid[r][c] for c in col_names] for r in row_names]
    else:
        cells = [list(row) for row in grid]
    n_rows = len(cells)
    n_cols = max(len(r) for r in cells) + (1 if images is not None else 0)
    fig = _figure(1.9 * n_cols, 1.9 * n_rows + 0.3)
    axes = np.atleast_2d(fig.subplots(n_rows, n_cols, squeeze=False))
    for i, row in enumerate(cells):
        offset = 0
        if images is not None:
            axes[i, 0].imshow(np.asarray(images[i]))
            offset = 1
            if i == 0:
                axes[i, 0].set_title("image", fontsize=9)
        for j, cell in enumerate(row):
            axes[i, j + offset].imshow(_rgb_of(cell), interpolation="nearest")
            if i == 0 and col_names is not None and j < len(col_names):
                axes[i, j + offset].set_title(str(col_names[j]), fontsize=9)
        if row_names is not None and i < len(row_names):
            axes[i, 0].set_ylabel(str(row_names[i]), fontsize=9)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("PCA of patch tokens as RGB (shared PCA; background black)", fontsize=10)
    return fig


def plot_difference_maps(maps: Mapping[str, np.ndarray], image: Any | None = None, metric: str = "cosine",
                         vmin: float | None = None, vmax: float | None = None) -> Figure:
    """One panel per stream: the per-patch similarity (or distance) to the reference stream,
    all panels on one colour scale; an optional input image first."""
    names = list(maps)
    arrs = [np.asarray(maps[k], dtype=np.float64) for k in names]
    lo = min(float(np.nanmin(a)) for a in arrs) if vmin is None else vmin
    hi = max(float(np.nanmax(a)) for a in arrs) if vmax is None else vmax
    n = len(names) + (1 if image is not None else 0)
    fig = _figure(2.3 * n + 0.8, 2.6)
    axes = fig.subplots(1, n, squeeze=False)[0]
    k = 0
    if image is not None:
        axes[0].imshow(np.asarray(image))
        axes[0].set_title("image", fontsize=9)
        k = 1
    im = None
    for name, a in zip(names, arrs):
        im = axes[k].imshow(a, cmap="coolwarm_r" if metric == "cosine" else "magma", vmin=lo, vmax=hi)
        axes[k].set_title(name, fontsize=9)
        k += 1
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(im, ax=list(axes), label=metric, shrink=0.8)
    return fig


def plot_embedding(coords: Any, labels: Sequence | np.ndarray | None = None, title: str | None = None,
                   max_categories: int = 20) -> Figure:
    """2-D scatter (UMAP / PCA) coloured by label: a categorical legend for strings or few
    distinct values, a colour bar for continuous values. ``coords``: (n, 2) or an Embedding."""
    method = None
    if hasattr(coords, "coords"):
        method = coords.method
        coords = coords.coords
    elif isinstance(coords, Mapping):
        method = coords.get("method")
        coords = coords["coords"]
    xy = np.asarray(coords, dtype=np.float64)
    fig = _figure(5.5, 4.5)
    ax = fig.add_subplot()
    if labels is None:
        ax.scatter(xy[:, 0], xy[:, 1], s=8)
    else:
        lab = np.asarray(labels)
        if lab.shape[0] != xy.shape[0]:
            raise ValueError(f"labels: {lab.shape[0]} values for {xy.shape[0]} points")
        uniq = np.unique(lab.astype(str))
        categorical = lab.dtype.kind in "OUSb" or (lab.dtype.kind in "iu" and uniq.size <= max_categories)
        if categorical:
            from matplotlib import colormaps

            colors = colormaps["tab20" if uniq.size > 10 else "tab10"]
            for i, u in enumerate(uniq[:max_categories]):
                m = lab.astype(str) == u
                ax.scatter(xy[m, 0], xy[m, 1], s=8, color=colors(i % colors.N), label=u)
            rest = ~np.isin(lab.astype(str), uniq[:max_categories])
            if rest.any():
                ax.scatter(xy[rest, 0], xy[rest, 1], s=8, color="lightgrey", label="other")
            ax.legend(fontsize=7, markerscale=2, loc="best")
        else:
            sc = ax.scatter(xy[:, 0], xy[:, 1], s=8, c=lab.astype(np.float64), cmap="viridis")
            fig.colorbar(sc, ax=ax)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title or (f"{method.upper()} of pooled features" if method else "2-D embedding"))
    return fig


plot_umap = plot_embedding


# --------------------------------------------------------------------------- other results
def plot_shapley(result: Any) -> Figure:
    """Bar chart of Shapley values per player, with v(empty) and v(all) in the title."""
    r = _plain(result)
    players = list(r["values"])
    vals = np.array([r["values"][p] for p in players])
    fig = _figure(1.5 + 0.9 * len(players), 3.6)
    ax = fig.add_subplot()
    colors = ["tab:blue" if v >= 0 else "tab:red" for v in vals]
    ax.bar(range(len(players)), vals, color=colors)
    ax.set_xticks(range(len(players)), labels=players, rotation=30, ha="right")
    for i, v in enumerate(vals):
        ax.text(i, v, f"{v:+.3f}", ha="center", va="bottom" if v >= 0 else "top", fontsize=8)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_ylabel("Shapley value")
    ax.set_title(f"stream contributions: v(none)={r['empty']:.3f} -> v(all)={r['full']:.3f}", fontsize=10)
    return fig


def plot_loss_curves(curves: Mapping[str, Sequence[float]], log_y: bool = False, xlabel: str = "step",
                     ylabel: str = "loss") -> Figure:
    """One line per name, e.g. the alignment loss per encoder or stream."""
    fig = _figure(6, 4)
    ax = fig.add_subplot()
    for name, ys in curves.items():
        ys = np.asarray(ys, dtype=np.float64)
        ax.plot(np.arange(1, ys.size + 1), ys, label=str(name))
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    return fig


def plot_attribution_overlay(image: Any, heatmap, alpha: float = 0.5, cmap: str = "jet",
                             title: str | None = None) -> Figure:
    """The image with a (h, w) attribution map stretched over it (any resolution) at ``alpha``."""
    img = np.asarray(image)
    hm = np.asarray(heatmap, dtype=np.float64)
    if hm.ndim != 2:
        raise ValueError(f"heatmap: expected a 2-D map (h, w), got shape {hm.shape}")
    H, W = img.shape[:2]
    fig = _figure(4.5, 4.5 * H / max(W, 1) + 0.4)
    ax = fig.add_subplot()
    ax.imshow(img, extent=(0, W, H, 0))
    im = ax.imshow(hm, cmap=cmap, alpha=alpha, extent=(0, W, H, 0), interpolation="bilinear")
    fig.colorbar(im, ax=ax, shrink=0.8)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title)
    return fig


def plot_pck_bars(results: Mapping[str, Any], keys: Sequence[str] = ("pck", "pck_flip")) -> Figure:
    """Grouped bars of heatmap-probe PCK per feature source (tap / stream), with the untrained
    head's PCK as a grey reference. Values may be result dicts or plain floats (PCK)."""
    names = list(results)
    fig = _figure(1.8 + 1.0 * len(names), 3.8)
    ax = fig.add_subplot()
    rows = {}
    for nm in names:
        r = results[nm]
        rows[nm] = {"pck": float(r)} if np.isscalar(r) else dict(r)
    present = [k for k in keys if any(k in rows[nm] for nm in names)]
    has_untrained = any("untrained" in rows[nm] for nm in names)
    width = 0.8 / (len(present) + int(has_untrained))
    x = np.arange(len(names))
    for i, k in enumerate(present):
        vals = [rows[nm].get(k, np.nan) for nm in names]
        ax.bar(x + i * width, vals, width, label=k)
    if has_untrained:
        vals = [rows[nm].get("untrained", {}).get("pck", np.nan) for nm in names]
        ax.bar(x + len(present) * width, vals, width, label="untrained", color="lightgrey")
    ax.set_xticks(x + width * (len(present) + int(has_untrained) - 1) / 2, labels=names, rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("PCK")
    ax.set_title("heatmap probe: localisation (PCK)")
    ax.legend(fontsize=8)
    return fig
