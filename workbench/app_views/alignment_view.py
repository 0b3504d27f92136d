"""Alignment: the paper's vision-language alignment loss per encoder and per stream (Figs. 4-5).

Reads RUN/align/alignment.json; without it, offers to compute a small version live from the store
(mean-pooled streams against the model's own LLM on the scenes' captions)."""
from __future__ import annotations

import math

import altair as alt
import pandas as pd
import streamlit as st

from workbench.app_views import cache
from workbench.pipelines import compute
from workbench.app_views.context import AppConfig


@st.cache_data(show_spinner=False)
def _live_alignment(store: str, version: float, data: str, model_dir: str | None, preset: str | None,
                    steps: int) -> dict:
    from workbench.pipelines.aligning import align_with_own_llm

    model, processor = cache.load_model(model_dir, preset)
    return align_with_own_llm(store, data, model, processor, steps=steps, progress=False)


def render(cfg: AppConfig) -> None:
    st.header("Vision-language alignment")
    st.caption("Held-out loss of a trained linear projection from pooled vision features to the LLM's text "
               "features (lower = better aligned). Chance is ln(batch); '-X' is all streams but X.")
    path = cfg.result("align")
    if path is not None:
        data = cache.results(path)
        source = str(path)
    else:
        st.warning("No alignment results beside this store. Make them with " + cfg.how_to_make("align") + ".")
        if cfg.store is None or cfg.data is None:
            st.info("A live computation needs a store and its data set (captions); pass --store and --data.")
            return
        steps = st.slider("training steps of the projection", 20, 300, 80, step=20, key="align_steps")
        if not st.button("Compute a small alignment now", key="align_compute"):
            return
        from workbench.app_views.context import model_preset
        s = cache.store(str(cfg.store))
        with st.spinner("Training one projection per stream configuration..."):
            data = _live_alignment(str(cfg.store), cache.store_version(str(cfg.store)), str(cfg.data),
                                   str(cfg.model) if cfg.model else None, model_preset(s.manifest), steps)
        source = "computed live"
    runs = compute.alignment_runs(data)
    if not runs:
        st.error(f"{source} holds no alignment curves; rerun " + cfg.how_to_make("align"))
        return
    encoders = list(runs)
    chosen = st.multiselect("encoders", encoders, default=encoders, key="align_encoders") or encoders
    summary = []
    for enc in chosen:
        for name, c in runs[enc].items():
            summary.append({"encoder": enc, "config": name, "held-out loss": c["eval_loss"],
                            "initial loss": c.get("eval_loss_init"), "top-1": c.get("eval_top1"),
                            "chance": c.get("chance", math.nan), "pairs (train/eval)": f"{c.get('n_train')}/{c.get('n_eval')}"})
    sdf = pd.DataFrame(summary)
    bars = alt.Chart(sdf).mark_bar().encode(
        x=alt.X("config:N", sort=None, axis=alt.Axis(labelAngle=-30)),
        y=alt.Y("held-out loss:Q", scale=alt.Scale(zero=False)),
        color="encoder:N", xOffset="encoder:N", tooltip=list(sdf.columns))
    chance = alt.Chart(sdf).mark_rule(color="gray", strokeDash=[4, 4]).encode(y="mean(chance):Q")
    st.altair_chart((bars + chance).properties(height=260, title="held-out loss (dashed: chance)"), width="stretch")
    configs = list(dict.fromkeys(sdf["config"]))
    shown = st.multiselect("curves", configs, default=[c for c in configs if not c.startswith("-")][:6],
                           key="align_curves") or configs
    cdf = pd.DataFrame(compute.curve_rows({e: {k: v for k, v in runs[e].items() if k in shown} for e in chosen}))
    if not cdf.empty:
        lines = alt.Chart(cdf).mark_line(point=True).encode(
            x=alt.X("step:Q", title="training step"), y=alt.Y("loss:Q", scale=alt.Scale(zero=False), title="held-out loss"),
            color="config:N", strokeDash="encoder:N", tooltip=["encoder", "config", "step", alt.Tooltip("loss:Q", format=".4f")])
        st.altair_chart(lines, width="stretch")
    st.dataframe(sdf, hide_index=True, width="stretch")
    st.caption(f"source: {source}")
