"""Capture over a data set into a feature store: values, labels, failures, and crash-safe resume."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from workbench.capture import capture_dataset
from workbench.data import open_dataset, synth_scenes
from workbench.store import FeatureStore
from workbench.taps import capture

TAPS = ["depth", "prompt.ocr", "vision.stage3", "fusion.input"]


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    out = tmp_path_factory.mktemp("scenes")
    synth_scenes(out, 10, seed=3, image_size=128, progress=False, workers=1, log=lambda *a: None)
    return out


def _store_contents(path) -> tuple[list, dict]:
    store = FeatureStore(path)
    rows = [(r["id"], r["status"], json.dumps(r.get("labels"), sort_keys=True)) for r in store.index()]
    tensors = {tap: store.load(tap) for tap in store.taps}
    return rows, tensors


def test_capture_values_match_the_model_and_labels_align(tiny, scenes, tmp_path):
    model, processor = tiny
    dataset = open_dataset(scenes)
    report = capture_dataset(model, processor, dataset, TAPS, "mean", tmp_path / "store", model_id="preset:tiny",
                             batch_size=4, shard_size=3, progress=False)
    assert report.captured == len(dataset) and report.failed == 0
    store = FeatureStore(tmp_path / "store")
    assert store.items == sorted(dataset.ids)
    item = dataset[0]
    with torch.no_grad(), capture(model, ["prompt.ocr"], pool="mean") as cache:
        model.get_image_features(processor.images([item.image_path]))
    stored = store.load("prompt.ocr", items=[item.id])[0]
    np.testing.assert_allclose(stored, cache["prompt.ocr"][0].numpy(), rtol=2e-3, atol=2e-3)  # float16 store
    labels = store.labels([item.id])
    assert labels["n_objects"][0] == item.labels["n_objects"]
    d = model.config.stream_width
    np.testing.assert_array_equal(store.load("fusion.input[ocr]", items=[item.id])[0],
                                  store.load("fusion.input", items=[item.id])[0][2 * d:3 * d])
    again = capture_dataset(model, processor, dataset, TAPS, "mean", tmp_path / "store", model_id="preset:tiny",
                            progress=False)
    assert again.skipped == len(dataset) and again.captured == 0


def test_bad_items_are_recorded_and_the_run_goes_on(tiny, scenes, tmp_path):
    model, processor = tiny
    folder = tmp_path / "imgs"
    folder.mkdir()
    for item in list(open_dataset(scenes))[:3]:
        (folder / Path(item.image_path).name).write_bytes(Path(item.image_path).read_bytes())
    (folder / "broken.png").write_bytes(b"this is not a png")
    (folder / "empty.png").write_bytes(b"")
    dataset = open_dataset(folder, check_images=False)
    report = capture_dataset(model, processor, dataset, ["depth"], "mean", tmp_path / "s", model_id="preset:tiny",
                             progress=False)
    assert report.captured == 3 and report.failed == 2
    store = FeatureStore(tmp_path / "s")
    assert len(store.items) == 3 and set(store.failed) == {i.id for i in dataset if i.id.startswith(("broken", "empty"))}


KILLER = textwrap.dedent("""
    import os, signal, sys
    import workbench.store as store
    from model.builder import build_model
    from workbench.capture import capture_dataset
    from workbench.data import open_dataset
    point, nth = sys.argv[3], int(sys.argv[4])
    seen = {"n": 0}
    def hook(p):
        if p == point:
            seen["n"] += 1
            if seen["n"] == nth:
                os.kill(os.getpid(), signal.SIGKILL)
    store._fault_hook = hook
    model, processor = build_model("tiny", seed=0)
    capture_dataset(model, processor, open_dataset(sys.argv[1]), %r, "mean", sys.argv[2], model_id="preset:tiny",
                    batch_size=2, shard_size=2, progress=False)
""" % TAPS)


@pytest.mark.parametrize("point,nth", [("before_rename", 2), ("after_rename", 2), ("after_index", 3)])
def test_capture_killed_and_rerun_equals_uninterrupted(tiny, scenes, tmp_path, point, nth):
    model, processor = tiny
    dataset = open_dataset(scenes)
    reference = tmp_path / "reference"
    capture_dataset(model, processor, dataset, TAPS, "mean", reference, model_id="preset:tiny", batch_size=2,
                    shard_size=2, progress=False)
    killed = tmp_path / "killed"
    proc = subprocess.run([sys.executable, "-c", KILLER, str(scenes), str(killed), point, str(nth)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]  # really killed part-way
    partial = FeatureStore(killed)
    assert len(partial.items) < len(dataset)
    capture_dataset(model, processor, dataset, TAPS, "mean", killed, model_id="preset:tiny", batch_size=2,
                    shard_size=2, progress=False)
    rows_ref, tensors_ref = _store_contents(reference)
    rows, tensors = _store_contents(killed)
    assert rows == rows_ref  # no duplicate, none missing, same labels and status
    for tap in tensors_ref:
        np.testing.assert_array_equal(tensors[tap], tensors_ref[tap])
