"""Bad input at every entry point, the model's position limits, and crash safety at the CLI level.

Entry points: the Python API (`processor.images`, `capture_dataset`, `load_model`, `build_config`, the
model forward) and the CLI (`fvl generate`, `fvl capture`, `fvl taps`, `fvl train`). Every bad input gets
an error naming it and saying what to do (no traceback from the CLI: exit status 2); batch commands
record a bad item as failed and go on, and their exit status is the number of failures.

Crash safety: `fvl capture` and `fvl train` are killed with SIGKILL at seeded random moments while
running, rerun, and compared with an uninterrupted run: same index, same tensors, same loss sequence.
"""
from __future__ import annotations

import copy
import errno
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from workbench.cli import main as fvl

REPO = Path(__file__).resolve().parents[1]


def _png_header(width: int, height: int) -> bytes:
    """A structurally valid PNG whose IHDR claims width x height, with almost no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


def _noise(mode: str, size=(40, 30)) -> Image.Image:
    rng = np.random.default_rng(0)
    rgba = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 4), dtype=np.uint8), "RGBA")
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (size[1], size[0]), dtype=np.uint16))
    if mode == "CMYK":
        return rgba.convert("RGB").convert("CMYK")
    return rgba.convert(mode)


GOOD_MODES = {"L": "png", "LA": "png", "P": "png", "RGBA": "png", "CMYK": "jpg", "I;16": "png", "1": "bmp"}
# name -> (how to make it, a phrase the error must contain)
BAD = {
    "empty.png": (lambda p: p.write_bytes(b""), "empty file"),
    "truncated.png": (lambda p: p.write_bytes(p.with_name("good_L.png").read_bytes()[:200]), "truncated"),
    "notes.png": (lambda p: p.write_text("this is a text file, not a picture"), "not a readable image"),
    "bomb.png": (lambda p: p.write_bytes(_png_header(100_000, 100_000)), "decompression bomb"),
    "huge_header.png": (lambda p: p.write_bytes(_png_header(9_000, 9_000)), "over the limit"),
    "pixel.png": (lambda p: Image.new("RGB", (1, 1), "red").save(p), "only 1x1"),
}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A folder with one image per awkward mode and one file per kind of bad input."""
    d = tmp_path_factory.mktemp("images")
    for mode, ext in GOOD_MODES.items():
        _noise(mode).save(d / f"good_{mode.replace(';', '')}.{ext}")
    for name, (make, _) in BAD.items():
        make(d / name)
    return d


@pytest.fixture(scope="module")
def good_images(images, tmp_path_factory):
    """Only the readable images (two of them), for tests about something else than bad files."""
    d = tmp_path_factory.mktemp("good")
    for name in ("good_L.png", "good_RGBA.png"):
        shutil.copy(images / name, d / name)
    return d


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny):
    from model.loading import save_model

    return save_model(*tiny, tmp_path_factory.mktemp("model") / "tiny")


# ---------------------------------------------------------------------------------------------
# Images: Python API and CLI
# ---------------------------------------------------------------------------------------------
def test_processor_takes_every_mode_and_names_every_bad_file(tiny, images):
    from workbench.data.images import ImageError

    _, processor = tiny
    good = sorted(images.glob("good_*"))
    x = processor.images(good)
    assert x.shape == (len(good), 3, processor.image_size, processor.image_size) and torch.isfinite(x).all()
    for name, (_, phrase) in BAD.items():
        with pytest.raises(ImageError, match=phrase) as err:
            processor.images([images / name])
        assert str(images / name) in str(err.value)


@pytest.mark.parametrize("name", sorted(BAD))
def test_fvl_generate_refuses_bad_images_without_a_traceback(images, name, capsys):
    assert fvl(["generate", "--preset", "tiny", "--image", str(images / name)]) == 2
    err = capsys.readouterr().err
    assert str(images / name) in err and BAD[name][1] in err and "Traceback" not in err


