"""`fvl compare`: config validation, the statistics behind the verdicts, the cheap measures, and the whole quick
pipeline (run once per module).

The quick run IS the pipeline test: it trains every kind of step (Florence-2 pretraining, a CLIP-style encoder,
stage 1 + 2 of six variants under two seeds), evaluates, captures, measures and judges. Then a rerun must reuse
it unchanged, and a fresh run of two of its variants must reproduce their numbers exactly (determinism).
"""
from __future__ import annotations

import copy
import io
import json
import math
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest

from workbench.cli import main
from workbench.data.dataset import load_scenes
from workbench.pipelines.compare import ConfigError, load_config, shipped_config
from workbench.pipelines.compare.measures import channel_layout, correspondence
from workbench.pipelines.compare.orderings import Evidence, compute_orderings
from workbench.pipelines.compare.stats import bootstrap_accuracy, spearman_interval, t_interval, verdict
from workbench.pipelines.compare.variants import check_encoder_configs
from workbench.pipelines.compare.views import _box_in_view

QUICK = json.loads(shipped_config(quick=True).read_text())


def _cfg(**changes) -> dict:
    raw = copy.deepcopy(QUICK)
    raw.update(changes)
    return raw


def _variant(**fields) -> dict:
    v = {"name": "v", "encoder": "florence2", "encoder_training": "trained", "fusion": "channel",
         "prompts": ["caption", "ocr", "grounding"]}
    v.update(fields)
    return v


# ------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("variant, field, word", [
    (_variant(encoder="vit"), "variants[0] (v).encoder", "vit"),
    (_variant(fusion="concat"), "variants[0] (v).fusion", "concat"),
    (_variant(prompts=["caption", "ocr2"]), "variants[0] (v).prompts", "ocr2"),
    (_variant(encoder_training="dino"), "variants[0] (v).encoder_training", "dino"),
    (_variant(encoder="clip", prompts=["ocr"]), "variants[0] (v).prompts", "only the florence2 encoder"),
    (_variant(name="a/b"), "variants[0].name", "a/b"),
    (_variant(name="views"), "variants[0].name", "views"),
])
def test_bad_variant_names_the_field(variant, field, word):
    with pytest.raises(ConfigError) as exc:
        load_config(_cfg(variants=[variant], align={"reference": "v"}))
    assert field in str(exc.value) and word in str(exc.value)


def test_unknown_encoder_config_key_is_refused_before_any_work():
    cfg = load_config(_cfg(variants=[_variant(encoder="clip", prompts=[], encoder_config={"depth": 3})],
                           align={"reference": "v"}))
    with pytest.raises(ConfigError, match=r"variants\[0\] \(v\)\.encoder_config.*depth"):
        check_encoder_configs(cfg)


