"""The probe matrix: depth x stream (prompt) x label heatmaps of probe accuracy or selectivity.

Selecting a cell (click, or the two pickers) shows its regularisation curve (score against C for the
task and its control) and, for classification, the confusion matrix at the chosen C."""
from __future__ import annotations

import altair as alt
import pandas as pd
import streamlit as st

from workbench.app_views import cache
from workbench.pipelines import compute
from workbench.app_views.context import AppConfig


def render(cfg: AppConfig) -> None:
    st.header("Probe matrix")
    path = cfg.result("probe")
    if path is None:
        st.warning("No probe results beside this store. Make them with " + cfg.how_to_make("probe") + ".")
        return
    data = cache.results(path)
    rows = compute.probe_rows(data)
    if not rows:
        st.warning(f"{path} holds no probe results; rerun " + cfg.how_to_make("probe"))
        return
    df = pd.DataFrame(rows)
    settings = data.get("settings", {})
    st.caption(f"{path} · {settings.get('n_folds')}-fold grouped CV, C chosen by {settings.get('select')}, "
               "selectivity = task score - control-task score (Hewitt & Liang)")
    c1, c2 = st.columns([1, 3])
    value = c1.radio("colour by", ["score", "selectivity"], key="probe_value", horizontal=True)
    labels = list(dict.fromkeys(df["label"]))
    chosen = c2.multiselect("labels", labels, default=labels[: min(6, len(labels))], key="probe_labels")
    view = df[df["label"].isin(chosen or labels)]
    depth_order = list(view.sort_values("order")["depth"].drop_duplicates())
    stream_order = list(dict.fromkeys(view.sort_values("order")["stream"]))
    pick = alt.selection_point(fields=["tap", "label"], name="cell")
    base = alt.Chart(view).encode(
        x=alt.X("stream:N", sort=stream_order, title="stream"),
        y=alt.Y("depth:N", sort=depth_order, title="depth"),
    )
    heat = base.mark_rect().encode(
        color=alt.Color(f"{value}:Q", scale=alt.Scale(scheme="viridis") if value == "score"
                        else alt.Scale(scheme="redblue", domainMid=0, reverse=True)),
        tooltip=["tap", "label", alt.Tooltip("score:Q", format=".3f"), alt.Tooltip("control:Q", format=".3f"),
                 alt.Tooltip("selectivity:Q", format="+.3f"), alt.Tooltip("chance:Q", format=".3f"), "metric"],
        opacity=alt.condition(pick, alt.value(1.0), alt.value(0.55)),
    ).add_params(pick)
    vals = view[value].dropna()
    if value == "score":
        mid = float((vals.min() + vals.max()) / 2) if len(vals) else 0.0
        dark = f"datum.{value} < {mid}"  # viridis is dark at the low end
    else:
        lim = float(vals.abs().max()) if len(vals) else 1.0
        dark = f"abs(datum.{value}) > {0.6 * lim}"  # the diverging scale is dark at both ends
    text = base.mark_text(fontSize=9).encode(text=alt.Text(f"{value}:Q", format=".2f"),
                                             color=alt.condition(dark, alt.value("white"), alt.value("black")))
    chart = alt.layer(heat, text, data=view).properties(width=190, height=22 * max(3, len(depth_order))).facet(
        facet=alt.Facet("label:N", sort=chosen or labels), columns=3)
    event = st.altair_chart(chart, on_select="rerun", key="probe_heat")
    sel = (getattr(event, "selection", None) or {}).get("cell") or []
    taps = list(dict.fromkeys(df.sort_values("order")["tap"]))
    tap0, lab0 = (sel[0].get("tap"), sel[0].get("label")) if sel else (taps[-1], labels[0])
    d1, d2 = st.columns(2)
    tap = d1.selectbox("tap", taps, index=taps.index(tap0) if tap0 in taps else 0, key="probe_tap")
    label = d2.selectbox("label", labels, index=labels.index(lab0) if lab0 in labels else 0, key="probe_label")
    render_cell(data, tap, label)


def render_cell(data: dict, tap: str, label: str) -> None:
    r = next((x for x in data.get("results", []) if x["tap"] == tap and x["label"] == label), None)
    if r is None:
        st.info(f"no probe for {tap} x {label}")
        return
    st.subheader(f"{tap} → {label}")
    m = st.columns(4)
    m[0].metric(r["metric"], f"{r['score_mean']:.3f} ± {r['score_std']:.3f}")
    m[1].metric("control task", "-" if r.get("control_mean") is None else f"{r['control_mean']:.3f}")
    m[2].metric("selectivity", "-" if r.get("selectivity_mean") is None else f"{r['selectivity_mean']:+.3f}")
    m[3].metric("chance (majority)", f"{r.get('chance', 0):.3f}")
    left, right = st.columns(2)
    curve = [{"C": c, "score": s, "curve": "task"} for c, s in zip(r["Cs"], r["curve_mean"])]
    if r.get("control_curve_mean"):
        curve += [{"C": c, "score": s, "curve": "control"} for c, s in zip(r["Cs"], r["control_curve_mean"])]
    band = pd.DataFrame({"C": r["Cs"], "lo": [a - b for a, b in zip(r["curve_mean"], r["curve_std"])],
                         "hi": [a + b for a, b in zip(r["curve_mean"], r["curve_std"])]})
    line = alt.Chart(pd.DataFrame(curve)).mark_line(point=True).encode(
        x=alt.X("C:Q", scale=alt.Scale(type="log"), title="C (inverse L2 strength)"),
        y=alt.Y("score:Q", title=r["metric"]), color="curve:N")
    area = alt.Chart(band).mark_area(opacity=0.2).encode(x="C:Q", y="lo:Q", y2="hi:Q")
    rule = alt.Chart(pd.DataFrame({"C": [r["best_C"]]})).mark_rule(strokeDash=[4, 4]).encode(x="C:Q")
    left.markdown("**Regularisation curve** (mean over outer folds; dashed: most chosen C)")
    left.altair_chart(area + line + rule, width="stretch")
    if r.get("confusion") and r.get("classes"):
        classes = r["classes"]
        conf = [{"true": classes[i], "predicted": classes[j], "count": v}
                for i, row in enumerate(r["confusion"]) for j, v in enumerate(row)]
        cm = alt.Chart(pd.DataFrame(conf)).mark_rect().encode(
            x=alt.X("predicted:N", sort=classes), y=alt.Y("true:N", sort=classes),
            color=alt.Color("count:Q", scale=alt.Scale(scheme="blues")), tooltip=["true", "predicted", "count"])
        right.markdown("**Confusion** (pooled over outer folds, at each fold's chosen C)")
        right.altair_chart(cm + cm.mark_text().encode(text="count:Q", color=alt.value("black")), width="stretch")
    else:
        right.markdown("**Per-fold scores**")
        right.dataframe(pd.DataFrame({"fold": range(len(r["score_folds"])), "score": r["score_folds"],
                                      "control": r.get("control_folds") or [None] * len(r["score_folds"])}),
                        hide_index=True)
