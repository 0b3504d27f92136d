"""Feature maps: for one image, every spatial tap as a PCA-as-RGB map, prompts side by side, and where
each prompt's pass changed the depth features V (difference maps).

Needs token maps: a store captured with pool none or grid{k}. A mean-pooled store has none, so the
maps are then computed live from the model (the run's model directory, or the store's preset)."""
from __future__ import annotations

import numpy as np
import streamlit as st

from workbench.app_views import cache
from workbench.pipelines import compute
from workbench.app_views.context import AppConfig, model_preset, refused_summary

TILE = 168


def _tile(rgb: np.ndarray) -> np.ndarray:
    """(h, w, 3) uint8 (or floats in [0, 1]) -> a TILE-sized image of crisp token blocks."""
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8:
        rgb = (np.clip(rgb, 0, 1) * 255).astype(np.uint8)
    return compute.upsample_nearest(rgb, TILE)


def _heat_tile(values: np.ndarray, vmax: float) -> np.ndarray:
    from matplotlib import colormaps

    v = np.clip(values / (vmax or 1.0), 0, 1)
    return _tile(colormaps["magma"](v)[..., :3])


def _tiles(items: list[tuple[np.ndarray, str]], per_row: int = 6) -> None:
    for start in range(0, len(items), per_row):
        cols = st.columns(per_row)
        for col, (img, caption) in zip(cols, items[start:start + per_row]):
            col.image(img, caption=caption, width="stretch")


def show_grids(grids: dict[str, np.ndarray], image: np.ndarray | None = None, key: str = "fmap") -> None:
    """The image once; vision stages and fusion taps (one PCA each); then one row per encoder layer with V and
    every prompt under ONE shared PCA (equal colours = similar features); then the difference maps."""
    if not grids:
        st.info("No spatial taps to draw.")
        return
    head = st.columns([1, 3])
    if image is not None:
        head[0].image(image, caption="image", width="stretch")
    background = head[1].radio("background", ["none", "otsu"], horizontal=True, key=f"{key}_bg",
                               help="otsu: split PC1 by Otsu's threshold and black out the background (DINOv2 style)")
    shared = head[1].radio("PCA basis for the prompt rows", ["shared per row", "one per map"], horizontal=True,
                           key=f"{key}_basis", help="shared: equal colours mean the same feature direction across V "
                           "and the prompts (shows how far each prompt shifts the tokens); one per map: the spatial "
                           "structure inside each map") == "shared per row"
    head[1].caption("PCA of the patch tokens as RGB (the paper's Fig. 3 style); vision stages and fusion taps always "
                    "get their own PCA.")
    rows = compute.layout_rows(list(grids))
    prompt_rows = [(k, t) for k, t in rows if all(x.startswith("prompt.") for x in t)]
    singles = [t for k, ts in rows for t in ts
               if not t.startswith("prompt.") and not (t == "depth" and prompt_rows)]
    if singles:
        head[1].markdown("**Vision stages, depth and fusion** (one PCA each)")
        items = []
        for t in singles:
            try:
                rgb = compute.pca_rgb({t: grids[t]}, background=background)[t]
            except ValueError:
                continue
            items.append((_tile(rgb), f"{t} ({grids[t].shape[0]}x{grids[t].shape[1]})"))
        _tiles(items)
    for layer, taps in prompt_rows:
        members = (["depth"] if "depth" in grids else []) + taps
        try:
            if shared:
                rgb = compute.pca_rgb({t: grids[t] for t in members}, background=background)
            else:
                rgb = {t: compute.pca_rgb({t: grids[t]}, background=background)[t] for t in members}
        except ValueError:
            continue
        st.markdown(f"**Encoder {layer}**: V, then each prompt ({'shared PCA' if shared else 'one PCA per map'})")
        _tiles([(_tile(rgb[t]), t) for t in members])
    if "depth" in grids and prompt_rows:
        st.subheader("Difference maps: where each prompt changed V")
        layer = st.selectbox("encoder layer", [k for k, _ in prompt_rows], index=len(prompt_rows) - 1,
                             key=f"{key}_diff_layer")
        taps = dict(prompt_rows)[layer]
        diffs = compute.difference_maps({"depth": grids["depth"], **{t: grids[t] for t in taps}}, "depth")
        if diffs:
            vmax = max(float(d.max()) for d in diffs.values())
            _tiles([(_heat_tile(d, vmax), f"{t}: mean {d.mean():.3f}, max {d.max():.3f}") for t, d in diffs.items()])
            st.caption("1 - cosine(prompt features, V) per patch; one colour scale for all prompts (brighter = changed more).")


@st.cache_data(show_spinner=False, max_entries=32)
def _live_grids(model_dir: str | None, preset: str | None, image_path: str) -> dict:
    model, processor = cache.load_model(model_dir, preset)
    return compute.live_run(model, processor, image_path, "Describe the image.", max_new_tokens=1)


def render(cfg: AppConfig) -> None:
    st.header("Feature maps")
    if cfg.store is None:
        st.info("Open a store to browse its images; the Live view draws maps for any uploaded image.")
        return
    path = str(cfg.store)
    version = cache.store_version(path)
    s = cache.store(path)
    spatial = compute.spatial_taps(s.manifest)
    paths, refused = cache.confined_images(cfg, tuple(s.items))
    item = st.selectbox("image", s.items, key="fmap_item")
    image = None
    if item in paths:
        thumb, why = cache.thumbnail_or_reason(paths[item], 256)
        if thumb is None:  # listed but unreadable: treated as absent (no live maps from it either)
            st.warning(why)
            paths.pop(item)
        else:
            image = np.asarray(thumb)
    elif item in refused:
        st.warning(refused_summary({item: refused[item]}))
    pool = str(s.manifest.get("pool"))
    if spatial:
        st.caption(f"from the store (pool {pool}): {len(spatial)} spatial taps")
        grids = {t: compute.to_grid(cache.load_tap(path, version, t, (item,))[0], pool) for t in spatial}
    else:
        if item not in paths:
            st.warning(f"This store was captured with pool={pool} (no token maps) and the image of {item} is not found; "
                       "pass --data DIR to compute maps live, or capture with `--pool grid6` / `--pool none`.")
            return
        st.caption(f"the store holds pooled vectors (pool {pool}): maps computed live from the model")
        with st.spinner("Running the model on this image..."):
            out = _live_grids(str(cfg.model) if cfg.model else None, model_preset(s.manifest), paths[item])
        grids = out["taps"]
    labels = cache.labels_table(path, version)
    k = labels["id"].index(item)
    st.caption(" · ".join(f"{n}={labels[n][k]}" for n in labels if n != "id"))
    show_grids(grids, image)