def test_fvl_capture_records_bad_items_and_exit_status_counts_them(images, tmp_path, capsys):
    out = tmp_path / "store"
    argv = ["capture", "--preset", "tiny", "--data", str(images), "--taps", "depth", "--pool", "mean",
            "--out", str(out), "--batch-size", "4"]
    assert fvl(argv) == len(BAD)
    from workbench.store import FeatureStore

    store = FeatureStore(out)
    assert set(store.failed) == set(BAD)
    assert store.items == sorted(p.name for p in images.glob("good_*"))
    for name, (_, phrase) in BAD.items():
        assert phrase in store.failed[name] and name in store.failed[name]
    capsys.readouterr()
    # a rerun skips what is recorded (stored or failed); its exit status still counts the recorded failures
    assert fvl(argv) == len(BAD)
    rerun = capsys.readouterr().out
    assert f"{len(GOOD_MODES) + len(BAD)} already stored" in rerun and "--retry-failed" in rerun
    assert fvl(argv + ["--retry-failed"]) == len(BAD)  # retried, and they fail again
    assert len(FeatureStore(out).index()) == len(GOOD_MODES) + len(BAD)  # one row per item, no duplicates


def _real_data(root: Path) -> tuple[Path, Path, Path]:
    """A LLaVA file with an image folder elsewhere, and a Hugging Face image folder with a metadata.jsonl
    whose `colour` column separates the images; one listed image is missing from each."""
    rng = np.random.default_rng(0)
    folder, hf = root / "images", root / "hf"
    rows, meta = [], []
    for k in range(8):
        colour = ["red", "blue"][k % 2]
        arr = (rng.random((32, 32, 3)) * 60).astype(np.uint8)
        arr[..., 0 if colour == "red" else 2] += 180
        for d in (folder, hf):
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(d / f"im{k}.png")
        rows.append({"id": f"s{k}", "image": f"im{k}.png",
                     "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": colour}]})
        meta.append({"file_name": f"im{k}.png", "colour": colour, "caption": f"a {colour} picture"})
    rows.append({"id": "lost", "image": "lost.png", "conversations": rows[0]["conversations"]})
    meta.append({"file_name": "lost.png", "colour": "red"})
    llava = root / "json" / "data.json"
    llava.parent.mkdir()
    llava.write_text(json.dumps(rows))
    (hf / "metadata.jsonl").write_text("\n".join(json.dumps(m) for m in meta))
    return llava, folder, hf


def test_fvl_capture_takes_real_data_and_records_missing_images(tmp_path, capsys):
    """LLaVA + --image-folder and an image folder with metadata.jsonl: the missing image is a failed item,
    the others are stored with their labels, and `fvl probe` uses a metadata column as a label."""
    from workbench.store import FeatureStore

    llava, folder, hf = _real_data(tmp_path)
    base = ["capture", "--preset", "tiny", "--taps", "depth", "--pool", "mean", "--batch-size", "4"]
    assert fvl(base + ["--data", str(llava), "--out", str(tmp_path / "s1")]) == 2
    assert "none of its 9 images exist" in capsys.readouterr().err  # the JSON's own folder is the wrong one
    assert fvl(base + ["--data", str(llava), "--image-folder", str(folder), "--out", str(tmp_path / "s1")]) == 1
    store = FeatureStore(tmp_path / "s1")
    assert len(store.items) == 8 and list(store.failed) == ["lost"] and "lost.png does not exist" in store.failed["lost"]
    assert fvl(base + ["--data", str(hf), "--out", str(tmp_path / "s2")]) == 1
    store = FeatureStore(tmp_path / "s2")
    assert list(store.failed) == ["lost.png"]
    assert sorted(store.labels()["colour"].tolist()) == ["blue"] * 4 + ["red"] * 4
    capsys.readouterr()
    assert fvl(["probe", "--store", str(tmp_path / "s2"), "--labels", "colour", "--folds", "2",
                "--out", str(tmp_path / "probe"), "--json"]) == 0
    assert "colour" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# Names, stores, checkpoints
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flag,value,phrase,named", [
    ("--taps", "prompt.nope", "matches nothing", "prompt.nope"),
    ("--taps", "depth,llm.layer99", "matches nothing", "llm.layer99"),
    ("--pool", "median", "grid<k>", "median"),
    ("--preset", "huge", "unknown preset", "huge"),
    ("--data", "/nonexistent/data", "does not exist", "/nonexistent/data"),
])
def test_fvl_capture_refuses_unknown_names(images, tmp_path, flag, value, phrase, named, capsys):
    argv = ["capture", "--preset", "tiny", "--data", str(images), "--taps", "depth", "--pool", "mean",
            "--out", str(tmp_path / "s")]
    argv[argv.index(flag) + 1] = value
    assert fvl(argv) == 2
    err = capsys.readouterr().err
    assert phrase in err and named in err and "Traceback" not in err
    assert not (tmp_path / "s" / "shards").exists()  # refused before any work


