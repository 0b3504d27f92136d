"""UMAP scatter of one tap's pooled features, coloured by any label; thumbnails on hover and on selection.

Reads RUN/project/umap.json when the demo wrote it; otherwise embeds live (UMAP's first call in a
process compiles numba code for ~20-30 s; the result is cached). PCA is offered as the instant view."""
from __future__ import annotations

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st

from workbench.app_views import cache
from workbench.pipelines import compute
from workbench.app_views.context import AppConfig


@st.cache_data(show_spinner=False, max_entries=16)
def _embed(path: str, version: float, tap: str, method: str, n_neighbors: int) -> np.ndarray:
    X = cache.load_tap(path, version, tap)
    return compute.embed_2d(X, method=method, n_neighbors=n_neighbors)


def render(cfg: AppConfig) -> None:
    st.header("Embedding of the store")
    if cfg.store is None:
        st.info("Open a store to embed its features.")
        return
    path = str(cfg.store)
    version = cache.store_version(path)
    s = cache.store(path)
    labels = cache.labels_table(path, version)
    label_names = [n for n in labels if n != "id"]
    saved = cfg.run_dir / "project" / "umap.json" if cfg.run_dir else None
    saved_data = cache.results(saved) if saved is not None and saved.is_file() else {}
    taps = [t for t in s.taps if not t.startswith("llm.")] or s.taps
    c1, c2, c3, c4 = st.columns(4)
    default_tap = next((t for t in saved_data if t in taps), "fusion.output" if "fusion.output" in taps else taps[-1])
    tap = c1.selectbox("tap", taps, index=taps.index(default_tap), key="umap_tap")
    colour = c2.selectbox("colour by", label_names, index=label_names.index("main_color") if "main_color" in label_names else 0,
                          key="umap_colour")
    method = c3.radio("method", ["UMAP", "PCA"], horizontal=True, key="umap_method")
    n_neighbors = c4.slider("neighbours", 5, 50, 15, key="umap_nn", disabled=method != "UMAP")
    rec = saved_data.get(tap)
    if (rec and rec.get("method", "umap") == method.lower() and rec.get("ids") == list(s.items)
            and (method == "PCA" or int(rec.get("n_neighbors", n_neighbors)) == n_neighbors)):
        xy = np.asarray(rec["xy"])
        st.caption(f"precomputed: {saved}")
    else:
        with st.spinner(f"{method} of {len(s)} items x {tap} (cached after the first time)..."):
            xy = _embed(path, version, tap, method.lower(), n_neighbors)
    df = pd.DataFrame({"id": labels["id"], "x": xy[:, 0], "y": xy[:, 1]})
    for n in label_names:
        df[n] = [str(v) for v in labels[n]]
    paths, _ = cache.confined_images(cfg, tuple(s.items))
    tooltip = ["id", colour] + [n for n in label_names if n != colour][:3]
    if paths and len(df) <= 3000:  # vega-tooltip draws a field named `image` as a picture
        df["image"] = [cache.thumbnail_url(paths[i]) if i in paths else "" for i in df["id"]]
        tooltip = ["image"] + tooltip
    pick = alt.selection_point(fields=["id"], name="points", on="click")
    brush = alt.selection_interval(name="brush")
    values = sorted(set(df[colour]))
    from matplotlib.colors import is_color_like

    # labels that are colour names (main_color) are drawn in their own colour
    scale = alt.Scale(domain=values, range=values) if all(is_color_like(v) for v in values) else alt.Scale()
    chart = alt.Chart(df).mark_circle(size=70, opacity=0.85).encode(
        x=alt.X("x:Q", title=f"{method} 1", scale=alt.Scale(zero=False)),
        y=alt.Y("y:Q", title=f"{method} 2", scale=alt.Scale(zero=False)),
        color=alt.Color(f"{colour}:N", legend=alt.Legend(title=colour), scale=scale), tooltip=tooltip,
    ).add_params(pick, brush).properties(height=480)
    event = st.altair_chart(chart, on_select="rerun", key="umap_chart", width="stretch")
    sel = getattr(event, "selection", None) or {}
    chosen = [p["id"] for p in sel.get("points", []) if "id" in p]
    box = sel.get("brush") or {}
    if box.get("x") and box.get("y"):
        (x0, x1), (y0, y1) = box["x"], box["y"]
        chosen += list(df[(df.x.between(x0, x1)) & (df.y.between(y0, y1))]["id"])
    if chosen:
        chosen = list(dict.fromkeys(chosen))[:24]
        st.markdown(f"**{len(chosen)} selected**")
        cols = st.columns(8)
        for k, item in enumerate(chosen):
            row = df[df.id == item].iloc[0]
            thumb, why = cache.thumbnail_or_reason(paths[item], 128) if item in paths else (None, "no image")
            if thumb is not None:
                cols[k % 8].image(thumb, caption=f"{item}\n{colour}={row[colour]}", width="stretch")
            else:
                cols[k % 8].write(f"{item}: {colour}={row[colour]}")
    else:
        st.caption("Hover a point for its image; click or drag a box to show thumbnails here.")
