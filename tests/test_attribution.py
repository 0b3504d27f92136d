"""Attributions: IG completeness on the tiny model, stream shares as a distribution, zero share for a
zero-ablated stream, targets that equal the model's own numbers, occlusion/IG plumbing on a known
function, and `fvl attribute` end to end."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from probes.attribution import (AnswerScore, AttributionError, ProbeScore, linear_probe, pixel_attribution,
                                stream_attribution)
from workbench.taps import ablate, capture


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models are latency-bound: one intra-op thread is faster, and far faster on a busy machine."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture(scope="module")
def tiny64():
    """Tiny preset at 64 px (5 image tokens): the same architecture, ~10x cheaper per forward."""
    from model.loading import build_model

    return build_model("tiny", image_size=64, seed=0)


@pytest.fixture(scope="module")
def model_dir(tiny64, tmp_path_factory):
    from model.loading import save_model

    return save_model(*tiny64, tmp_path_factory.mktemp("attr") / "model")


@pytest.fixture(scope="module")
def scene():
    from workbench.data.scenes import generate_scene

    return generate_scene(7, image_size=64).image


def test_answer_score_equals_the_models_own_logit_and_loglik(tiny64, scene):
    model, processor = tiny64
    px = processor.images([scene])
    logit = AnswerScore(model, processor, "What color is it?", "red circle")
    ids, labels = processor.encode_conversation([("What color is it?", "red circle")])
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), pixel_values=px, labels=torch.tensor([labels]))
        assert float(logit(px)[0]) == pytest.approx(float(out.logits[0, logit.first - 1, ids[logit.first]]), abs=1e-5)
        n_answer = sum(1 for lab in labels if lab != -100)
        loglik = AnswerScore(model, processor, "What color is it?", "red circle", score="logprob")
        assert float(loglik(px)[0]) == pytest.approx(-float(out.loss) * n_answer, rel=1e-5)
    with pytest.raises(AttributionError, match="empty"):
        AnswerScore(model, processor, "Q?", "  ")


def test_integrated_gradients_completeness_on_pixels(tiny64, scene):
    model, processor = tiny64
    px = processor.images([scene])
    target = AnswerScore(model, processor, "What color is the circle?", "red")
    res = pixel_attribution(model, px, target, method="ig", steps=64, internal_batch_size=32)
    assert res.attributions.shape == (3, 64, 64) and res.heat.shape == (64, 64)
    diff = res.output - res.baseline_output
    assert abs(diff) > 1e-3  # the image matters, so the check below means something
    assert res.attributions.sum() - diff == pytest.approx(res.delta, abs=1e-4)  # delta is what it says
    assert res.relative_delta < 0.01
    top = res.top_pixels(5)
    assert len(top) == 5 and abs(top[0]["value"]) == pytest.approx(np.abs(res.heat).max())
    assert res.to_dict()["completeness"].startswith("sum(attr)")


def test_stream_shares_are_a_distribution_with_small_delta(tiny64, scene):
    model, processor = tiny64
    px = processor.images([scene])
    target = AnswerScore(model, processor, "What is written?", "blue")
    res = stream_attribution(model, px, target, steps=64, internal_batch_size=64)
    assert res.streams == ["depth", "caption", "ocr", "grounding"]
    assert all(v >= 0 for v in res.shares.values()) and sum(res.shares.values()) == pytest.approx(1.0, abs=1e-9)
    assert res.relative_delta < 0.01
    # signed stream sums add up to the output difference (minus the integration error)
    assert sum(res.signed.values()) == pytest.approx(res.output - res.baseline_output + res.delta, abs=1e-4)
    with torch.no_grad(), ablate(model, list(model.stream_names), mode="zero"):
        empty = float(target(px)[0])
    assert res.baseline_output == pytest.approx(empty, abs=1e-5)  # the zero baseline is "all streams ablated"
    assert {k: v.shape for k, v in res.token_maps.items()} == {s: (5,) for s in res.streams}


def test_a_zero_ablated_stream_gets_zero_share(tiny64, scene):
    """True by construction (IG is (x - x') times a mean gradient, and the ablated stream's input
    equals its zero baseline), so this checks the slices: exactly the ablated one must be zero."""
    model, processor = tiny64
    px = processor.images([scene])
    target = AnswerScore(model, processor, "What is written?", "blue")
    with ablate(model, "ocr", mode="zero"):
        res = stream_attribution(model, px, target, steps=16, internal_batch_size=16)
    assert res.shares["ocr"] == 0.0 and res.signed["ocr"] == 0.0
    assert min(res.shares[s] for s in ("depth", "caption", "grounding")) > 0.01


def test_probe_target_matches_captured_tap_and_is_complete(tiny64, scene):
    model, processor = tiny64
    px = processor.images([scene])
    rng = np.random.default_rng(0)
    probe = linear_probe(rng.normal(size=(3, 64)), rng.normal(size=3))
    score = ProbeScore(model, "prompt.ocr.layer0", probe, class_index=2)
    with torch.no_grad(), capture(model, ["prompt.ocr.layer0"], pool="mean") as cache:
        model.get_image_features(px)
        value = score(px)
    expected = probe(cache["prompt.ocr.layer0"].double())[:, 2]
    assert float(value[0]) == pytest.approx(float(expected[0]), abs=1e-4)
    res = pixel_attribution(model, px, score, steps=64, internal_batch_size=32)
    assert res.relative_delta < 0.05 and res.target["tap"] == "prompt.ocr.layer0"
    with pytest.raises(AttributionError, match="class_index"):
        ProbeScore(model, "depth", probe)(px)


def test_probe_score_attributes_the_fitted_probe_itself(tiny64, scene):
    """A LinearProbe fitted by the probe matrix's solver is what ProbeScore differentiates: its logit on
    the pooled tap read by capture(detach=False) equals the probe's own decision function there."""
    from probes.estimator import LinearProbe

    model, processor = tiny64
    px = processor.images([scene])
    rng = np.random.default_rng(1)
    X = rng.normal(size=(90, 64)).astype(np.float32)
    y = np.array(["a", "b", "c"])[X[:, :3].argmax(1)]
    probe = LinearProbe(C=1.0).fit(X, y)
    score = ProbeScore(model, "prompt.ocr.layer0", probe, class_index=1)
    with torch.no_grad(), capture(model, ["prompt.ocr.layer0"], pool="mean") as cache:
        model.get_image_features(px)
    pooled = cache["prompt.ocr.layer0"].double().numpy()
    with torch.no_grad():
        value = float(score(px)[0])
    assert value == pytest.approx(float(probe.decision_function(pooled)[0, 1]), abs=1e-4)
    res = pixel_attribution(model, px, score, steps=64, internal_batch_size=32)
    assert np.abs(res.attributions).sum() > 0 and res.relative_delta < 0.1


class _Region(nn.Module):
    """score = 2 * sum of channel-0 pixels in rows 0-7, columns 8-15: a known, linear answer."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return 2 * x[:, 0, 0:8, 8:16].sum(dim=(1, 2))


def test_ig_and_occlusion_find_a_known_region():
    model = _Region()
    px = torch.rand(1, 3, 32, 32) + 0.5
    ig = pixel_attribution(model, px, model, method="ig", steps=8, baseline=0.0)
    expected = torch.zeros(3, 32, 32)
    expected[0, 0:8, 8:16] = 2 * px[0, 0, 0:8, 8:16]
    np.testing.assert_allclose(ig.attributions, expected.numpy(), atol=1e-5)  # IG of a linear function is exact
    assert abs(ig.delta) < 1e-4
    occ = pixel_attribution(model, px, model, method="occlusion", window=8, stride=8, baseline=0.0)
    assert occ.delta is None and occ.to_dict()["completeness"] == "not defined for occlusion"
    assert np.abs(occ.heat[8:, :]).max() == 0 and np.abs(occ.heat[:, 16:]).max() == 0
    assert all(p["y"] < 8 and 8 <= p["x"] < 16 for p in occ.top_pixels(10))
    with pytest.raises(AttributionError, match="method"):
        pixel_attribution(model, px, model, method="saliency")


def test_fvl_attribute_end_to_end(tmp_path, model_dir, scene, capsys):
    from workbench.cli import main

    image = tmp_path / "scene.png"
    scene.save(image)
    out = tmp_path / "attr"
    rc = main(["attribute", "--model", str(model_dir), "--image", str(image), "--question", "What color?",
               "--answer", "red", "--steps", "8", "--stream-steps", "16", "--out", str(out), "--json"])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    saved = json.loads((out / "attribution.json").read_text())
    assert saved["streams"]["shares"] == printed["streams"]["shares"]
    assert sum(saved["streams"]["shares"].values()) == pytest.approx(1.0)
    assert "delta" in saved["pixels"] and "delta" in saved["streams"] and len(saved["pixels"]["top_pixels"]) == 10
    assert (out / "attribution.png").stat().st_size > 1000
    rc = main(["attribute", "--model", str(model_dir), "--image", str(image), "--question", "Q", "--answer", "red",
               "--method", "occlusion", "--window", "16", "--no-streams", "--out", str(out), "--json"])
    assert rc == 0 and json.loads((out / "attribution.json").read_text())["streams"] is None
    assert main(["attribute", "--preset", "tiny", "--image", str(tmp_path / "missing.png"), "--question", "Q",
                 "--answer", "A", "--out", str(out)]) == 2
    assert "missing.png" in capsys.readouterr().err


def test_fvl_attribute_a_probe_fitted_on_a_store(tmp_path, tiny64, model_dir, capsys):
    from workbench.capturing import capture_dataset
    from workbench.cli import main
    from workbench.data.dataset import open_dataset
    from workbench.data.synth import synth_scenes

    model, processor = tiny64
    data, store = tmp_path / "data", tmp_path / "store"
    synth_scenes(data, n=8, seed=1, image_size=64, workers=1, progress=False, log=None)
    capture_dataset(model, processor, open_dataset(data), ["prompt.ocr"], "mean", store, model_id=str(model_dir),
                    progress=False)
    image = str(next((data / "images").glob("*.png")))
    out = tmp_path / "attr"
    rc = main(["attribute", "--model", str(model_dir), "--image", image, "--probe", "main_shape", "--store", str(store),
               "--tap", "prompt.ocr", "--steps", "8", "--out", str(out), "--json"])
    assert rc == 0
    saved = json.loads((out / "attribution.json").read_text())
    target = saved["pixels"]["target"]
    assert target["kind"] == "probe" and target["label"] == "main_shape" and target["class"] in target["classes"]
    assert saved["streams"] is None and saved["pixels"]["delta"] is not None
    capsys.readouterr()
    assert main(["attribute", "--model", str(model_dir), "--image", image, "--probe", "main_shape",
                 "--out", str(out)]) == 2
    assert "--store" in capsys.readouterr().err


def test_fvl_attribute_reuses_a_saved_probe(tmp_path, model_dir, scene, capsys):
    """`--probe-file` attributes a probe saved by `fvl probe --save-probes` as it is, without refitting."""
    from probes.estimator import LinearProbe
    from workbench.cli import main

    rng = np.random.default_rng(2)
    X = rng.normal(size=(60, 64)).astype(np.float32)
    probe = LinearProbe().fit(X, np.where(X[:, 0] > 0, "yes", "no"))
    saved = probe.save(tmp_path / "probes" / "prompt.ocr" / "flag", tap="prompt.ocr", label="flag", pool="mean")
    image = tmp_path / "scene.png"
    scene.save(image)
    out = tmp_path / "attr"
    assert main(["attribute", "--model", str(model_dir), "--image", str(image), "--probe-file", str(saved),
                 "--probe-class", "yes", "--steps", "4", "--out", str(out), "--json"]) == 0
    target = json.loads((out / "attribution.json").read_text())["pixels"]["target"]
    assert (target["tap"], target["label"], target["class"], target["classes"]) == ("prompt.ocr", "flag", "yes",
                                                                                     ["no", "yes"])
    capsys.readouterr()
    assert main(["attribute", "--model", str(model_dir), "--image", str(image), "--probe-file", str(tmp_path),
                 "--out", str(out)]) == 2
    assert "holds no saved probe" in capsys.readouterr().err
