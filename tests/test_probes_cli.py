"""`fvl probe`, `fvl similarity` and `fvl heatmap` over small hand-written feature stores."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from workbench.cli import main
from workbench.store import StoreWriter


@pytest.fixture(autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def token_store(path, n=40, seed=0):
    """depth / prompt.caption / prompt.ocr token maps (17 tokens = 4x4 + global) with a planted colour signal."""
    rng = np.random.default_rng(seed)
    taps = {"depth": [17, 8], "prompt.caption": [17, 8], "prompt.ocr": [17, 8], "vision.stage1": [6, 4, 4]}
    manifest = {"model_id": "test", "dtype": "float32", "taps": {t: {"shape": s} for t, s in taps.items()}}
    colours = ["red", "green", "blue"]
    with StoreWriter(path, manifest) as w:
        for i in range(n):
            c = i % 3
            depth = rng.normal(size=(17, 8)).astype(np.float32)
            depth[:, c] += 2.0
            feats = {"depth": depth, "prompt.caption": depth + 0.3 * rng.normal(size=(17, 8)).astype(np.float32),
                     "prompt.ocr": rng.normal(size=(17, 8)).astype(np.float32),
                     "vision.stage1": rng.normal(size=(6, 4, 4)).astype(np.float32)}
            w.add(f"img{i:03d}", feats, labels={"colour": colours[c], "x": float(depth[0, c]), "const": 1,
                                                "name": f"img{i:03d}"})
    return path


def test_fvl_probe_writes_matrix(tmp_path, capsys):
    store = token_store(tmp_path / "store")
    rc = main(["probe", "--store", str(store), "--out", str(tmp_path / "out"), "--cs", "0.1,1", "--folds", "3",
               "--select", "cv", "--json"])
    assert rc == 0
    d = json.loads((tmp_path / "out" / "probe.json").read_text())
    assert set(d["labels"]) == {"colour", "x"}                 # constant and id-like labels are skipped
    assert set(d["settings"]["skipped_labels"]) == {"const", "name"}
    by = {(r["tap"], r["label"]): r for r in d["results"]}
    assert by[("depth", "colour")]["score_mean"] > 0.8 > by[("prompt.ocr", "colour")]["score_mean"]
    assert (tmp_path / "out" / "probe.png").stat().st_size > 0 and (tmp_path / "out" / "probe.md").exists()
    assert main(["probe", "--store", str(store), "--out", str(tmp_path / "o2"), "--labels", "nope"]) == 2
    assert "--labels" in capsys.readouterr().err
    # the solver's preconditioner changes how it gets there, not what it finds
    assert main(["probe", "--store", str(store), "--out", str(tmp_path / "on"), "--cs", "0.1,1", "--folds", "3",
                 "--select", "cv", "--precondition", "on", "--json"]) == 0
    on = json.loads((tmp_path / "on" / "probe.json").read_text())
    assert on["settings"]["precondition"] is True
    by_on = {(r["tap"], r["label"]): r for r in on["results"]}
    assert by_on[("depth", "colour")]["solver"]["preconditioned"]
    for key, r in by.items():
        if r["task"] == "classification":
            assert abs(r["score_mean"] - by_on[key]["score_mean"]) <= 0.03, key


def test_fvl_bench_probe_reports_both_comparisons(capsys):
    assert main(["bench", "probe", "--json", "--n", "240", "--d", "16", "--classes", "2,3", "--folds", "3",
                 "--no-sweep", "--no-full"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["speedup"] > 0 and r["max_acc_diff"] <= 0.02 and r["goal_met"] in (True, False) and r["repeats"] == 3
    assert r["products_floor_s"] > 0 and r["speedup_bound"] > 0
    # the ceiling with the probe matrix's fixed costs: below the products-only one, and their ratio
    assert r["ours_fixed_s"] > 0 and r["speedup_bound_with_fixed"] <= r["speedup_bound"]
    expected = r["sklearn_s"] / (r["ours_fixed_s"] + r["products_floor_s"])
    assert r["speedup_bound_with_fixed"] == pytest.approx(expected, rel=0.05)
    # on the correlated copy 'auto' switches the preconditioner on, needs fewer iterations, and lands
    # where a converged scikit-learn does
    assert r["correlated_precondition_used"] is True
    assert r["precondition_sweep_iters"]["auto"] < r["precondition_sweep_iters"]["plain"]
    assert r["correlated_max_acc_diff_vs_converged"]["ours_auto"] <= 0.02
    assert r["correlated_speedup"] > 0 and r["correlated_sklearn_iters"][1] >= r["correlated_sklearn_iters"][0]


def test_fvl_similarity_cka_maps_and_embedding(tmp_path):
    store = token_store(tmp_path / "store")
    out = tmp_path / "sim"
    rc = main(["similarity", "--store", str(store), "--out", str(out), "--items", "img001", "--embed", "colour",
               "--method", "pca", "--taps", "depth,prompt.caption,prompt.ocr"])
    assert rc == 0
    d = json.loads((out / "similarity.json").read_text())
    names = d["cka"]["labels"]
    m = np.array(d["cka"]["matrix"])
    assert names == ["depth", "prompt.caption", "prompt.ocr"] and np.allclose(np.diag(m), 1)
    assert m[0, 1] > m[0, 2]
    item = d["items"]["img001"]
    assert item["reference"] == "depth" and item["mean_cosine"]["prompt.caption"] > item["mean_cosine"]["prompt.ocr"]
    for f in ("cka.png", "diff_img001.png", "pca_img001.png", "embed_depth.png"):
        assert (out / f).stat().st_size > 0


def test_fvl_heatmap_figures_and_probe(tmp_path):
    import torch.nn.functional as F

    from workbench.data.stick_figures import FLIP_PAIRS

    fig_dir = tmp_path / "fig"
    assert main(["heatmap", "figures", "--out", str(fig_dir), "--n", "24", "--size", "32"]) == 0
    table = json.loads((fig_dir / "joints.json").read_text())
    assert len(table) == 48 and table["sf000000_flip"]["flip_of"] == "sf000000"
    assert sum(r["split"] == "test" for r in table.values()) == 12   # 6 figures + their mirrors
    # stand-in for `fvl capture --data fig/images --pool none`: 4x average-pooled pixels as a spatial tap
    from PIL import Image

    manifest = {"model_id": "test", "dtype": "float32", "taps": {"vision.stage0": {"shape": [3, 8, 8]}}}
    with StoreWriter(tmp_path / "store", manifest) as w:
        for stem in sorted(table):
            img = torch.from_numpy(np.array(Image.open(fig_dir / "images" / f"{stem}.png"))).permute(2, 0, 1).float()
            w.add(f"{stem}.png", {"vision.stage0": F.avg_pool2d(img[None] / 255, 4)[0].numpy()})
    out = tmp_path / "hm"
    rc = main(["heatmap", "probe", "--store", str(tmp_path / "store"), "--figures", str(fig_dir), "--out", str(out),
               "--epochs", "1", "--channels", "8", "--batch-size", "8", "--json"])
    assert rc == 0
    d = json.loads((out / "heatmap.json").read_text())
    r = d["results"]["vision.stage0"]
    assert r["heatmap_size"] == [32, 32] and r["n_train"] == 18 and r["n_test"] == 6 and "pck_flip" in r
    assert (out / "pck.png").stat().st_size > 0
    assert FLIP_PAIRS == ((2, 3), (5, 6), (7, 8))


def test_fvl_probe_refuses_bad_options_by_name(tmp_path, capsys):
    store = token_store(tmp_path / "store", n=24)
    out = str(tmp_path / "out")
    for argv, needle in ((["--folds", "1"], "--folds 1: use 2 or more"),
                         (["--folds", "100"], "--folds 100: use 2..12"),
                         (["--regression", "colour"], "--regression colour: label 'colour' is not numeric"),
                         (["--regression", "nope"], "--regression nope: no such label"),
                         (["--taps", "prompt.nothing*"], "--taps prompt.nothing*: matches no stored tap"),
                         (["--device", "tpu"], "--device tpu"),
                         (["--cs", "0,1"], "--cs 0,1: every C must be positive")):
        assert main(["probe", "--store", str(store), "--out", out, *argv]) == 2, argv
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err, (argv, err)


def test_fvl_probe_takes_the_tap_globs_capture_takes(tmp_path):
    store = token_store(tmp_path / "store", n=24)
    rc = main(["probe", "--store", str(store), "--out", str(tmp_path / "out"), "--taps", "prompt.*,vision.stage?",
               "--labels", "colour", "--cs", "1", "--folds", "3", "--no-control", "--json"])
    assert rc == 0
    d = json.loads((tmp_path / "out" / "probe.json").read_text())
    assert d["taps"] == ["prompt.caption", "prompt.ocr", "vision.stage1"]
    assert d["settings"]["device"] == "cpu"


def test_fvl_similarity_warns_on_token_maps_of_another_width_and_writes_the_rest(tmp_path, capsys):
    rng = np.random.default_rng(0)
    taps = {"depth": [17, 8], "prompt.caption": [17, 8], "prompt.wide": [17, 4]}
    manifest = {"model_id": "test", "dtype": "float32", "taps": {t: {"shape": s} for t, s in taps.items()}}
    with StoreWriter(tmp_path / "store", manifest) as w:
        for i in range(12):
            w.add(f"img{i:03d}", {t: rng.normal(size=s).astype(np.float32) for t, s in taps.items()})
    out = tmp_path / "sim"
    assert main(["similarity", "--store", str(tmp_path / "store"), "--out", str(out), "--items", "img001",
                 "--max-rows", "8", "--json"]) == 0
    captured = capsys.readouterr()
    assert "prompt.wide" in captured.err and "warning" in captured.err
    d = json.loads((out / "similarity.json").read_text())
    assert d["items"]["img001"]["taps"] == ["depth", "prompt.caption"]
    assert (out / "diff_img001.png").stat().st_size > 0 and (out / "pca_img001.png").stat().st_size > 0
    # CKA on a row sample when the store holds more rows than --max-rows, said in the output
    assert d["cka"]["sampled"] is True and d["cka"]["rows"] == 8 and d["cka"]["of"] == 12
    assert main(["similarity", "--store", str(tmp_path / "store"), "--out", str(out), "--max-rows", "8"]) == 0
    assert "random sample of 8 of 12 items" in capsys.readouterr().out


def test_fvl_bench_probe_scale_reports_both_sides(capsys):
    assert main(["bench", "probe-scale", "--json", "--quick"]) == 0
    r = json.loads(capsys.readouterr().out)
    for key in ("ours_s", "sklearn_s", "ratio", "max_acc_diff", "peak_rss_mb", "n", "d", "labels", "Cs", "folds"):
        assert key in r, key
    assert r["ratio"] == pytest.approx(r["sklearn_s"] / r["ours_s"], rel=0.02)
    assert (r["n"], r["d"], r["labels"], r["Cs"], r["folds"]) == (1200, 64, 3, 3, 3)
    assert r["classes"] == [2, 6, 20] and r["device"] == "cpu" and r["peak_rss_mb"] > 0
    # both sides fit the same folds, C grid and control labels: their accuracies agree closely
    assert r["max_acc_diff"] <= 0.05 and set(r["acc_ours"]) == set(r["acc_sklearn"])


def test_probe_store_reads_one_tap_at_a_time_and_equals_one_matrix(tmp_path):
    from probes.linear import probe_matrix
    from workbench.pipelines.probing import load_vectors, probe_store
    from workbench.store import FeatureStore

    store = FeatureStore(token_store(tmp_path / "store", n=30))
    run = probe_store(store, taps="depth,prompt.ocr,vision.stage1", labels="colour", folds=3, cs=[0.1, 1.0],
                      progress=False)
    pooled = {t: store.load(t, dtype="float32") for t in ("depth", "prompt.ocr", "vision.stage1")}
    np.testing.assert_allclose(load_vectors(store, "vision.stage1", batch_size=7), pooled["vision.stage1"].mean((2, 3)),
                               atol=1e-6)
    assert store.manifest["pool"] == "none"      # unpooled token maps: token 0 is the global token
    whole = probe_matrix(pooled, {"colour": store.labels()["colour"]}, np.asarray(store.items), Cs=[0.1, 1.0],
                         n_folds=3, has_global={"depth": True, "prompt.ocr": True}, progress=False)
    assert run.matrix.taps == whole.taps
    for key, r in whole.results.items():
        assert run.matrix[key].score_folds == r.score_folds and run.matrix[key].control_folds == r.control_folds


def test_a_damaged_shard_is_a_message_in_every_analysis(tmp_path, capsys):
    store = token_store(tmp_path / "store", n=24)
    shard = sorted((store / "shards").iterdir())[0]
    shard.write_bytes(shard.read_bytes()[:100])
    for argv in (["probe", "--store", str(store), "--folds", "3"], ["similarity", "--store", str(store)]):
        assert main([*argv, "--out", str(tmp_path / argv[0])]) == 2, argv
        err = capsys.readouterr().err
        assert "Traceback" not in err and shard.name in err, err


def test_fvl_probe_saves_the_probes_it_measured(tmp_path):
    from probes.estimator import LinearProbe
    from workbench.store import FeatureStore

    store = token_store(tmp_path / "store", n=30)
    out = tmp_path / "out"
    assert main(["probe", "--store", str(store), "--out", str(out), "--taps", "depth", "--labels", "colour,x",
                 "--folds", "3", "--cs", "0.1,1", "--save-probes", "--json"]) == 0
    d = json.loads((out / "probe.json").read_text())
    best = {r["label"]: r["best_C"] for r in d["results"]}
    saved = sorted(p.relative_to(out) for p in out.glob("probes/*/*"))
    assert [str(p) for p in saved] == ["probes/depth/colour"]           # regression labels are not saved
    probe = LinearProbe.load(out / "probes" / "depth" / "colour")
    assert probe.C == best["colour"] and probe.about["tap"] == "depth" and probe.about["pool"] == "mean"
    x = FeatureStore(store).load("depth", dtype="float32")[:, 1:].mean(1)     # pooled as at capture
    y = FeatureStore(store).labels()["colour"].astype(str)
    assert probe.score(x, y) > 0.9 and sorted(probe.classes_) == ["blue", "green", "red"]
