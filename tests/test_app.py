"""The Streamlit app: every view driven by AppTest on a small fixture run directory, the data-root guard,
and one real headless-Chromium load of `streamlit run app.py`.

The fixture is built without running a model (synthetic scenes + a store of structured random
features + results files in the layout `fvl demo` writes), except the saved tiny model for live mode.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
TAPS = {"vision.stage0": [16, 8], "vision.stage1": [16, 12], "depth": [16, 8], "prompt.caption.layer0": [16, 8],
        "prompt.caption": [16, 8], "prompt.ocr.layer0": [16, 8], "prompt.ocr": [16, 8], "fusion.output": [16, 10]}


def build_run(run: Path, tiny=None, n: int = 30) -> Path:
    """A run directory like `fvl demo` writes: data/, store/ (pool grid4), probe/, align/, attribute/,
    project/, compare/ and (when `tiny` is given) model/."""
    from probes.alignment import alignment_by_stream, summary
    from workbench.data.dataset import open_dataset
    from workbench.data.synth import synth_scenes
    from probes.linear import probe_matrix
    from workbench.store import StoreWriter

    synth_scenes(run / "data", n=n, seed=3, image_size=64, progress=False, log=None)
    ds = open_dataset(run / "data")
    rng = np.random.default_rng(0)
    colours = sorted({it.labels["main_color"] for it in ds})
    manifest = {"model_id": "preset:tiny", "pool": "grid4", "dtype": "float32",
                "taps": {t: {"shape": s} for t, s in TAPS.items()},
                "model": {"preset": "tiny", "encoder_type": "florence2", "streams": ["depth", "caption", "ocr"],
                          "fusion": "channel", "image_size": 128, "image_tokens": 17, "grid": 4}}
    with StoreWriter(run / "store", manifest) as w:
        for it in ds:
            signal = np.zeros(8)
            signal[colours.index(it.labels["main_color"]) % 8] = 3.0
            feats = {t: (rng.normal(size=s) + (np.pad(signal, (0, s[1] - 8)) if s[1] >= 8 else 0)).astype(np.float32)
                     for t, s in TAPS.items()}
            w.add(it.id, feats, labels=it.labels)
    (run / "probe").mkdir()
    from workbench.store import FeatureStore

    store = FeatureStore(run / "store")
    labels = store.labels()
    matrix = probe_matrix({t: store.load(t, dtype="float32") for t in TAPS},
                          {k: labels[k] for k in ("main_color", "has_text", "main_x")}, Cs=(0.1, 1.0), n_folds=3,
                          select="cv", max_iter=30, progress=False)
    (run / "probe" / "probe.json").write_text(matrix.to_json())
    text = rng.normal(size=(n, 6)).astype(np.float32)
    feats = {"depth": rng.normal(size=(n, 8)), "caption": rng.normal(size=(n, 8)), "ocr": rng.normal(size=(n, 8))}
    res = alignment_by_stream(feats, text, steps=8, batch_size=8, held_out=0.3)
    (run / "align").mkdir()
    (run / "align" / "alignment.json").write_text(json.dumps({"summary": {"tiny": summary(res)}, "results": {"tiny": res}}))
    rec = {"id": ds[0].id, "image": f"data/images/{ds[0].id}.png", "question": "What color is the star?",
           "answer": "red", "type": "color",
           "pixels": {"method": "ig", "heat": rng.normal(size=(16, 16)).tolist(), "delta": 0.01, "output_difference": 1.0},
           "streams": {"streams": ["depth", "caption", "ocr"], "shares": {"depth": 0.5, "caption": 0.3, "ocr": 0.2},
                       "signed": {"depth": 0.4, "caption": 0.2, "ocr": 0.1}, "delta": 0.02,
                       "token_maps": {s: rng.random(17).tolist() for s in ("depth", "caption", "ocr")}}}
    (run / "attribute").mkdir()
    (run / "attribute" / "attribution.json").write_text(json.dumps({"items": [rec]}))
    ids = sorted(it.id for it in ds)
    (run / "project").mkdir()
    (run / "project" / "umap.json").write_text(json.dumps(
        {"fusion.output": {"ids": ids, "xy": rng.normal(size=(n, 2)).tolist(), "n_neighbors": 15}}))
    (run / "compare").mkdir()
    (run / "compare" / "compare.json").write_text(json.dumps({
        "tables": {"probe accuracy by encoder": [{"encoder": "florence2", "main_color": 0.9}, {"encoder": "clip", "main_color": 0.7}]},
        "cka": {"encoders": {"labels": ["florence2", "clip"], "matrix": [[1.0, 0.4], [0.4, 1.0]]}}}))
    if tiny is not None:
        from model.loading import save_model

        save_model(tiny[0], tiny[1], run / "model")
    return run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny):
    return build_run(tmp_path_factory.mktemp("approot") / "run", tiny)


def _app(run_dir: Path, *extra: str):
    from streamlit.testing.v1 import AppTest

    argv = ["--root", str(run_dir.parent), "--store", str(run_dir / "store"), *extra]
    at = AppTest.from_string(f"from workbench.app_views.main import main\nmain({argv!r})\n", default_timeout=120)
    return at.run()


def _ok(at) -> None:
    assert not at.exception, [e.value for e in at.exception]


def _captions(at) -> list[str]:
    return [c for im in at.image for c in im.captions if c]


def _go(at, view: str):
    at.sidebar.radio(key="view").set_value(view).run()
    _ok(at)
    return at


def test_overview_shows_manifest_taps_results_and_gallery(run_dir):
    at = _app(run_dir)
    _ok(at)
    assert at.header[0].value == "Overview"
    assert [m.value for m in at.metric][:3] == ["30", "0", str(len(TAPS))]
    assert len(at.image) >= 1  # the gallery
    assert any("present" in str(df.value.to_dict()) for df in at.dataframe)
    at.selectbox(key="gallery_label").set_value("main_color").run()
    _ok(at)


def test_probe_matrix_heatmap_and_cell_detail(run_dir):
    at = _go(_app(run_dir), "Probe matrix")
    assert at.header[0].value == "Probe matrix"
    assert len(at.get("vega_lite_chart")) >= 3  # heatmap, curve, confusion
    at.selectbox(key="probe_tap").set_value("prompt.ocr").run()
    at.selectbox(key="probe_label").set_value("main_x").run()  # regression: per-fold table instead of confusion
    _ok(at)
    assert any(m.label == "r2" for m in at.metric)
    at.radio(key="probe_value").set_value("selectivity").run()
    _ok(at)


def test_feature_maps_from_a_grid_store(run_dir):
    at = _go(_app(run_dir), "Feature maps")
    captions = _captions(at)
    assert any("prompt.ocr" in c for c in captions) and any("depth" in c for c in captions)
    assert any("Difference maps" in s.value for s in at.subheader)
    at.radio(key="fmap_basis").set_value("one per map").run()
    _ok(at)
    assert any("one PCA per map" in m.value for m in at.markdown)


def test_alignment_attribution_umap_and_compare_views(run_dir):
    at = _go(_app(run_dir), "Alignment")
    assert len(at.get("vega_lite_chart")) == 2 and at.dataframe
    _go(at, "Attribution")
    assert len(at.image) >= 4  # image, pixel overlay, three stream overlays
    _go(at, "Embedding (UMAP)")
    assert any("precomputed" in c.value for c in at.caption)
    at.radio(key="umap_method").set_value("PCA").run()
    _ok(at)
    _go(at, "Compare encoders")
    assert any("probe accuracy by encoder" in s.value for s in at.subheader)
    assert len(at.get("vega_lite_chart")) == 2  # the file's CKA and the live tap CKA


def test_live_mode_runs_the_model_on_an_upload_and_refuses_junk(run_dir):
    from PIL import Image

    at = _go(_app(run_dir), "Live model")
    assert any("A:" in m.value for m in at.markdown)  # a packaged photo is the default input
    assert any("fusion.output" in c for c in _captions(at))
    buf = __import__("io").BytesIO()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(buf, format="PNG")
    at.file_uploader(key="live_upload").upload("red.png", buf.getvalue(), "image/png").run()
    _ok(at)
    assert any("A:" in m.value for m in at.markdown)
    at.file_uploader(key="live_upload").upload("junk.png", b"this is not an image", "image/png").run()
    _ok(at)
    assert at.error and "not a readable image" in at.error[0].value


def test_missing_results_name_the_command_and_a_mean_store_computes_maps_live(run_dir, tmp_path):
    from workbench.store import FeatureStore, StoreWriter

    run = run_dir.parent / "bare"
    if not run.exists():
        shutil.copytree(run_dir / "data", run / "data")
        shutil.copytree(run_dir / "model", run / "model")
        src = FeatureStore(run_dir / "store")
        m = {k: v for k, v in src.manifest.items() if k in ("model_id", "model", "dtype")}
        m.update(pool="mean", taps={"depth": {"shape": [8]}})
        labels = src.labels()
        with StoreWriter(run / "store", m) as w:
            for k, item in enumerate(src.items):
                w.add(item, {"depth": np.random.default_rng(k).normal(size=8)},
                      labels={n: labels[n][k] for n in labels})
    at = _go(_app(run), "Probe matrix")
    assert "fvl probe --store" in at.warning[0].value
    _go(at, "Alignment")
    assert "fvl align" in at.warning[0].value
    _go(at, "Feature maps")
    assert any("computed live" in c.value for c in at.caption)
    assert any("prompt.caption" in c for c in _captions(at))


def test_without_a_store_the_sidebar_lists_the_stores_under_the_root(run_dir):
    from streamlit.testing.v1 import AppTest

    argv = ["--root", str(run_dir.parent)]
    at = AppTest.from_string(f"from workbench.app_views.main import main\nmain({argv!r})\n", default_timeout=120).run()
    _ok(at)
    assert "No feature store is open" in at.info[0].value
    picker = at.sidebar.selectbox(key="store_pick")
    assert "run/store" in picker.options
    picker.set_value("run/store").run()
    _ok(at)
    assert [m.value for m in at.metric][0] == "30"


def test_paths_outside_the_root_are_refused(run_dir, tmp_path):
    from workbench.app_views.context import PathRefused, make_config, resolve_under_root

    root = run_dir.parent
    with pytest.raises(PathRefused, match="outside the data root"):
        resolve_under_root("../../etc", root, "--store")
    with pytest.raises(PathRefused, match="outside the data root"):
        make_config(["--root", str(root), "--store", "/etc"])
    link = root / "escape"
    if not link.exists():
        link.symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(PathRefused, match="outside"):
        resolve_under_root("escape", root, "--store")
    cfg = make_config(["--root", str(root), "--store", "run/store"])
    assert cfg.run_dir == run_dir.resolve() and cfg.data == (run_dir / "data").resolve()
    assert cfg.model == (run_dir / "model").resolve()
    at = _app(run_dir, "--data", "/tmp")  # refused in the page itself, with the message, no traceback
    _ok(at)
    assert "outside the data root" in at.error[0].value


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_real_browser_loads_the_app_without_an_error_box(run_dir, tmp_path):
    """`streamlit run app.py` on a free loopback port, driven by headless Chromium (selenium + the Debian
    chromium-driver): the page title, the Overview with its gallery, then the Probe matrix with its charts,
    and no error box (stException) anywhere. Screenshots are kept in tmp_path."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_bin = shutil.which("chromedriver")
    if chromium is None or driver_bin is None:
        pytest.fail("headless Chromium is not installed: run `make browser` (apt-get install -y chromium chromium-driver)")
    port = _free_port()
    env = {**os.environ, "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false"}
    cmd = [sys.executable, "-m", "streamlit", "run", str(REPO / "app.py"), "--server.headless", "true",
           "--server.address", "127.0.0.1", "--server.port", str(port), "--", "--root", str(run_dir.parent),
           "--store", str(run_dir / "store")]
    server = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    browser = None
    try:
        url = f"http://127.0.0.1:{port}/"
        for _ in range(240):
            try:
                urllib.request.urlopen(url + "_stcore/health", timeout=1)
                break
            except OSError:
                if server.poll() is not None:
                    pytest.fail(f"streamlit exited: {server.stdout.read().decode()[-2000:]}")
                time.sleep(0.5)
        opts = webdriver.ChromeOptions()
        opts.binary_location = chromium
        for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1400,1000",
                     f"--user-data-dir={tmp_path / 'chrome-profile'}"):
            opts.add_argument(flag)
        browser = webdriver.Chrome(options=opts, service=Service(executable_path=driver_bin))
        browser.get(url)
        wait = WebDriverWait(browser, 180, poll_frequency=0.5)

        def settled(selector: str, n: int = 1):
            def check(d):
                running = d.find_elements(By.CSS_SELECTOR, '[data-testid="stStatusWidget"] button')
                return len(d.find_elements(By.CSS_SELECTOR, selector)) >= n and not running
            return check

        wait.until(settled('[data-testid="stImage"] img', 6))
        time.sleep(1.0)
        assert browser.title == "Florence-VL workbench"
        assert "Overview" in browser.find_element(By.TAG_NAME, "h2").text
        assert not browser.find_elements(By.CSS_SELECTOR, '[data-testid="stException"]')
        browser.save_screenshot(str(tmp_path / "overview.png"))
        label = next(e for e in browser.find_elements(By.CSS_SELECTOR, '[data-testid="stSidebar"] label')
                     if e.text.strip() == "Probe matrix")
        label.click()
        wait.until(settled('[data-testid="stVegaLiteChart"] canvas, [data-testid="stVegaLiteChart"] svg', 3))
        time.sleep(1.0)
        assert "Probe matrix" in browser.find_element(By.TAG_NAME, "h2").text
        assert not browser.find_elements(By.CSS_SELECTOR, '[data-testid="stException"]')
        browser.save_screenshot(str(tmp_path / "probe_matrix.png"))
    finally:
        if browser is not None:
            browser.quit()
        server.terminate()
        server.wait(timeout=20)
    for name in ("overview.png", "probe_matrix.png"):
        shot = tmp_path / name
        assert shot.is_file() and shot.stat().st_size > 30_000, f"{name} looks empty"
        if os.environ.get("FVL_SCREENSHOT_DIR"):  # keep the screenshots somewhere to look at
            shutil.copy(shot, Path(os.environ["FVL_SCREENSHOT_DIR"]) / name)
