"""Capture over a data set into a feature store: values, labels, failures, crash-safe resume, features
independent of batching, provenance of weights and data, damaged shards, devices and option checks."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from workbench.capturing import capture_dataset
from workbench.cli import main as fvl
from workbench.data import open_dataset, synth_scenes
from workbench.store import FeatureStore, StoreDamagedError, StoreMismatchError
from workbench.taps import capture

TAPS = ["depth", "prompt.ocr", "vision.stage3", "fusion.input"]


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    out = tmp_path_factory.mktemp("scenes")
    synth_scenes(out, 10, seed=3, image_size=128, progress=False, workers=1, log=lambda *a: None)
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny):
    from model.loading import save_model

    return Path(save_model(*tiny, tmp_path_factory.mktemp("model") / "tiny"))


def _store_contents(path) -> tuple[list, dict]:
    store = FeatureStore(path)
    rows = [(r["id"], r["status"], json.dumps(r.get("labels"), sort_keys=True)) for r in store.index()]
    tensors = {tap: store.load(tap) for tap in store.taps}
    return rows, tensors


def _assert_same_store(path, reference) -> None:
    rows_ref, tensors_ref = _store_contents(reference)
    rows, tensors = _store_contents(path)
    assert rows == rows_ref  # no duplicate, none missing, same labels and status
    for tap in tensors_ref:
        np.testing.assert_array_equal(tensors[tap], tensors_ref[tap])  # the same bits


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
    import workbench.store.writer as store
    from model.loading import build_model
    from workbench.capturing import capture_dataset
    from workbench.data import open_dataset
    point, nth, batch, shard, fb = sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7])
    seen = {"n": 0}
    def hook(p):
        if p == point:
            seen["n"] += 1
            if seen["n"] == nth:
                os.kill(os.getpid(), signal.SIGKILL)
    store._fault_hook = hook
    model, processor = build_model("tiny", seed=0)
    capture_dataset(model, processor, open_dataset(sys.argv[1]), %r, "mean", sys.argv[2], model_id="preset:tiny",
                    batch_size=batch, shard_size=shard, forward_batch=fb, progress=False)
""" % TAPS)


@pytest.fixture(scope="module")
def reference(tiny, scenes, tmp_path_factory):
    """An uninterrupted capture, one image per batch and per shard."""
    model, processor = tiny
    out = tmp_path_factory.mktemp("reference") / "store"
    capture_dataset(model, processor, open_dataset(scenes), TAPS, "mean", out, model_id="preset:tiny", batch_size=1,
                    shard_size=1, progress=False)
    return out


@pytest.fixture(scope="module")
def reference_grouped(tiny, scenes, tmp_path_factory):
    """An uninterrupted capture forwarding fixed groups of 4 items."""
    model, processor = tiny
    out = tmp_path_factory.mktemp("reference4") / "store"
    capture_dataset(model, processor, open_dataset(scenes), TAPS, "mean", out, model_id="preset:tiny", batch_size=3,
                    shard_size=3, forward_batch=4, progress=False)
    return out


@pytest.mark.parametrize("point,nth,batch,shard,fb,resume_batch,resume_shard", [
    ("before_rename", 2, 2, 2, 1, 3, 5), ("after_rename", 2, 4, 3, 1, 1, 1), ("after_index", 3, 3, 2, 1, 10, 4),
    ("after_index", 2, 8, 3, 4, 1, 7)])
