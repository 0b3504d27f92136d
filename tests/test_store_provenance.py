"""Analyses refuse a store that was not captured from the data or weights they are handed, by name, and
`--force` goes on with the mismatch recorded in the output."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from workbench.cli import main as fvl


@pytest.fixture(scope="module")
def tiny64():
    from model.loading import build_model

    return build_model("tiny", image_size=64, seed=0)


@pytest.fixture(scope="module")
def model_dir(tiny64, tmp_path_factory):
    from model.loading import save_model

    return Path(save_model(*tiny64, tmp_path_factory.mktemp("prov") / "model"))


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    from workbench.data.synth import synth_scenes

    root = tmp_path_factory.mktemp("data")
    for name, seed in (("a", 1), ("b", 2)):
        synth_scenes(root / name, n=12, seed=seed, image_size=64, workers=1, progress=False, log=None)
    return root / "a", root / "b"


@pytest.fixture(scope="module")
def store(tiny64, model_dir, datasets, tmp_path_factory):
    from workbench.capturing import capture_dataset
    from workbench.data.dataset import open_dataset

    out = tmp_path_factory.mktemp("store") / "s"
    capture_dataset(*tiny64, open_dataset(datasets[0]), ["prompt.ocr"], "mean", out, model_id=str(model_dir),
                    progress=False)
    return out


def test_fvl_align_refuses_a_store_of_another_data_set(store, datasets, tiny_llama, tmp_path, capsys):
    base = ["align", "--store", f"s={store}", "--text-model", str(tiny_llama), "--steps", "5", "--batch-size", "4",
            "--no-leave-one-out", "--taps", "prompt.ocr", "--json"]
    assert fvl(base + ["--data", str(datasets[0]), "--out", str(tmp_path / "ok")]) == 0
    assert "forced_store_mismatch" not in json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert fvl(base + ["--data", str(datasets[1]), "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "--store s" in err and "other labels" in err and "--force" in err and "Traceback" not in err
    assert not (tmp_path / "bad" / "alignment.json").exists()
    assert fvl(base + ["--data", str(datasets[1]), "--out", str(tmp_path / "forced"), "--force"]) == 0
    saved = json.loads((tmp_path / "forced" / "alignment.json").read_text())
    assert any("other labels" in p for p in saved["forced_store_mismatch"]["s"])


def test_fvl_attribute_refuses_a_probe_store_of_other_weights(store, model_dir, datasets, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    other = tmp_path / "retrained"
    shutil.copytree(model_dir, other)
    weights = next(other.rglob("*.safetensors"))
    sd = load_file(str(weights))
    key = next(k for k in sorted(sd) if sd[k].is_floating_point())
    sd[key] = sd[key] * 1.01
    save_file(sd, str(weights), metadata={"format": "pt"})
    image = str(next((datasets[0] / "images").glob("*.png")))
    base = ["attribute", "--image", image, "--probe", "main_shape", "--store", str(store), "--tap", "prompt.ocr",
            "--steps", "4", "--json"]
    assert fvl(base + ["--model", str(other), "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "other weights" in err and "--force" in err and "Traceback" not in err
    assert fvl(base + ["--model", str(other), "--out", str(tmp_path / "forced"), "--force"]) == 0
    saved = json.loads((tmp_path / "forced" / "attribution.json").read_text())
    assert "other weights" in saved["forced_store_mismatch"][0]
    capsys.readouterr()
    # the same weights under another path pass without --force
    assert fvl(base + ["--model", str(model_dir.resolve()) + "/", "--out", str(tmp_path / "same")]) == 0
    assert "forced_store_mismatch" not in json.loads((tmp_path / "same" / "attribution.json").read_text())
    assert np.isfinite(json.loads((tmp_path / "same" / "attribution.json").read_text())["pixels"]["delta"])