def test_unknown_names_in_the_python_api(tiny, tmp_path):
    from workbench.store import StoreWriter, FeatureStore
    from workbench.taps import TapError, ablate, capture, patch, resolve

    model, _ = tiny
    for bad in ("prompt.nope", "vision.stage9", "fusion.inputs"):
        with pytest.raises(TapError, match="fvl taps"):
            resolve(model, bad)
    with pytest.raises(TapError, match="median"):
        with capture(model, "depth", pool="median"):
            pass
    with pytest.raises(TapError, match=r"unknown stream.*nope"):
        with ablate(model, "nope"):
            pass
    with pytest.raises(TapError, match=r"unknown stream"):
        with patch(model, "nope", torch.zeros(17, 64)):
            pass
    with StoreWriter(tmp_path / "s", {"model_id": "m", "taps": {"depth": {"shape": [2]}}}) as w:
        w.add("a", {"depth": [1.0, 2.0]})
    with pytest.raises(ValueError, match=r"tap 'prompt.nope' is not in .*stored taps: depth"):
        FeatureStore(tmp_path / "s").load("prompt.nope")


def test_fvl_capture_refuses_a_store_of_another_model_or_version(good_images, model_dir, tmp_path, capsys):
    out = tmp_path / "store"
    base = ["capture", "--data", str(good_images), "--taps", "depth", "--out", str(out)]
    assert fvl(base + ["--preset", "tiny"]) == 0
    for other, field in ((["--model", str(model_dir)], "model_fingerprint"), (["--preset", "tiny", "--taps", "prompt.ocr"], "taps")):
        capsys.readouterr()
        assert fvl(base + other) == 2
        err = capsys.readouterr().err
        assert f"{field} differs" in err and "new --out" in err and "Traceback" not in err
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    assert fvl(base + ["--preset", "tiny"]) == 2
    assert "format_version 99" in capsys.readouterr().err
    from workbench.store import FeatureStore, StoreFormatError

    with pytest.raises(StoreFormatError, match="upgrade the workbench"):
        FeatureStore(out)


def _damage(model_dir: Path, dest: Path, how: str) -> Path:
    from safetensors.torch import load_file, save_file

    shutil.copytree(model_dir, dest)
    weights = dest / "model.safetensors"
    sd = load_file(str(weights))
    key = "mm_projector.encoder_mlp.0.weight"
    if how == "missing":
        sd.pop(key)
        save_file(sd, str(weights), metadata={"format": "pt"})
    elif how == "shape":
        sd[key] = torch.zeros(3, 5)
        save_file(sd, str(weights), metadata={"format": "pt"})
    elif how == "unexpected":
        sd["mm_projector.extra.weight"] = torch.zeros(2)
        save_file(sd, str(weights), metadata={"format": "pt"})
    elif how == "truncated":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif how == "config":
        (dest / "config.json").write_text('{"model_type": "florence_vl", ')
    elif how == "no-weights":
        weights.unlink()
    return dest


@pytest.mark.parametrize("how,phrase", [
    ("missing", r"missing tensors: mm_projector\.encoder_mlp\.0\.weight"),
    ("shape", r"wrong shapes: mm_projector\.encoder_mlp\.0\.weight is \(3, 5\) in the file"),
    ("unexpected", r"unexpected tensors: mm_projector\.extra\.weight"),
    ("truncated", "truncated or corrupt"),
    ("config", r"config\.json is not valid JSON"),
    ("no-weights", "model.safetensors"),
])
def test_damaged_checkpoints_are_refused_by_name(model_dir, tmp_path, how, phrase, capsys):
    from model.loading import load_model

    d = _damage(model_dir, tmp_path / how, how)
    with pytest.raises((ValueError, OSError), match=phrase):  # never a model with silently random parts
        load_model(d)
    assert fvl(["taps", "--model", str(d)]) == 2
    err = capsys.readouterr().err
    assert str(d) in err and "Traceback" not in err


def test_resume_weights_of_another_model_are_refused_by_name(tiny, tmp_path):
    from safetensors.torch import save_file

    from model.training.checkpoints import load_weights_into

    model, _ = tiny
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["mm_projector.encoder_mlp.0.weight"] = torch.zeros(7, 7)
    save_file(sd, str(tmp_path / "model.safetensors"))
    target = copy.deepcopy(model)
    with pytest.raises(ValueError, match=r"model\.safetensors does not fit the model .*mm_projector"):
        load_weights_into(target, tmp_path / "model.safetensors")
    sd.pop("mm_projector.encoder_mlp.0.weight")
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing \['mm_projector\.encoder_mlp\.0\.weight'\]"):
        load_weights_into(target, tmp_path / "model.safetensors")


