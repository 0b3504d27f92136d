"""Encoder comparison: the verdicts of `fvl compare` (each paper claim's difference with its interval), the
cheap measures against VQA, the variants table and the figures - the same content as compare.md. A results
file in the older table-only form is still shown as tables and CKA matrices. Without a store, nothing live;
with one, the CKA between this store's taps is computed live (small: pooled features, one matrix)."""
from __future__ import annotations

import altair as alt
import pandas as pd
import streamlit as st

from workbench.app_views import cache
from workbench.app_views.context import AppConfig
from workbench.pipelines import compute
from workbench.pipelines.compare import encoder_table_rows

VERDICT_COLOURS = {"reproduced": "#2ca02c", "reversed": "#d62728", "unresolved": "#7f7f7f"}


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


def _ci(x: dict | None) -> str:
    if not isinstance(x, dict) or x.get("value") is None:
        return "-"
    lo, hi = x.get("ci_low"), x.get("ci_high")
    return f"{x['value']:.3f} [{'n/a' if lo is None else f'{lo:.3f}'}, {'n/a' if hi is None else f'{hi:.3f}'}]"


def forest_chart(orderings: list[dict]) -> alt.Chart:
    """The claims' differences with intervals, coloured by verdict (the forest plot of compare.md)."""
    df = pd.DataFrame([{"claim": f"{o['source']}: {o['claim']}", "diff": o["diff"], "low": o["ci_low"],
                        "high": o["ci_high"], "verdict": o["verdict"], "metric": o["metric"]} for o in orderings])
    colour = alt.Color("verdict:N", scale=alt.Scale(domain=list(VERDICT_COLOURS), range=list(VERDICT_COLOURS.values())))
    y = alt.Y("claim:N", sort=None, title=None)
    bars = alt.Chart(df).mark_rule(strokeWidth=2).encode(x=alt.X("low:Q", title="difference (paper's direction > 0)"),
                                                         x2="high:Q", y=y, color=colour)
    dots = alt.Chart(df).mark_circle(size=60).encode(x="diff:Q", y=y, color=colour,
                                                    tooltip=["claim", "metric", "diff", "low", "high", "verdict"])
    zero = alt.Chart(pd.DataFrame({"x": [0]})).mark_rule(color="black").encode(x="x:Q")
    return (bars + dots + zero).properties(height=28 * len(df) + 40)


def _render_verdicts(data: dict) -> None:
    orderings = data["orderings"]
    counts = {k: sum(o["verdict"] == k for o in orderings) for k in VERDICT_COLOURS}
    st.subheader("The paper's claims")
    st.caption(f"seeds {data.get('seeds')}; " + ", ".join(f"{k}: {v}" for k, v in counts.items())
               + f"; untestable with these variants: {len(data.get('untestable') or [])}")
    st.dataframe(pd.DataFrame([{
        "source": o["source"], "claim": o["claim"], "metric": o["metric"],
        "paper": "; ".join(f"{k} {'?' if v is None else v}" for k, v in o["paper"].items()),
        "ours": "; ".join(f"{k} {_ci(x)}" for k, x in o["ours"].items()),
        "difference": _ci({"value": o["diff"], "ci_low": o["ci_low"], "ci_high": o["ci_high"]}),
        "verdict": o["verdict"]} for o in orderings]), hide_index=True, width="stretch")
    st.altair_chart(forest_chart(orderings))
    st.subheader("Cheap measures against VQA accuracy")
    st.dataframe(pd.DataFrame([{
        "measure": k, "better": p["better"],
        "Spearman": _ci({"value": p["spearman"], "ci_low": p["ci_low"], "ci_high": p["ci_high"]}),
        "would pick": p["picks"], "best by VQA": p["best"], "picks best": p["picks_best"]}
        for k, p in data["proxies"].items()]), hide_index=True, width="stretch")
    st.subheader("Variants")
    cols = ["vqa.overall", "vqa.reading", "alignment", "probe", "correspondence"]
    st.dataframe(pd.DataFrame([{"variant": r["variant"], "encoder": r["encoder"], "training": r["training"],
                                "fusion": r["fusion"], "prompts": r["prompts"], **{c: _ci(r.get(c)) for c in cols}}
                               for r in data.get("variants") or []]), hide_index=True, width="stretch")
    if data.get("encoders"):  # results written before encoder rows existed have none
        st.subheader("Pretrained encoders")
        st.caption("The Florence-2 tower's own scores on the held-out split say whether reading fails in the "
                   "tower or in the VLM.")
        st.dataframe(pd.DataFrame(encoder_table_rows(data["encoders"])), hide_index=True, width="stretch")


def _render_tables(data, path, cfg: AppConfig) -> None:
    tables, matrices = compute.compare_parts(data)
    for name, rows in tables.items():
        st.subheader(name)
        st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")
    for name, (labels, matrix) in matrices.items():
        st.altair_chart(cka_chart(labels, matrix, f"CKA: {name}"))
    if not tables and not matrices:
        st.warning(f"{path} holds no tables or CKA matrices; rerun " + cfg.how_to_make("compare"))


def render(cfg: AppConfig) -> None:
    st.header("Compare encoders")
    path = cfg.result("compare")
    if path is not None:
        data = cache.results(path)
        st.caption(f"source: {path}")
        if isinstance(data, dict) and isinstance(data.get("orderings"), list) and isinstance(data.get("proxies"), dict):
            _render_verdicts(data)
        else:
            _render_tables(data, path, cfg)
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
