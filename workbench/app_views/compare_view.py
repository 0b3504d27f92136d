"""Encoder comparison: the results tables of `fvl compare` and CKA matrices (between encoders, taps or
streams). Without a compare file, the CKA between this store's taps is computed live (small: pooled
features, one matrix)."""
from __future__ import annotations

import altair as alt
import pandas as pd
import streamlit as st

from workbench.app_views import cache, compute
from workbench.app_views.context import AppConfig


@st.cache_data(show_spinner=False)
def _tap_cka(path: str, version: float, taps: tuple[str, ...]) -> list[list[float]]:
    feats = {t: cache.load_tap(path, version, t) for t in taps}
    return compute.cka_matrix(feats).tolist()


def cka_chart(labels: list[str], matrix, title: str = "") -> alt.Chart:
    rows = [{"a": a, "b": b, "cka": float(matrix[i][j])} for i, a in enumerate(labels) for j, b in enumerate(labels[: len(matrix[i])])]
    df = pd.DataFrame(rows)
    base = alt.Chart(df).encode(x=alt.X("b:N", sort=labels, title=None), y=alt.Y("a:N", sort=labels, title=None))
    heat = base.mark_rect().encode(color=alt.Color("cka:Q", scale=alt.Scale(domain=[0, 1], scheme="viridis")),
                                   tooltip=["a", "b", alt.Tooltip("cka:Q", format=".3f")])
    text = base.mark_text(fontSize=9).encode(text=alt.Text("cka:Q", format=".2f"),
                                             color=alt.condition("datum.cka > 0.6", alt.value("black"), alt.value("white")))
    return (heat + text).properties(title=title, width=min(60 * len(labels), 640), height=min(60 * len(labels), 640))


def render(cfg: AppConfig) -> None:
    st.header("Compare encoders")
    path = cfg.result("compare")
    if path is not None:
        data = cache.results(path)
        tables, matrices = compute.compare_parts(data)
        st.caption(f"source: {path}")
        for name, rows in tables.items():
            st.subheader(name)
            st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")
        for name, (labels, matrix) in matrices.items():
            st.altair_chart(cka_chart(labels, matrix, f"CKA: {name}"))
        if not tables and not matrices:
            st.warning(f"{path} holds no tables or CKA matrices; rerun " + cfg.how_to_make("compare"))
        figures = sorted(path.parent.glob("*.png"))
        if figures:
            st.subheader("Figures")
            cols = st.columns(2)
            for k, fig in enumerate(figures[:8]):
                cols[k % 2].image(str(fig), caption=fig.name, width="stretch")
        if isinstance(data, dict) and data.get("meta"):
            with st.expander("run settings (meta)"):
                st.json(data["meta"], expanded=False)
    else:
        st.warning("No encoder comparison beside this store. Make one with " + cfg.how_to_make("compare") + ".")
    if cfg.store is None:
        return
    st.subheader("CKA between this store's taps")
    s = cache.store(str(cfg.store))
    taps = [t for t in s.taps if not t.startswith("llm.")]
    default = [t for t in taps if t.startswith("vision.stage") or t == "depth" or (t.startswith("prompt.") and ".layer" not in t)
               or t == "fusion.output"][:10]
    chosen = st.multiselect("taps", taps, default=default or taps[:6], key="cka_taps")
    if len(chosen) < 2:
        st.info("Pick at least two taps.")
        return
    with st.spinner("Linear CKA on pooled features..."):
        m = _tap_cka(str(cfg.store), cache.store_version(str(cfg.store)), tuple(chosen))
    st.altair_chart(cka_chart(chosen, m, f"linear CKA over {len(s)} items (mean-pooled)"))