# ---------------------------------------------------------------------------------------------
# Position limits (Florence-2: 50-entry 2-D image table at stride 32; BART: 1024 positions)
# ---------------------------------------------------------------------------------------------
def test_position_limits_are_refused_at_build_time_naming_the_limit():
    from model.loading import build_config

    for preset in ("tiny", "florence-vl-3b"):
        assert build_config(preset, image_size=992).grid_size() == 31  # 962 image + prompt tokens <= 1024
        with pytest.raises(ValueError, match=r"image_size=1632 .*51x51.*max_position_embeddings=50.*<= 1600 px"):
            build_config(preset, image_size=1632)
        with pytest.raises(ValueError, match=r"image_size=1024 gives 1025 image tokens.*has 1024 .*image_size <= 992"):
            build_config(preset, image_size=1024)


def test_the_limits_are_the_real_tables(tiny):
    """Shrink each table and run the raw modules: the check passes exactly where the lookup works."""
    from model.config import check_florence2_positions
    from model.florence_vl import FlorenceVLForConditionalGeneration

    model, _ = tiny
    cfg = copy.deepcopy(model.config)
    f2 = cfg.vision_config
    f2.vision_config.max_position_embeddings = 3  # 3 patches per axis: image side <= 96 px
    f2.text_config.max_position_embeddings = 20
    torch.manual_seed(0)
    small = FlorenceVLForConditionalGeneration(cfg).eval()
    vt = small.vision_tower
    with torch.no_grad():
        for side, fits in ((96, True), (97, False)):
            px = torch.zeros(1, 3, side, side)
            feats = vt.vision_tower(px).last_hidden_state
            if fits:
                check_florence2_positions(f2, side)
                vt.multi_modal_projector(feats)
            else:
                with pytest.raises(ValueError, match="position table has 3 entries"):
                    check_florence2_positions(f2, side)
                with pytest.raises(IndexError):  # what the user would get without the check
                    vt.multi_modal_projector(feats)
        # BART: 10 image tokens (3x3 + global) + a 10-token prompt = 20 positions fit, 11 do not
        for length, fits in ((20, True), (21, False)):
            embeds = torch.zeros(1, length, f2.text_config.d_model)
            if fits:
                check_florence2_positions(f2, 96, length - 10)
                vt.encoder(inputs_embeds=embeds)
            else:
                with pytest.raises(ValueError, match="needs 21 positions but has 20"):
                    check_florence2_positions(f2, 96, length - 10)
                with pytest.raises(IndexError):
                    vt.encoder(inputs_embeds=embeds)


def test_oversized_inputs_at_run_time_get_the_same_message(tiny, model_dir, tmp_path, capsys):
    from model.loading import load_model

    model, _ = tiny
    with torch.no_grad(), pytest.raises(ValueError, match="image_size=1632 .*<= 1600 px"):
        model.get_image_features(torch.zeros(1, 3, 1632, 1632))
    assert fvl(["taps", "--preset", "tiny", "--image-size", "1632"]) == 2
    assert "--image-size 1632" in capsys.readouterr().err
    assert fvl(["taps", "--preset", "base", "--image-size", "1024"]) == 2  # real-size preset on meta: no forward
    assert "image_size <= 992" in capsys.readouterr().err
    # a saved config with an impossible image size is refused when loaded
    d = tmp_path / "big"
    shutil.copytree(model_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "image_size": 2048}))
    with pytest.raises(ValueError, match="image_size=2048"):
        load_model(d)
    assert fvl(["generate", "--model", str(d), "--image", "packaged:grace_hopper"]) == 2
    assert "image_size=2048" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# A full disk while appending index rows (a full disk during a shard write: tests/test_store.py)
# ---------------------------------------------------------------------------------------------
class _FullDiskOs:
    """The `os` module as seen by workbench.store.writer, with writes failing (ENOSPC) while `full` is set."""

    def __init__(self):
        self.full = False

    def write(self, fd, data):
        if self.full:
            raise OSError(errno.ENOSPC, "No space left on device")
        return os.write(fd, data)

    def __getattr__(self, name):
        return getattr(os, name)