@pytest.mark.parametrize("changes, field", [
    ({"preset": "huge"}, "preset"),
    ({"preset": "florence-vl-8b"}, "preset"),
    ({"probe": {"labels": ["colour"]}}, "probe.labels"),
    ({"probe": {"taps": ["llm.layer0"]}}, "probe.taps"),
    ({"encoders": {"dino": {}}}, "encoders"),
    ({"training": {"pretrain": {"max_step": 3}}}, "training.pretrain"),
    ({"align": {"reference": "nope"}}, "align.reference"),
    ({"data": {"n": 5}}, "data.n"),
    ({"data": {"words": ["cat"]}}, "data.words"),
    ({"data": {"text_size": [0.3, 0.1]}}, "data.text_size"),
    ({"data": {"encoder_scenes": 4000}}, "data.encoder_scenes"),
    ({"data": {"encoder_scenes": {"n": 10, "seed": 1}}}, "data.encoder_scenes.n"),
    ({"data": {"seed": 3, "encoder_scenes": {"n": 100, "seed": 3}}}, "data.encoder_scenes.seed"),
    ({"training": {"pretrain": {"split_tasks": True}}}, "training.pretrain"),
    ({"encoders": {"florence2": {"loss_per": "word"}}}, "encoders.florence2.loss_per"),
    ({"seeds": 0}, "seeds"),
    ({"seeds": [1, 1]}, "seeds"),
    ({"measures": {"crop": [0.9, 0.5]}}, "measures.crop"),
    ({"stats": {"level": 95}}, "stats.level"),
    ({"varients": []}, "unknown top-level key"),
])
def test_bad_settings_name_the_field(changes, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(_cfg(**changes))


def test_seeds_as_count_or_list():
    assert load_config(_cfg(seed=7, seeds=3)).seeds == [7, 8, 9]
    assert load_config(_cfg(seeds=[5, 1])).seeds == [5, 1]


def test_cli_reports_config_errors(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(_cfg(variants=[_variant(fusion="sum")], align={"reference": "v"})))
    assert main(["compare", "--config", str(bad), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "fusion" in err and "sum" in err and "channel" in err
    assert not (tmp_path / "out").exists()  # nothing trained or written on a bad config
    (tmp_path / "broken.json").write_text("{not json")
    assert main(["compare", "--config", str(tmp_path / "broken.json"), "--out", str(tmp_path / "o")]) == 2
    assert "invalid JSON" in capsys.readouterr().err
    assert main(["compare", "--quick", "--out", str(tmp_path / "o"), "--device", "tpu"]) == 2
    assert "--device tpu" in capsys.readouterr().err


def test_bad_config_is_refused_before_torch_loads(tmp_path):
    import subprocess
    import sys

    code = ("import sys\nfrom workbench.cli import main\n"
            f"rc = main(['compare', '--config', {str(tmp_path / 'none.json')!r}, '--out', {str(tmp_path / 'o')!r}])\n"
            "assert 'torch' not in sys.modules, 'torch was imported to refuse a config path'\nsys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert "none.json: no such file" in proc.stderr


def test_shipped_configs_have_seeds_and_every_role():
    """The full config has >= 3 seeds and a variant for every claim's roles (nothing untestable); quick has 2."""
    full = load_config(shipped_config())
    quick = load_config(shipped_config(quick=True))
    assert len(full.seeds) >= 3 and len(quick.seeds) == 2
    check_encoder_configs(full)
    assert {v.encoder for v in full.variants} == {"florence2", "davit", "clip", "cvt", "cycle"}
    ev = _fake_evidence(full, lambda v: 0.5)
    judged, untestable = compute_orderings(full, ev)
    assert untestable == [] and len(judged) == 11


# ------------------------------------------------------------------------------------------- statistics
def test_bootstrap_interval_separates_a_clear_difference():
    rng = np.random.default_rng(0)
    good = (rng.random((3, 400)) < 0.7).astype(float)
    bad = (rng.random((3, 400)) < 0.4).astype(float)
    est, lo, hi = bootstrap_accuracy(good, bad, n_boot=500)
    assert lo < est < hi and lo > 0.2 and hi < 0.4
    assert verdict(lo, hi) == "reproduced"
    assert verdict(*bootstrap_accuracy(bad, good, n_boot=500)[1:]) == "reversed"
    same = (rng.random((3, 400)) < 0.5).astype(float)
    est, lo, hi = bootstrap_accuracy(same, same[::-1], n_boot=500)
    assert lo < 0 < hi and verdict(lo, hi) == "unresolved"


def test_bootstrap_interval_includes_seed_spread():
    """Two seeds that disagree widen the interval beyond what the questions alone give."""
    rng = np.random.default_rng(1)
    q = rng.random(300)
    steady = np.stack([(q < 0.5), (q < 0.5)]).astype(float)
    shaky = np.stack([(q < 0.3), (q < 0.7)]).astype(float)
    w_steady = np.subtract(*bootstrap_accuracy(steady, n_boot=800)[2:0:-1])
    w_shaky = np.subtract(*bootstrap_accuracy(shaky, n_boot=800)[2:0:-1])
    assert w_shaky > 2 * w_steady


def test_t_interval_and_spearman():
    m, lo, hi = t_interval([1.0, 2.0, 3.0])
    assert m == pytest.approx(2.0) and lo == pytest.approx(2 - 4.303 / math.sqrt(3), abs=1e-3)
    assert math.isnan(t_interval([1.0])[1])
    vqa = np.array([[0.1, 0.12], [0.3, 0.31], [0.5, 0.49], [0.7, 0.72], [0.9, 0.88]])
    rho, lo, hi = spearman_interval(vqa * 2 + 1, vqa, n_boot=300)
    assert rho == pytest.approx(1.0) and lo <= 1.0 and hi == pytest.approx(1.0)
    rho, lo, hi = spearman_interval(-vqa, vqa, n_boot=300)
    assert rho == pytest.approx(-1.0) and hi <= -0.5


# ------------------------------------------------------------------------------------------- measures
def test_box_in_view_follows_crop_and_mirror():
    box = [10, 20, 30, 40]
    assert _box_in_view(box, 0, 0, 64, 64, flip=False) == [10, 20, 30, 40]
    assert _box_in_view(box, 10, 10, 32, 64, flip=False) == [0, 20, 40, 60]  # crop at (10,10), scaled x2
    assert _box_in_view(box, 10, 10, 32, 64, flip=True) == [24, 20, 64, 60]
    assert _box_in_view(box, 30, 30, 34, 64, flip=False) is None  # mostly cut away


def _views_case(distinct: bool, seed: int = 0):
    """Scenes of 3 objects in a 4x4 token grid; each object's cells carry its own vector in both views when
    `distinct`, else every cell is noise."""
    rng = np.random.default_rng(seed)
    size, side, c = 64, 4, 16
    feats, items, boxes = [], [], {}
    for s in range(12):
        cells = rng.choice(side * side, size=3, replace=False)
        vecs = rng.normal(size=(3, c))
        entry = {}
        for tag in ("a", "b"):
            grid = rng.normal(size=(side * side, c)) * 0.1
            order = rng.permutation(side * side)[:3] if tag == "b" else cells  # objects move between views
            entry[tag] = []
            for k, cell in enumerate(order):
                grid[cell] = vecs[k] if distinct else rng.normal(size=c)
                y, x = divmod(int(cell), side)
                entry[tag].append([x * 16 + 2, y * 16 + 2, x * 16 + 14, y * 16 + 14])
            feats.append(np.concatenate([np.zeros((1, c)), grid]))
            items.append(f"s{s}_{tag}.png")
        boxes[f"s{s}"] = entry
    return np.stack(feats), items, boxes, size


def test_correspondence_finds_objects_that_keep_their_features():
    score, chance, n = correspondence(*_views_case(distinct=True))
    assert n == 36 and chance == pytest.approx(1 / 36) and score == pytest.approx(1.0)
    noise, chance, _ = correspondence(*_views_case(distinct=False))
    assert noise < 0.2  # near chance (1/36) when the features carry no identity


def test_token_fusion_views_are_read_as_the_channel_grid():
    """Token concatenation stacks the streams' token maps one after the other; rearranged, the correspondence
    score sees the same grid (and the same number) as channel fusion of the same streams."""
    feats, items, boxes, size = _views_case(distinct=True)
    streams = [feats, feats[:, :, ::-1] * 2.0]  # two streams of the same grid
    channel = np.concatenate(streams, axis=2)
    token = np.concatenate(streams, axis=1)
    assert np.array_equal(channel_layout(token, 2), channel)
    assert correspondence(channel_layout(token, 2), items, boxes, size) == correspondence(channel, items, boxes, size)
    with pytest.raises(ValueError, match="square grid"):
        correspondence(token, items, boxes, size)


# ------------------------------------------------------------------------------------------- orderings
def _fake_evidence(cfg, score, loss=lambda v: 3.0, n_q: int = 300):
    rng = np.random.default_rng(0)
    types = ["reading" if i % 3 == 0 else "count" for i in range(n_q)]
    records, measures = {}, {}
    for v in cfg.variants:
        records[v.name] = [{"seed": s, "correct": (rng.random(n_q) < score(v)).astype(int).tolist(), "types": types}
                           for s in cfg.seeds]
        measures[v.name] = [{"alignment": loss(v) + 0.001 * i, "probe": 0.5, "correspondence": 0.5,
                             "fig5": {"all": 3.0, "without": {"depth": 3.1, "ocr": 3.2}}}
                            for i, _ in enumerate(cfg.seeds)]
    return Evidence(cfg, records, measures)


def test_verdicts_come_from_the_interval_of_the_difference():
    cfg = load_config(shipped_config())
    by_fusion = {"channel": 0.8, "average": 0.5, "token": 0.2}
    good = lambda v: by_fusion[v.fusion] if v.prompts == ("caption", "ocr", "grounding") else 0.2  # noqa: E731
    judged, _ = compute_orderings(cfg, _fake_evidence(cfg, good))
    t1 = [o for o in judged if o["source"] == "Table 1"]
    assert [o["verdict"] for o in t1] == ["reproduced", "reproduced"]
    judged, _ = compute_orderings(cfg, _fake_evidence(cfg, lambda v: 1.0 - good(v)))
    assert all(o["verdict"] == "reversed" for o in judged if o["source"] == "Table 1")
    judged, _ = compute_orderings(cfg, _fake_evidence(cfg, lambda v: 0.5))
    assert all(o["verdict"] == "unresolved" for o in judged if o["metric"].startswith("VQA"))
    for o in judged:
        assert o["ci_low"] <= o["diff"] <= o["ci_high"]
    fig5 = next(o for o in judged if o["source"] == "Fig. 5")
    assert fig5["verdict"] == "reproduced" and fig5["diff"] == pytest.approx(0.1)


# ------------------------------------------------------------------------------------------- the quick run
@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare") / "quick"
    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = main(["compare", "--quick", "--out", str(out), "--json", "--quiet"])
    assert rc == 0
    return out, json.loads(buf.getvalue().strip().splitlines()[-1])


def _consistent(o: dict) -> bool:
    lo, hi = o["ci_low"], o["ci_high"]
    if o["verdict"] == "reproduced":
        return lo is not None and lo > 0
    if o["verdict"] == "reversed":
        return hi is not None and hi < 0
    return o["verdict"] == "unresolved" and not (lo is not None and lo > 0) and not (hi is not None and hi < 0)


def test_quick_run_judges_every_claim_with_an_interval(quick_run):
    out, result = quick_run
    cfg = load_config(shipped_config(quick=True))
    assert result["seeds"] == cfg.seeds and len(result["seeds"]) >= 2
    assert result["orderings"]
    for o in result["orderings"]:
        assert {"claim", "paper", "ours", "diff", "ci_low", "ci_high", "verdict"} <= set(o)
        assert o["verdict"] in ("reproduced", "reversed", "unresolved") and _consistent(o), o
        assert o["ci_low"] <= o["diff"] <= o["ci_high"]
    # the quick config has no token-fusion variant: that claim is untestable, and says why
    assert {"claim": "channel fusion beats token concatenation", "source": "Table 1", "missing": ["token"]} \
        in result["untestable"]
    for name in ("alignment", "probe", "correspondence"):
        p = result["proxies"][name]
        assert -1 <= p["spearman"] <= 1 and p["ci_low"] <= p["ci_high"]
        assert p["picks"] in {v.name for v in cfg.variants}
    for r in result["variants"]:
        assert 0 <= r["vqa.overall"]["ci_low"] <= r["vqa.overall"]["value"] <= r["vqa.overall"]["ci_high"] <= 1
        assert r["alignment"]["value"] > 0 and 0 <= r["correspondence"]["value"] <= 1
    for name in ("forest.png", "proxies.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
    md = (out / "compare.md").read_text()
    for paper_number in ("50.8", "50.4", "58.3", "57.3", "31.2"):
        assert paper_number in md
    assert "| fvl-channel |" in md and "unresolved" in md and "Spearman" in md
    assert json.loads((out / "compare.json").read_text())["orderings"] == result["orderings"]
    # the config's reading vocabulary made the data, and the reading chance follows it
    manifest = json.loads((out / "data" / "manifest.json").read_text())
    assert manifest["words"] == cfg.data["words"] and manifest["text_size"] == cfg.data["text_size"]
    assert result["variants"][0]["chance"]["reading"] == pytest.approx(1 / len(cfg.data["words"]), abs=1e-6)
    # each pretrained encoder is listed once; the Florence-2 tower also scores itself on the held-out scenes
    f2 = [e for e in result["encoders"] if e["objective"] == "florence2"]
    assert len(f2) == 1 and f2[0]["steps"] == cfg.encoders["florence2"]["max_steps"]
    own = f2[0]["tower_eval"]
    assert own["split"] == cfg.eval["split"] == "test"
    assert own["images"] == len(load_scenes(out / "data", split="test"))
    assert all(0 <= own[k] <= 1 for k in ("caption_token_f1", "region_recall_iou50"))
    assert "## Pretrained encoders" in md


def test_rerun_reuses_finished_work(quick_run, capsys):
    out, first = quick_run
    assert main(["compare", "--quick", "--out", str(out), "--json", "--quiet"]) == 0
    captured = capsys.readouterr()
    again = json.loads(captured.out.strip().splitlines()[-1])
    assert again["orderings"] == first["orderings"] and again["proxies"] == first["proxies"]
    cfg = load_config(shipped_config(quick=True))
    assert captured.err.count("finished earlier, reusing it") == len(cfg.variants) * len(cfg.seeds)
    assert ": encoder " not in captured.err and "VLM" not in captured.err


def test_changed_settings_are_refused_not_mixed(quick_run, capsys):
    out, _ = quick_run
    path = Path(out).parent / "changed.json"
    path.write_text(json.dumps(_cfg(training={"finetune": {"max_steps": 17, "batch_size": 8, "lr": 1e-3}})))
    assert main(["compare", "--config", str(path), "--out", str(out), "--quiet"]) == 2
    assert "other settings" in capsys.readouterr().err


def test_same_seeds_give_the_same_numbers(quick_run, tmp_path):
    """A fresh run of two variants (Florence-2 pretraining included) reproduces their numbers exactly."""
    _, first = quick_run
    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = main(["compare", "--quick", "--out", str(tmp_path / "again"), "--only", "fvl-channel,davit-depth-only",
                   "--json", "--quiet"])
    assert rc == 0
    second = json.loads(buf.getvalue().strip().splitlines()[-1])
    keep = ("vqa.overall", "vqa.reading", "alignment", "probe", "correspondence")
    before = {r["variant"]: {k: r[k] for k in keep} for r in first["variants"]}
    for row in second["variants"]:
        assert {k: row[k] for k in keep} == before[row["variant"]]
    claim = "depth + breadth beats depth only overall"
    pick = lambda res: next(o for o in res["orderings"] if o["claim"] == claim)  # noqa: E731
    assert pick(second) == pick(first)


def test_app_compare_view_shows_the_verdicts(quick_run):
    """The app's Compare view renders the same claims, verdicts and measures as compare.md."""
    from streamlit.testing.v1 import AppTest

    out, result = quick_run
    script = ("import json\nfrom workbench.app_views.compare_view import _render_verdicts\n"
              f"_render_verdicts(json.loads(open({str(out / 'compare.json')!r}).read()))\n")
    at = AppTest.from_string(script, default_timeout=120).run()
    assert not at.exception
    assert [s.value for s in at.subheader] == ["The paper's claims", "Cheap measures against VQA accuracy", "Variants",
                                               "Pretrained encoders"]
    claims = at.dataframe[0].value
    assert list(claims["claim"]) == [o["claim"] for o in result["orderings"]]
    assert list(claims["verdict"]) == [o["verdict"] for o in result["orderings"]]
    assert list(at.dataframe[1].value["measure"]) == ["alignment", "probe", "correspondence"]
    assert len(at.get("vega_lite_chart")) == 1  # the forest plot
    encoders = at.dataframe[3].value
    assert list(encoders["objective"]) == [e["objective"] for e in result["encoders"]]
    assert "ocr_exact_match_with_text" in encoders.columns


def test_supervised_and_cycle_encoders_train_and_fit_their_variants(tmp_path):
    """The objectives the quick run does not use (CvT supervised, cycle-contrast) train, save and load."""
    from workbench.data.synth import synth_scenes
    from workbench.pipelines.compare.variants import (Context, build_variant_model, load_encoder_weights,
                                                       trained_encoder)

    raw = _cfg(variants=[{"name": "cvt", "encoder": "cvt"}, {"name": "cycle", "encoder": "cycle"}],
               align={"reference": "cvt"}, data={"n": 20, "image_size": 64, "seed": 0, "splits": [0.6, 0.2, 0.2]},
               encoders={"supervised": {"steps": 2, "batch_size": 4}, "cycle": {"steps": 2, "batch_size": 4,
                         "num_classes": 2, "videos_per_class": 2, "frames": 3}})
    cfg = load_config(raw)
    synth_scenes(tmp_path / "data", 20, seed=0, image_size=64, splits=[0.6, 0.2, 0.2], progress=False, log=None)
    ctx = Context(cfg, tmp_path, tmp_path / "data", tmp_path / "views", False, False, lambda s: None,
                  lambda *a: None)
    for v in cfg.variants:
        weights, record = trained_encoder(ctx, v)
        assert weights.is_file() and record["steps"] == 2 and record["objective"] in ("supervised", "cycle")
        model, _ = build_variant_model(cfg, v, cfg.seeds[0])
        load_encoder_weights(model, v, weights)  # raises if the trained weights do not fit the variant
    assert trained_encoder(ctx, cfg.variants[0])[1]["scenes"] == 12  # the comparison's train split


def test_encoders_pretrain_on_their_own_corpus_when_the_config_names_one(tmp_path):
    """`data.encoder_scenes` draws a separate corpus (all of it for training, other scenes than the comparison's)
    and the scene-trained encoders learn from it; the comparison's own data is unchanged."""
    from workbench.pipelines.compare.run import _prepare_data
    from workbench.pipelines.compare.variants import Context, trained_encoder

    data = {"n": 20, "image_size": 64, "seed": 0, "splits": [0.6, 0.2, 0.2], "encoder_scenes": {"n": 24, "seed": 9}}
    cfg = load_config(_cfg(variants=[{"name": "cvt", "encoder": "cvt"}], align={"reference": "cvt"}, data=data,
                           encoders={"supervised": {"steps": 2, "batch_size": 4}}))
    data_dir, corpus, views = _prepare_data(cfg, tmp_path, progress=False)
    assert corpus != data_dir and len(load_scenes(corpus, split="train")) == 24
    assert len(load_scenes(data_dir, split="train")) == 12
    images = lambda d: {p.read_bytes() for p in (d / "images").glob("*.png")}  # noqa: E731
    assert not images(corpus) & images(data_dir)  # no comparison scene, test split included, is pretrained on
    ctx = Context(cfg, tmp_path, data_dir, views, False, False, lambda s: None, lambda *a: None,
                  encoder_data_dir=corpus)
    assert trained_encoder(ctx, cfg.variants[0])[1]["scenes"] == 24
