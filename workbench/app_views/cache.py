"""Cached loaders for the views: nothing is read or computed twice for the same inputs.

Resources (a FeatureStore, a model) go through `st.cache_resource` (one shared object); arrays and
tables through `st.cache_data` (keyed by the store path plus a version stamp of its index, so a
store that grows after a resumed capture is re-read, and an unchanged one never is).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import streamlit as st

from workbench.app_views.context import AppConfig, confine_images
from workbench.data.images import ImageError
from workbench.pipelines import compute


def store_version(path: str) -> float:
    """Latest modification time of the store's manifest and index files (changes when items are added)."""
    p = Path(path)
    stamps = [(p / "manifest.json").stat().st_mtime]
    idx = p / "index"
    if idx.is_dir():
        stamps += [f.stat().st_mtime for f in idx.iterdir()]
    return max(stamps)


@st.cache_resource(show_spinner="Opening the feature store...")
def open_store(path: str, version: float):
    from workbench.store import FeatureStore

    return FeatureStore(path)


def store(path: str):
    return open_store(path, store_version(path))


@st.cache_data(show_spinner="Reading features...", max_entries=64)
def load_tap(path: str, version: float, tap: str, items: tuple[str, ...] | None = None) -> np.ndarray:
    return store(path).load(tap, list(items) if items is not None else None, dtype="float32")


@st.cache_data(show_spinner=False)
def labels_table(path: str, version: float) -> dict[str, list]:
    s = store(path)
    labs = s.labels()
    out: dict[str, list] = {"id": list(s.items)}
    for k, v in labs.items():
        out[k] = [x.item() if hasattr(x, "item") else x for x in v.tolist()]
    return out


@st.cache_data(show_spinner="Finding the images...")
def image_paths(data_dir: str | None, ids: tuple[str, ...], image_folder: str | None = None) -> dict[str, str]:
    return {k: str(v) for k, v in compute.dataset_images(data_dir, ids, image_folder).items()}


def confined_images(cfg: AppConfig, ids: tuple[str, ...]) -> tuple[dict[str, str], dict[str, str]]:
    """(id -> image path under the app's root, id -> why refused) for the items of the open data set;
    the one door through which views get data-set images (see `context.confine_images`)."""
    folder = str(cfg.image_folder) if cfg.image_folder else None
    return confine_images(image_paths(str(cfg.data) if cfg.data else None, ids, folder), cfg.root)


@st.cache_data(show_spinner=False, max_entries=2048)
def thumbnail(path: str, size: int = 96):
    return compute.thumbnail(path, size)


def thumbnail_or_reason(path: str, size: int = 96):
    """(thumbnail, None), or (None, why) for an image that is missing or cannot be decoded: a data set
    may list such files (a capture records them as failed items), and one must not break a view."""
    try:
        return thumbnail(path, size), None
    except ImageError as exc:
        return None, str(exc)


@st.cache_data(show_spinner=False, max_entries=2048)
def thumbnail_url(path: str, size: int = 72) -> str:
    """A data: URL for chart tooltips; empty for an image that cannot be shown (no tooltip picture)."""
    try:
        return compute.data_url(compute.thumbnail(path, size))
    except ImageError:
        return ""


@st.cache_data(show_spinner=False)
def read_json(path: str, mtime: float) -> Any:
    from workbench.app_views.context import read_json as _read

    return _read(Path(path))


def results(path: Path) -> Any:
    return read_json(str(path), path.stat().st_mtime)


@st.cache_resource(show_spinner="Loading the model (once per session)...", max_entries=2)
def load_model(model_dir: str | None, preset: str | None):
    """(model, processor) from a model directory, or a random-init preset when there is none."""
    import torch

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    if model_dir:
        from model.loading import load_model as _load

        return _load(model_dir)
    from model.loading import build_model

    return build_model(preset or "tiny", seed=0)