def test_full_disk_during_index_append_keeps_the_store_readable(tmp_path, monkeypatch):
    import workbench.store.writer as store_mod
    from workbench.store import FeatureStore, StoreWriteError, StoreWriter

    fake = _FullDiskOs()
    monkeypatch.setattr(store_mod, "os", fake)
    w = StoreWriter(tmp_path / "s", {"model_id": "m", "taps": {"x": {"shape": [3]}}}, shard_size=2)
    w.add("a", {"x": np.ones(3)})
    w.add("b", {"x": np.full(3, 2.0)})
    fake.full = True
    w.add("c", {"x": np.full(3, 3.0)})
    with pytest.raises(StoreWriteError, match="disk is full.*rerun the same command"):
        w.add("d", {"x": np.full(3, 4.0)})  # the shard is renamed in, then its index rows cannot be appended
    store = FeatureStore(tmp_path / "s")
    assert store.items == ["a", "b"] and store.check() == []  # the orphan shard is not referenced
    fake.full = False
    w.close()  # space is back: the same shard is written again with its rows
    store = FeatureStore(tmp_path / "s")
    assert store.items == ["a", "b", "c", "d"] and store.check() == []
    np.testing.assert_array_equal(store.load("x")[:, 0], [1, 2, 3, 4])


def test_fvl_capture_on_a_full_disk_says_so_and_resumes(good_images, tmp_path, monkeypatch, capsys):
    import workbench.store.writer as store_mod

    fake = _FullDiskOs()
    fake.full = True
    monkeypatch.setattr(store_mod, "os", fake)
    out = tmp_path / "s"
    argv = ["capture", "--preset", "tiny", "--data", str(good_images), "--taps", "depth", "--out", str(out),
            "--shard-size", "1"]
    assert fvl(argv) == 2
    err = capsys.readouterr().err
    assert "disk is full" in err and "rerun the same command" in err and "Traceback" not in err
    fake.full = False
    assert fvl(argv) == 0
    from workbench.store import FeatureStore

    assert len(FeatureStore(out).items) == 2


# ---------------------------------------------------------------------------------------------
# SIGKILL at random moments through the CLI
# ---------------------------------------------------------------------------------------------
# The child runs the real `fvl` main; the named function is slowed a little (and touches a file when
# the work starts) so that a random kill time lands inside the work on any machine.
SLOW_CHILD = textwrap.dedent("""
    import importlib, sys, time
    from pathlib import Path
    module, attr, delay, started = sys.argv[1], sys.argv[2], float(sys.argv[3]), Path(sys.argv[4])
    owner_path, _, name = attr.rpartition(".")
    owner = importlib.import_module(module)
    for part in filter(None, owner_path.split(".")):
        owner = getattr(owner, part)
    original = getattr(owner, name)
    def slowed(*args, **kwargs):
        started.touch()
        time.sleep(delay)
        return original(*args, **kwargs)
    setattr(owner, name, slowed)
    from workbench.cli import main
    sys.exit(main(sys.argv[5:]))
""")


def _run_and_kill(tmp_path: Path, target: tuple[str, str, float], argv: list[str], kill_after: float,
                  ready=lambda: True) -> int:
    """Start `fvl argv` in a child, SIGKILL it `kill_after` s after its work began (and `ready()` holds)."""
    started = tmp_path / f"started-{time.monotonic_ns()}"
    log = open(tmp_path / "child.log", "ab")
    proc = subprocess.Popen([sys.executable, "-c", SLOW_CHILD, target[0], target[1], str(target[2]), str(started),
                             *argv], stdout=log, stderr=log, cwd=REPO)
    deadline = time.monotonic() + 300
    while not (started.exists() and ready()) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(kill_after)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    rc = proc.wait()
    log.close()
    return rc


