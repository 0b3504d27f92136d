"""Stream contributions: the cached-stream fast path equals running the model under `ablate`,
Shapley values are efficient (sum = full - empty) on the tiny model, and `fvl contributions`
runs end to end."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from probes.streams import all_subsets, answer_loglik, stream_shapley, subset_metrics
from workbench.taps import ablate


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models are latency-bound: one intra-op thread is faster, and far faster on a busy machine."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture(scope="module")
def tiny64():
    from model.loading import build_model

    return build_model("tiny", image_size=64, seed=0)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from workbench.data.synth import synth_scenes

    d = tmp_path_factory.mktemp("streams") / "data"
    synth_scenes(d, n=6, seed=5, image_size=64, workers=1, progress=False, log=None)
    return d


@pytest.fixture(scope="module")
def rows(data_dir):
    from workbench.data.dataset import load_qa

    return load_qa(data_dir)[:10]


def test_cached_subsets_equal_the_model_under_ablate(tiny64, rows):
    model, processor = tiny64
    table = subset_metrics(model, processor, rows, metric="loglik", mode="zero", batch_size=4)
    assert len(table) == 16 and set(table) == set(all_subsets(model.stream_names))
    present = frozenset({"depth", "ocr"})
    absent = [s for s in model.stream_names if s not in present]
    px = processor.images([r["image"] for r in rows])
    with torch.no_grad(), ablate(model, absent, mode="zero"):
        feats = model.get_image_features(px)
        reference = answer_loglik(model, processor, rows, feats)
    np.testing.assert_allclose(table[present], reference, atol=1e-5)
    assert not np.allclose(table[present], table[frozenset(model.stream_names)])  # ablation changes the metric


def test_mean_mode_uses_the_evaluation_set_mean(tiny64, rows):
    model, processor = tiny64
    sub = rows[:4]
    table = subset_metrics(model, processor, sub, metric="loglik", mode="mean", batch_size=4)
    images = list(dict.fromkeys(r["image"] for r in sub))
    with torch.no_grad():
        streams = model.image_streams(processor.images(images))
        means = {k: v.mean(dim=0) for k, v in streams.items()}
        px = processor.images([r["image"] for r in sub])
        with ablate(model, ["caption", "grounding"], mode="mean", mean_features=means):
            reference = answer_loglik(model, processor, sub, model.get_image_features(px))
    np.testing.assert_allclose(table[frozenset({"depth", "ocr"})], reference, atol=1e-5)


def test_shapley_values_sum_to_full_minus_empty(tiny64, rows):
    model, processor = tiny64
    res = stream_shapley(model, processor, rows, metric="loglik", mode="zero", batch_size=8)
    assert res["players"] == ["depth", "caption", "ocr", "grounding"] and len(res["subsets"]) == 16
    types = {r["type"] for r in rows}
    assert set(res["groups"]) == types | {"all"}
    for g, r in res["groups"].items():
        assert sum(r["shapley"].values()) == pytest.approx(r["full"] - r["empty"], abs=1e-9)
        assert abs(r["efficiency_gap"]) < 1e-9
    everything = next(s for s in res["subsets"] if len(s["streams"]) == 4)
    nothing = next(s for s in res["subsets"] if not s["streams"])
    assert res["groups"]["all"]["full"] == everything["all"] and res["groups"]["all"]["empty"] == nothing["all"]
    assert res["groups"]["all"]["n"] == len(rows)


def test_accuracy_metric_and_custom_metrics(tiny64, rows):
    model, processor = tiny64
    acc = subset_metrics(model, processor, rows[:3], metric="accuracy", max_new_tokens=2)
    assert all(set(np.unique(v)) <= {0.0, 1.0} for v in acc.values())

    def mean_token_norm(model, processor, chunk, image_features):  # a metric of the image tokens only
        return image_features.norm(dim=-1).mean(dim=1).numpy()

    res = stream_shapley(model, processor, rows[:3], metric=mean_token_norm)
    assert res["metric"] == "mean_token_norm" and res["groups"]["all"]["empty"] == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="metric"):
        subset_metrics(model, processor, rows, metric="bleu")


def test_fvl_contributions_end_to_end(tmp_path, tiny64, data_dir, capsys):
    from model.loading import save_model
    from workbench.cli import main

    model_dir = save_model(*tiny64, tmp_path / "model")
    out = tmp_path / "contrib"
    rc = main(["contributions", "--model", str(model_dir), "--data", str(data_dir), "--split", "train", "--limit", "6",
               "--mode", "mean", "--out", str(out), "--json"])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    saved = json.loads((out / "contributions.json").read_text())
    assert printed["groups"] == saved["groups"] and saved["n_rows"] == 6 and saved["mode"] == "mean"
    assert (out / "contributions.png").stat().st_size > 1000
    assert main(["contributions", "--model", str(model_dir), "--data", str(data_dir), "--split", "nope",
                 "--out", str(out)]) == 2
    assert "no questions" in capsys.readouterr().err


def test_fvl_contributions_with_a_missing_image_says_so(tmp_path, data_dir, capsys):
    import shutil

    from workbench.cli import main
    from workbench.data.dataset import load_qa

    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    rows = load_qa(data, split="train")
    gone = rows[0]["image"]
    (data / "images" / gone.rsplit("/", 1)[-1]).unlink()
    rc = main(["contributions", "--preset", "tiny", "--data", str(data), "--split", "train", "--limit", "3",
               "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "missing" in err and gone.rsplit("/", 1)[-1] in err and "Traceback" not in err