def test_capture_killed_and_resumed_with_any_layout_equals_uninterrupted(tiny, scenes, reference, reference_grouped,
                                                                         tmp_path, point, nth, batch, shard, fb,
                                                                         resume_batch, resume_shard):
    model, processor = tiny
    killed = tmp_path / "killed"
    proc = subprocess.run([sys.executable, "-c", KILLER, str(scenes), str(killed), point, str(nth), str(batch),
                           str(shard), str(fb)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]  # really killed part-way
    assert len(FeatureStore(killed).items) < 10
    if fb > 1:
        with pytest.raises(StoreMismatchError, match="forward_batch differs"):
            capture_dataset(model, processor, open_dataset(scenes), TAPS, "mean", killed, model_id="preset:tiny",
                            progress=False)
    capture_dataset(model, processor, open_dataset(scenes), TAPS, "mean", killed, model_id="preset:tiny",
                    batch_size=resume_batch, shard_size=resume_shard, forward_batch=fb, progress=False)
    _assert_same_store(killed, reference if fb == 1 else reference_grouped)  # bit-identical whatever the layout


def test_features_do_not_depend_on_batching_or_workers(tiny, scenes, reference, tmp_path):
    model, processor = tiny
    for batch, shard, workers in ((4, 3, 0), (7, 10, 2)):  # 2 DataLoader processes decode the images
        out = tmp_path / f"b{batch}-w{workers}"
        capture_dataset(model, processor, open_dataset(scenes), TAPS, "mean", out, model_id="preset:tiny",
                        batch_size=batch, shard_size=shard, workers=workers, progress=False)
        _assert_same_store(out, reference)


def test_damaged_or_missing_shards_are_named_and_recaptured(tiny, scenes, reference, tmp_path):
    model, processor = tiny
    out = tmp_path / "s"
    shutil.copytree(reference, out)
    shards = sorted((out / "shards").iterdir())
    shards[1].write_bytes(shards[1].read_bytes()[:-20])  # truncated
    shards[4].unlink()  # deleted
    data = bytearray(shards[6].read_bytes())  # altered, same size: only the digest tells
    data[-3] ^= 0xFF
    shards[6].write_bytes(bytes(data))
    store = FeatureStore(out)
    with pytest.raises(StoreDamagedError, match=rf"{shards[1].name}.*truncated.*fvl store verify .*--repair"):
        store.load("depth")
    with pytest.raises(StoreDamagedError, match=rf"{shards[6].name} is altered"):
        store.load("depth", store.items[6:7])
    report = capture_dataset(model, processor, open_dataset(scenes), TAPS, "mean", out, model_id="preset:tiny",
                             batch_size=3, shard_size=2, progress=False)
    assert report.captured == 2 and report.recaptured == 2  # exactly the truncated and the deleted shard's items
    assert fvl(["store", "verify", str(out)]) == 1  # the altered shard is still there
    assert fvl(["store", "verify", str(out), "--repair"]) == 0
    assert len(FeatureStore(out)) == 9 and FeatureStore(out).check() == []
    report = capture_dataset(model, processor, open_dataset(scenes), TAPS, "mean", out, model_id="preset:tiny",
                             progress=False)
    assert report.captured == 1
    _assert_same_store(out, reference)


def test_resume_with_other_weights_is_refused_and_the_same_weights_anywhere_resume(model_dir, tmp_path, scenes,
                                                                                   capsys):
    out = tmp_path / "s"
    base = ["capture", "--data", str(scenes), "--taps", "depth", "--out", str(out), "--limit", "4"]
    assert fvl(base + ["--model", str(model_dir)]) == 0
    # the same weights as an absolute path with a trailing slash, and from a copy elsewhere, resume
    copy = tmp_path / "copy"
    shutil.copytree(model_dir, copy)
    assert fvl(base + ["--model", str(model_dir.resolve()) + "/", "--limit", "6"]) == 0
    assert fvl(base + ["--model", str(copy), "--limit", "7"]) == 0
    assert len(FeatureStore(out)) == 7
    capsys.readouterr()
    # retrained weights in the same directory are refused, naming what changed
    from safetensors.torch import load_file, save_file

    weights = next(copy.rglob("*.safetensors"))
    sd = load_file(str(weights))
    key = sorted(sd)[0]
    sd[key] = sd[key] + 1
    save_file(sd, str(weights), metadata={"format": "pt"})
    assert fvl(base + ["--model", str(copy)]) == 2
    err = capsys.readouterr().err
    assert "weights changed" in err and "new --out" in err and "Traceback" not in err
    assert len(FeatureStore(out)) == 7


def test_changed_data_is_refused_by_name_and_analyses_check_the_store(tiny, scenes, tmp_path):
    model, processor = tiny
    data = tmp_path / "data"
    shutil.copytree(scenes, data)
    out = tmp_path / "s"
    capture_dataset(model, processor, open_dataset(data), ["depth"], "mean", out, model_id="m", progress=False, limit=5)
    store = FeatureStore(out)
    assert store.check_against(dataset=open_dataset(data), model_fingerprint=store.manifest["model_fingerprint"]) == []
    changed = open_dataset(data)[2]
    with open(changed.image_path, "ab") as fh:
        fh.write(b"\0" * 16)
    with pytest.raises(StoreMismatchError, match=rf"1 items have an image file of another size \(e.g. {changed.id}\)"):
        capture_dataset(model, processor, open_dataset(data), ["depth"], "mean", out, model_id="m", progress=False)
    other = tmp_path / "other"
    synth_scenes(other, 6, seed=11, image_size=128, progress=False, workers=1, log=lambda *a: None)
    with pytest.raises(StoreMismatchError, match="other labels.*--force"):
        store.check_against(dataset=open_dataset(other))
    problems = store.check_against(dataset=open_dataset(other), model_fingerprint="0" * 64, force=True)
    assert any("other weights" in p for p in problems) and any("other labels" in p for p in problems)


def test_bad_options_are_refused_before_anything_is_created(scenes, tmp_path, capsys):
    out = tmp_path / "s"
    base = ["capture", "--preset", "tiny", "--data", str(scenes), "--taps", "depth", "--out", str(out)]
    for extra, phrase in ((["--batch-size", "0"], "--batch-size 0: must be at least 1"),
                          (["--limit", "-1"], "--limit -1: must be 0 or more"),
                          (["--workers", "-2"], "--workers -2"), (["--device", "tpu"], "--device tpu")):
        assert fvl(base + extra) == 2
        err = capsys.readouterr().err
        assert phrase in err and "Traceback" not in err
        assert not out.exists()
    inside = ["capture", "--preset", "tiny", "--data", str(scenes), "--taps", "depth", "--out"]
    for target in (scenes, scenes / "store"):
        before = sorted(p.name for p in scenes.iterdir())
        assert fvl(inside + [str(target)]) == 2
        assert "inside the data set" in capsys.readouterr().err
        assert sorted(p.name for p in scenes.iterdir()) == before  # no index/ or shards/ left behind
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert fvl(base[:-1] + [str(blocker / "store")]) == 2
    err = capsys.readouterr().err
    assert "is not a directory" in err and "Traceback" not in err


def test_device_choice(scenes, tmp_path, capsys):
    """On a CUDA machine the capture runs there and matches the CPU's within float16 steps; on a CPU-only
    machine `auto` resolves to the CPU and `cuda` is refused by name."""
    import argparse

    from workbench.commands.capture import resolve_device

    cpu_out, out = tmp_path / "cpu", tmp_path / "dev"
    base = ["capture", "--preset", "tiny", "--data", str(scenes), "--taps", "depth,prompt.ocr", "--limit", "3"]
    assert fvl(base + ["--out", str(cpu_out), "--device", "cpu"]) == 0
    device, dtype = resolve_device(argparse.Namespace(device="auto", dtype="auto"))
    if torch.cuda.is_available():
        assert device.type == "cuda" and dtype in (torch.bfloat16, torch.float16)
        assert fvl(base + ["--out", str(out), "--device", "cuda", "--dtype", "float32"]) == 0
        np.testing.assert_allclose(FeatureStore(out).load("prompt.ocr").astype(np.float32),
                                   FeatureStore(cpu_out).load("prompt.ocr").astype(np.float32), atol=5e-3)
    else:
        assert device == torch.device("cpu") and dtype == torch.float32
        capsys.readouterr()
        assert fvl(base + ["--out", str(out), "--device", "cuda"]) == 2
        err = capsys.readouterr().err
        assert "--device cuda" in err and "CUDA is not available" in err and not out.exists()


def test_a_failing_item_in_a_fixed_group_is_isolated_and_the_rest_forwarded_together():
    from torch import nn

    from model.sources import TapPoint
    from workbench.capturing import _forward_group, forward

    class Fake(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(()))
            self.view = nn.Identity()  # a hook point, as models give their views

        def tap_points(self):
            return {"vision.output": TapPoint(self.view, "seq", False)}

        def image_features(self, px):
            if (px < -100).any():
                raise ValueError("pixels out of range")
            return self.view(px.flatten(2).transpose(1, 2) * self.scale)

    model = Fake()
    px = torch.rand(4, 3, 2, 2)
    px[2] = -1000
    group = [(0, px[0], None), (1, px[1], None), (2, px[2], None), (3, None, "ImageError: unreadable")]
    results = {i: (f, e) for i, f, e in _forward_group(model, group, ["vision.output"], "mean", None)}
    assert results[2][1] == "ValueError: pixels out of range" and results[3][1] == "ImageError: unreadable"
    together = forward(model, px[[0, 1]], ["vision.output"], "mean")["vision.output"]
    for k in (0, 1):
        assert results[k][1] is None
        torch.testing.assert_close(results[k][0]["vision.output"], together[k], rtol=0, atol=0)


def test_fvl_capture_of_a_transformers_vision_model(scenes, tmp_path):
    """A tiny CLIP vision tower saved with save_pretrained is captured like this project's models, with its own
    image processor, and the stored means equal the family's own hidden states (float16 store)."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    model = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, image_size=32, patch_size=8)).eval()
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    model_dir = tmp_path / "clip"
    model.save_pretrained(model_dir)
    image_processor.save_pretrained(model_dir)
    out = tmp_path / "store"
    argv = ["capture", "--model", str(model_dir), "--data", str(scenes), "--taps", "vision.*", "--pool", "mean",
            "--device", "cpu", "--limit", "3", "--out", str(out)]
    assert fvl(argv) == 0
    store = FeatureStore(out)
    assert store.taps == ["vision.layer0", "vision.layer1", "vision.output"] and len(store) == 3
    item = open_dataset(scenes)[0]
    pixels = image_processor(images=[Image.open(item.image_path).convert("RGB")], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        ref = model(pixel_values=pixels, output_hidden_states=True)
    expected = ref.last_hidden_state[0].mean(0).numpy()  # a sequence tap: mean over every position
    np.testing.assert_allclose(store.load("vision.output", [item.id])[0], expected, atol=5e-3)
    assert fvl(argv[:-1] + [str(out)]) == 0  # the same weights resume: nothing left to do
