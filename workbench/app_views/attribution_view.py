"""Attribution: which pixels and which fusion streams an answer rests on, for a chosen image and question.

Reads RUN/attribute/attribution.json (written by `fvl demo`); any store item or packaged photo can
also be attributed live (integrated gradients with few steps, cached per image and question)."""
from __future__ import annotations

from pathlib import Path

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st

from workbench.app_views import cache
from workbench.pipelines import compute
from workbench.app_views.context import AppConfig, PathRefused, model_preset, resolve_under_root


@st.cache_data(show_spinner=False, max_entries=32)
def _live(model_dir: str | None, preset: str | None, image_key: str, question: str, answer: str, steps: int) -> dict:
    from workbench.pipelines.attributing import attribution_record

    model, processor = cache.load_model(model_dir, preset)
    image = _image_from_key(image_key)
    return attribution_record(model, processor, image, question, answer, steps=steps, item_id=image_key)


def _image_from_key(key: str):
    from workbench.data.images import load_image, packaged_image

    if key.startswith("packaged:"):
        return packaged_image(key.split(":", 1)[1])
    return load_image(key)


def show_record(rec: dict, image) -> None:
    """Original image, pixel-attribution overlay and one overlay per stream, with the stream shares."""
    img = np.asarray(image.convert("RGB").resize((256, 256)))
    st.markdown(f"**Q:** {rec['question']} · **A (attributed):** {rec['answer']}")
    pixels, streams = rec.get("pixels") or {}, rec.get("streams") or {}
    maps = streams.get("token_maps") or {}
    cols = st.columns(2 + len(maps))
    cols[0].image(img, caption="image", width="stretch")
    if pixels.get("heat") is not None:
        cols[1].image(compute.overlay(img, np.abs(np.asarray(pixels["heat"]))), width="stretch",
                      caption=f"pixels ({pixels.get('method')}), |attr|")
    for k, (name, values) in enumerate(maps.items()):
        try:
            from probes.attribution import token_grid

            grid = token_grid(np.asarray(values))
        except ValueError:
            continue
        share = streams.get("shares", {}).get(name, 0.0)
        cols[2 + k].image(compute.overlay(img, grid), width="stretch", caption=f"{name}: {share:.0%} of |attr|")
    if streams.get("shares"):
        sdf = pd.DataFrame({"stream": list(streams["shares"]), "share": list(streams["shares"].values()),
                            "signed": [streams.get("signed", {}).get(k) for k in streams["shares"]]})
        bars = alt.Chart(sdf).mark_bar().encode(
            x=alt.X("stream:N", sort=None, axis=alt.Axis(labelAngle=0)), y=alt.Y("share:Q", axis=alt.Axis(format="%")),
            tooltip=["stream", alt.Tooltip("share:Q", format=".1%"), alt.Tooltip("signed:Q", format="+.4f")])
        st.altair_chart(bars.properties(height=220, title="share of |attribution| per fusion stream"), width="stretch")
    d = [("F(x) - F(baseline)", pixels.get("output_difference")), ("pixel IG delta", pixels.get("delta")),
         ("stream IG delta", streams.get("delta"))]
    st.caption(" · ".join(f"{k}: {v:+.4f}" for k, v in d if isinstance(v, (int, float))) +
               " (completeness: attributions sum to the output difference up to the delta)")


def render(cfg: AppConfig) -> None:
    st.header("Attribution")
    path = cfg.result("attribute")
    records = []
    if path is not None:
        records = compute.attribution_records(cache.results(path))
        st.caption(f"{len(records)} attributed answers from {path}")
    else:
        st.warning("No attribution results beside this store. Make them with " + cfg.how_to_make("attribute") +
                   ", or attribute one image live below.")
    mode = st.radio("source", (["saved results"] if records else []) + ["live"], horizontal=True, key="attr_mode")
    if mode == "saved results":
        names = [f"{r['id']}: {r['question']}" for r in records]
        k = st.selectbox("image and question", range(len(records)), format_func=lambda i: names[i], key="attr_pick")
        rec = records[k]
        try:
            if str(rec["image"]).startswith("packaged:"):
                image = _image_from_key(rec["image"])
            else:
                img = Path(rec["image"])
                base = Path(cfg.run_dir) if cfg.run_dir and not img.is_absolute() else Path(".")
                image = compute.thumbnail(resolve_under_root(base / img, cfg.root, "image"), 512)
        except (PathRefused, ValueError) as exc:
            st.error(str(exc))
            return
        show_record(rec, image)
        if not (rec.get("pixels") or {}).get("heat"):
            st.info("This results file holds shares and top pixels but no maps; use 'live' to draw the overlays.")
        return
    _live_panel(cfg)


def _live_panel(cfg: AppConfig) -> None:
    from workbench.data.images import packaged_image_names

    options: dict[str, str] = {}
    if cfg.store is not None and cfg.data is not None:
        s = cache.store(str(cfg.store))
        paths, _ = cache.confined_images(cfg, tuple(s.items))
        for item, p in list(paths.items())[:200]:
            options[f"store: {item}"] = p
    for name in packaged_image_names():
        options[f"packaged: {name}"] = f"packaged:{name}"
    if not options:
        st.info("No images available: open a store with its data set, or install matplotlib for a packaged photo.")
        return
    c1, c2, c3 = st.columns([2, 2, 1])
    label = c1.selectbox("image", list(options), key="attr_live_image")
    question = c2.text_input("question", "What color is the largest shape?", key="attr_live_q")
    answer = c3.text_input("answer to attribute", "red", key="attr_live_a")
    steps = st.slider("integration steps", 4, 32, 8, step=4, key="attr_live_steps")
    if not st.button("Attribute", key="attr_live_go"):
        st.caption("Integrated gradients through the whole model: a few seconds per image on the small presets.")
        return
    preset = model_preset(cache.store(str(cfg.store)).manifest) if cfg.store else None
    with st.spinner("Integrating gradients..."):
        try:
            rec = _live(str(cfg.model) if cfg.model else None, preset, options[label], question, answer, steps)
        except ValueError as exc:
            st.error(str(exc))
            return
    show_record(rec, _image_from_key(options[label]))
