"""Overview: what the store holds (manifest, model, taps), which results exist, and the images with labels."""
from __future__ import annotations

import pandas as pd
import streamlit as st

from workbench.app_views import cache
from workbench.pipelines import compute
from workbench.app_views.context import RESULTS, AppConfig, refused_summary

GALLERY_MAX = 48


def render(cfg: AppConfig) -> None:
    st.header("Overview")
    if cfg.store is None:
        st.info("No feature store is open. Pick one in the sidebar, or start the app with "
                "`fvl app --store DIR` (capture one with `fvl capture` or `fvl demo`).")
        return
    path = str(cfg.store)
    version = cache.store_version(path)
    s = cache.store(path)
    m = s.manifest
    model = m.get("model") or {}
    c = st.columns(5)
    c[0].metric("items", len(s))
    c[1].metric("failed", len(s.failed))
    c[2].metric("taps", len(s.taps))
    c[3].metric("pooling", str(m.get("pool")))
    c[4].metric("dtype", str(m.get("dtype")))

    left, right = st.columns(2)
    with left:
        st.subheader("Model")
        st.table(pd.DataFrame({"field": ["model id", "preset", "encoder", "streams", "fusion", "image size",
                                         "image tokens", "token grid", "config hash"],
                               "value": [str(m.get("model_id")), str(model.get("preset")), str(model.get("encoder_type")),
                                         ", ".join(model.get("streams") or []), str(model.get("fusion")),
                                         str(model.get("image_size")), str(model.get("image_tokens")),
                                         str(model.get("grid")), str(m.get("config_hash"))]}))
    with right:
        st.subheader("Results beside the store")
        rows = []
        for kind in RESULTS:
            p = cfg.result(kind)
            rows.append({"result": kind, "status": "present" if p else "missing",
                         "file / how to make it": str(p) if p else cfg.how_to_make(kind).strip("`")})
        st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")
        st.caption(f"run directory: {cfg.run_dir or 'none'} · data set: {cfg.data or 'none'} · "
                   f"model: {cfg.model or 'none (live mode uses the preset, random init)'}")

    st.subheader("Taps")
    taps = []
    for tap, spec in m.get("taps", {}).items():
        stream, depth, _ = compute.tap_position(tap)
        taps.append({"tap": tap, "stream": stream, "depth": depth, "shape per item": str(tuple(spec["shape"])),
                     "dtype": spec.get("dtype"), "map": tap in compute.spatial_taps(m)})
    st.dataframe(pd.DataFrame(taps), hide_index=True, width="stretch")
    if s.failed:
        with st.expander(f"{len(s.failed)} items failed at capture"):
            st.dataframe(pd.DataFrame({"id": list(s.failed), "error": list(s.failed.values())}), hide_index=True)
    with st.expander("Manifest (JSON)"):
        st.json(m, expanded=False)

    st.subheader("Images and labels")
    table = pd.DataFrame(cache.labels_table(path, version))
    label_names = [c for c in table.columns if c != "id"]
    f1, f2 = st.columns(2)
    by = f1.selectbox("filter by label", ["(none)"] + label_names, key="gallery_label")
    if by != "(none)":
        values = sorted({str(v) for v in table[by].tolist()})
        chosen = f2.selectbox("value", values, key="gallery_value")
        table = table[table[by].astype(str) == chosen]
    paths, refused = cache.confined_images(cfg, tuple(table["id"]))
    if refused:
        st.warning(refused_summary(refused))
    if not paths:
        st.info("No images found for these items: pass `--data DIR` (the data set the store was captured from); "
                "the labels are below.")
    else:
        shown = [i for i in table["id"] if i in paths][:GALLERY_MAX]
        st.caption(f"{len(shown)} of {len(table)} items shown")
        cols = st.columns(6)
        lab = label_names[:4] if by == "(none)" else [by] + [n for n in label_names if n != by][:3]
        for k, item in enumerate(shown):
            row = table[table["id"] == item].iloc[0]
            cap = item + "\n" + ", ".join(f"{n}={row[n]}" for n in lab)
            thumb, why = cache.thumbnail_or_reason(paths[item], 128)
            if thumb is None:
                cols[k % 6].caption(f"{item}: not shown ({why})")
                continue
            cols[k % 6].image(thumb, caption=cap, width="stretch")
    st.dataframe(table, hide_index=True, width="stretch", height=240)