def test_fvl_capture_killed_at_random_moments_then_rerun_equals_uninterrupted(model_dir, tmp_path):
    from workbench.store import FeatureStore

    data = tmp_path / "data"  # 12 readable images and one that fails
    data.mkdir()
    for i in range(12):
        _noise("RGB", (48 + i, 40)).rotate(i * 29).save(data / f"img{i:02d}.png")
    (data / "broken.png").write_bytes(b"not a png")
    # --model DIR (tokenizers on disk) rather than --preset: the child starts without training tokenizers
    common = ["capture", "--model", str(model_dir), "--data", str(data), "--taps", "depth,prompt.ocr,fusion.input",
              "--pool", "grid2", "--batch-size", "2", "--shard-size", "2"]
    assert fvl(common + ["--out", str(tmp_path / "reference")]) == 1  # the broken image
    killed = tmp_path / "killed"  # more kill points (exact ones, mid-flush): tests/test_capture.py, test_store.py
    rc = _run_and_kill(tmp_path, ("workbench.capturing", "ImageItems.__getitem__", 0.2), common + ["--out", str(killed)],
                       kill_after=random.Random(9).uniform(0.0, 0.4))
    assert rc == -signal.SIGKILL, (tmp_path / "child.log").read_text()[-3000:]
    assert len(FeatureStore(killed).items) < 12  # really part-way, and readable after the kill
    assert fvl(common + ["--out", str(killed)]) in (0, 1)  # 1 when the broken image was not reached before
    ref, got = FeatureStore(tmp_path / "reference"), FeatureStore(killed)
    strip = lambda rows: [(r["id"], r["status"], r["labels"], r["error"]) for r in rows]  # noqa: E731
    assert strip(got.index()) == strip(ref.index())  # no duplicate, none missing, same failures
    assert got.check() == []
    for tap in ref.taps:
        np.testing.assert_array_equal(got.load(tap), ref.load(tap))


def test_fvl_train_killed_at_a_random_moment_then_resumed_matches_uninterrupted(model_dir, tmp_path):
    from safetensors.torch import load_file

    from workbench.data.synth import synth_scenes

    synth_scenes(tmp_path / "data", 8, seed=4, image_size=64, workers=1, progress=False, log=None)
    common = ["train", "finetune", "--model", str(model_dir), "--data", str(tmp_path / "data"), "--max-steps", "8",
              "--batch-size", "4", "--save-every", "1", "--save-total-limit", "2", "--quiet", "--seed", "5"]
    assert fvl(common + ["--out", str(tmp_path / "reference")]) == 0
    cut = tmp_path / "cut"
    rc = _run_and_kill(tmp_path, ("model.training.vlm", "VLMTask.forward", 0.15), common + ["--out", str(cut)],
                       kill_after=random.Random(3).uniform(0.0, 0.45),
                       ready=lambda: (cut / "checkpoint-2" / "trainer_state.json").is_file())
    assert rc == -signal.SIGKILL, (tmp_path / "child.log").read_text()[-3000:]
    assert not (cut / "model").exists()  # killed before the end
    assert fvl(common + ["--out", str(cut), "--resume"]) == 0

    def losses(run: Path) -> list[tuple[int, float]]:
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss"]) for r in rows]

    # Bit-exact resume within one process is tests/test_train.py::test_resume_gives_the_same_loss_sequence.
    # Here steps 1..k ran in the killed child and the rest in this (pytest) process, whose float results can
    # differ in the last bits (~1e-7 seen); a lost or repeated step or a stale optimizer state shows as ~1e-2.
    ref, got = losses(tmp_path / "reference"), losses(cut)
    assert [s for s, _ in got] == [s for s, _ in ref] == list(range(1, 9))  # each step once, none missing
    assert [v for _, v in got] == pytest.approx([v for _, v in ref], rel=1e-6, abs=1e-7)
    ref_w, got_w = load_file(str(tmp_path / "reference" / "model" / "model.safetensors")), \
        load_file(str(cut / "model" / "model.safetensors"))
    assert ref_w.keys() == got_w.keys()
    for k in ref_w:
        torch.testing.assert_close(got_w[k], ref_w[k], rtol=1e-4, atol=1e-5, msg=k)


def test_a_torn_metrics_line_does_not_block_resume(tmp_path):
    from workbench.data.synth import synth_scenes

    synth_scenes(tmp_path / "data", 8, seed=4, image_size=64, workers=1, progress=False, log=None)
    common = ["train", "finetune", "--preset", "tiny", "--data", str(tmp_path / "data"), "--max-steps", "3",
              "--batch-size", "4", "--save-every", "1", "--quiet", "--out", str(tmp_path / "run")]
    assert fvl(common + ["--stop-after", "2"]) == 0
    with open(tmp_path / "run" / "metrics.jsonl", "a") as fh:
        fh.write('{"stage": "finetune", "step": 3, "lo')  # a crash mid-append
    assert fvl(common + ["--resume"]) == 0
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
