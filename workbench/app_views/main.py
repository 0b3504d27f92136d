"""The Streamlit app: a sidebar to pick the store and the view, then one view at a time.

Run with `fvl app --store DIR` or `streamlit run app.py -- --store DIR [--root DIR]`. Every view is
a `render(cfg)` function in its own module of this package; `main(argv)` is the whole script.
"""
from __future__ import annotations

import sys

import streamlit as st

from workbench.store import StoreError

TITLE = "Florence-VL workbench"
VIEWS = ("Overview", "Feature maps", "Probe matrix", "Alignment", "Attribution", "Embedding (UMAP)",
         "Compare encoders", "Live model")


def _view(name: str):
    from workbench.app_views import (alignment_view, attribution_view, compare_view, feature_maps_view, live_view,
                                     overview, probe_view, umap_view)

    return {"Overview": overview, "Feature maps": feature_maps_view, "Probe matrix": probe_view,
            "Alignment": alignment_view, "Attribution": attribution_view, "Embedding (UMAP)": umap_view,
            "Compare encoders": compare_view, "Live model": live_view}[name].render


def _pick_store(cfg) -> None:
    """Sidebar picker over the stores found under the root (the same root check applies)."""
    from workbench.app_views.context import find_stores, make_config

    stores = find_stores(cfg.root)
    if cfg.store is not None or not stores:
        return
    names = ["(none)"] + [str(p.relative_to(cfg.root)) or "." for p in stores]
    choice = st.sidebar.selectbox("feature store under the root", names, key="store_pick")
    if choice != "(none)":
        new = make_config(["--root", str(cfg.root), "--store", choice])
        cfg.store, cfg.run_dir, cfg.data, cfg.model = new.store, new.run_dir, new.data, new.model


def main(argv: list[str] | None = None) -> None:
    from workbench.app_views.context import PathRefused, make_config

    st.set_page_config(page_title=TITLE, page_icon=":microscope:", layout="wide")
    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg = make_config(argv)
    except PathRefused as exc:
        st.title(TITLE)
        st.error(str(exc))
        st.stop()
        return
    st.sidebar.title(TITLE)
    _pick_store(cfg)
    view = st.sidebar.radio("view", VIEWS, key="view")
    st.sidebar.caption(f"root: {cfg.root}")
    if cfg.store is not None:
        st.sidebar.caption(f"store: {cfg.store.relative_to(cfg.root) if cfg.store != cfg.root else '.'}")
    for w in cfg.warnings:
        st.sidebar.warning(w)
    try:
        _view(view)(cfg)
    except StoreError as exc:  # a damaged, missing or mismatched store: say which and how to fix it
        st.error(f"{exc}")
