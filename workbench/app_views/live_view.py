"""Live mode: upload an image (or pick a packaged photo), run the loaded model, see its taps and its answer.

Uploads are bounded twice: the widget refuses files over MAX_UPLOAD_MB, and `load_image` refuses
anything that is not a decodable image or claims more than MAX_UPLOAD_PIXELS (checked from the
header, before decoding)."""
from __future__ import annotations

import streamlit as st

from workbench.app_views import cache
from workbench.pipelines import compute
from workbench.app_views.context import MAX_UPLOAD_MB, MAX_UPLOAD_PIXELS, AppConfig, model_preset


@st.cache_data(show_spinner=False, max_entries=16)
def _run(model_dir: str | None, preset: str | None, image_bytes: bytes | None, packaged: str | None,
         question: str) -> dict:
    from workbench.data.images import load_image, packaged_image

    image = packaged_image(packaged) if packaged else load_image(image_bytes, max_pixels=MAX_UPLOAD_PIXELS)
    model, processor = cache.load_model(model_dir, preset)
    if processor is None:
        raise ValueError("this model has no processor; open a model directory written by `fvl train`")
    return compute.live_run(model, processor, image, question)


def render(cfg: AppConfig) -> None:
    from workbench.data.images import ImageError, load_image, packaged_image_names

    st.header("Live model")
    preset = model_preset(cache.store(str(cfg.store)).manifest) if cfg.store else None
    if cfg.model:
        st.caption(f"model: {cfg.model}")
    else:
        st.warning(f"No trained model directory found: running a random-init `{preset or 'tiny'}` preset. Pass "
                   "`--model DIR` (or keep RUN/model beside the store) to see a trained model.")
    c1, c2 = st.columns(2)
    upload = c1.file_uploader(f"upload an image (PNG/JPEG/..., at most {MAX_UPLOAD_MB} MB)",
                              type=["png", "jpg", "jpeg", "bmp", "gif", "webp", "tif", "tiff"],
                              max_upload_size=MAX_UPLOAD_MB, key="live_upload")
    names = packaged_image_names()
    packaged = c2.selectbox("or a packaged photo", names, key="live_packaged") if names and upload is None else None
    question = st.text_input("question", "What color is the largest shape?", key="live_question")
    data = None
    if upload is not None:
        data = upload.getvalue()
        if len(data) > MAX_UPLOAD_MB * 1024 * 1024:
            st.error(f"{upload.name} is {len(data) / 2**20:.1f} MB, over the {MAX_UPLOAD_MB} MB limit; downscale it")
            return
        try:
            load_image(data, max_pixels=MAX_UPLOAD_PIXELS)
        except ImageError as exc:
            st.error(f"{upload.name}: {exc}")
            return
    elif packaged is None:
        st.info("Upload an image to run the model.")
        return
    with st.spinner("Running the model..."):
        try:
            out = _run(str(cfg.model) if cfg.model else None, preset, data, None if data else packaged, question)
        except (ImageError, ValueError) as exc:
            st.error(str(exc))
            return
    left, right = st.columns([1, 2])
    left.image(out["image"], caption="as the model sees it", width="stretch")
    right.markdown(f"**Q:** {question}")
    right.markdown(f"**A:** {out['answer'] or '(empty answer)'}")
    right.caption("Greedy decoding, up to 16 new tokens.")
    from workbench.app_views.feature_maps_view import show_grids

    st.subheader("Taps (PCA as RGB, one basis per row)")
    show_grids(out["taps"], None, key="live")
