"""Safe loading and the app's boundaries.

* A malicious pickle (its __reduce__ would create a marker file) offered as model weights, as an
  official checkpoint, to `fvl convert`, and as every file of a training checkpoint (weights, optimizer,
  scheduler, RNG state) is refused with an error naming the file - and the marker never appears.
* The source tree never unpickles: every `torch.load` passes `weights_only=True`, no `pickle.load(s)`,
  no `numpy.load(allow_pickle=True)`, no hard-coded `trust_remote_code=True` (checked on the AST, so
  comments and strings do not count and aliases like `torch.load(f, weights_only=False)` do).
* The app opens paths only under its root (`..`, absolute paths, symlinks and look-alike sibling folders
  are refused, whether typed as flags or read from a data set's image entries), binds loopback by
  default, validates uploads with a pixel bound before decoding, and never leaves its server running
  after SIGTERM or SIGINT.
"""
from __future__ import annotations

import ast
import json
import pickle
import shutil
import struct
import zlib
from pathlib import Path

import pytest

from workbench.cli import main as fvl

REPO = Path(__file__).resolve().parents[1]


class _MarkerPayload:
    """Unpickling this object calls `open(marker, "w")`, i.e. creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def evil(tmp_path):
    """(pickle bytes, marker path). The bytes are proven live: plain `pickle.loads` creates a decoy marker."""
    decoy = tmp_path / "decoy-marker"
    assert not decoy.exists()
    pickle.loads(pickle.dumps(_MarkerPayload(decoy))).close()  # the payload really runs code when unpickled
    assert decoy.exists()
    marker = tmp_path / "MARKER"
    return pickle.dumps({"weight": _MarkerPayload(marker)}), marker


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny):
    from model.loading import save_model

    return save_model(*tiny, tmp_path_factory.mktemp("model") / "tiny")


def _our_layout_with(model_dir: Path, dest: Path, payload: bytes) -> Path:
    shutil.copytree(model_dir, dest)
    (dest / "model.safetensors").unlink()
    (dest / "pytorch_model.bin").write_bytes(payload)
    return dest


# ---------------------------------------------------------------------------------------------
# Every loader refuses a pickle without running it
# ---------------------------------------------------------------------------------------------
def test_load_model_refuses_a_pickled_pytorch_model_bin(model_dir, tmp_path, evil):
    from model.loading import CheckpointError, load_model

    payload, marker = evil
    d = _our_layout_with(model_dir, tmp_path / "evil", payload)
    with pytest.raises(CheckpointError, match=r"refusing to load.*pytorch_model\.bin.*safetensors") as err:
        load_model(d)
    assert str(d) in str(err.value)
    assert not marker.exists()


def test_fvl_commands_refuse_a_pickled_model_dir(model_dir, tmp_path, evil, capsys):
    payload, marker = evil
    d = _our_layout_with(model_dir, tmp_path / "evil", payload)
    image = tmp_path / "img.png"
    from PIL import Image

    Image.new("RGB", (32, 32), "red").save(image)
    assert fvl(["generate", "--model", str(d), "--image", str(image)]) == 2
    err = capsys.readouterr().err
    assert "refusing to load" in err and str(d) in err and "Traceback" not in err
    assert not marker.exists()


def _official(tmp_path: Path, payload: bytes, kind: str) -> Path:
    d = tmp_path / kind
    d.mkdir()
    if kind == "florence2":
        cfg = {"model_type": "florence2", "architectures": ["Florence2ForConditionalGeneration"],
               "vision_config": {"dim_embed": [8, 16, 32, 64]}, "text_config": {"d_model": 64}}
    else:  # Florence-VL's LLaVA layout
        cfg = {"model_type": "llava_phi", "architectures": ["LlavaPhiForCausalLM"], "mm_projector_type": "mlp3x_gelu",
               "mm_hidden_size": 64, "hidden_size": 64}
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "pytorch_model.bin").write_bytes(payload)
    return d


@pytest.mark.parametrize("kind", ["florence2", "florence-vl"])
def test_official_checkpoint_loaders_refuse_pickles(tmp_path, evil, kind, capsys):
    from model.loading import CheckpointError, load_florence2, load_model

    payload, marker = evil
    d = _official(tmp_path, payload, kind)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        if kind == "florence2":
            load_florence2(d)
        else:
            load_model(d)
    argv = ["convert", "--src", str(d), "--out", str(tmp_path / "out")]
    if kind == "florence2":
        argv += ["--llm-preset", "tiny"]
    assert fvl(argv) == 2
    err = capsys.readouterr().err
    assert "refusing to load" in err and "pytorch_model.bin" in err and "Traceback" not in err
    assert not marker.exists() and not (tmp_path / "out" / "model.safetensors").exists()


@pytest.fixture(scope="module")
def train_run(tmp_path_factory):
    """A finetune run stopped after one step: OUT/checkpoint-1 exists, the schedule is not finished."""
    from workbench.data.synth import synth_scenes

    root = tmp_path_factory.mktemp("train")
    synth_scenes(root / "data", 8, seed=5, image_size=64, workers=1, progress=False, log=None)
    args = ["train", "finetune", "--preset", "tiny", "--data", str(root / "data"), "--max-steps", "2",
            "--batch-size", "4", "--save-every", "1", "--quiet", "--seed", "3"]
    assert fvl(args + ["--out", str(root / "run"), "--stop-after", "1"]) == 0
    assert (root / "run" / "checkpoint-1" / "optimizer.pt").is_file()
    return root, args


@pytest.mark.parametrize("victim", ["optimizer.pt", "scheduler.pt", "rng-rank0.pt", "model.safetensors"])
def test_train_resume_refuses_a_pickled_checkpoint_file(train_run, tmp_path, evil, victim, capsys):
    root, args = train_run
    payload, marker = evil
    out = tmp_path / "run"
    shutil.copytree(root / "run", out)
    (out / "checkpoint-1" / victim).write_bytes(payload)
    capsys.readouterr()
    assert fvl(args + ["--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert f"checkpoint-1/{victim}" in err and "Traceback" not in err
    assert not marker.exists()
    assert not (out / "model").exists()  # nothing was trained from a refused state


# ---------------------------------------------------------------------------------------------
# The source never unpickles
# ---------------------------------------------------------------------------------------------
UNPICKLERS = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "pandas"}


def unsafe_calls(source: str, name: str = "<src>") -> list[str]:
    """Every unsafe deserialisation or remote-code switch in `source`, as 'name:line: what'."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.keyword) and node.arg == "trust_remote_code" and \
                isinstance(node.value, ast.Constant) and node.value.value is True:
            found.append(f"{name}:{node.value.lineno}: trust_remote_code=True hard-coded")
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        owner = node.func.value.id if isinstance(node.func.value, ast.Name) else None
        attr = node.func.attr
        kw = {k.arg: k.value for k in node.keywords}
        if owner == "torch" and attr == "load":
            wo = kw.get("weights_only")
            if not (isinstance(wo, ast.Constant) and wo.value is True):
                found.append(f"{name}:{node.lineno}: torch.load without weights_only=True")
        if owner in UNPICKLERS and attr in ("load", "loads", "Unpickler", "read_pickle"):
            found.append(f"{name}:{node.lineno}: {owner}.{attr} unpickles arbitrary objects")
        if owner in ("np", "numpy") and attr == "load":
            ap = kw.get("allow_pickle")
            if isinstance(ap, ast.Constant) and ap.value is True:
                found.append(f"{name}:{node.lineno}: numpy.load(allow_pickle=True)")
    return found


def _sources():
    for top in ("model", "workbench", "probes", "benchmarks"):
        for path in sorted((REPO / top).rglob("*.py")):
            yield path.relative_to(REPO).as_posix(), path.read_text(encoding="utf-8")
    for path in sorted(REPO.glob("*.py")):
        yield path.name, path.read_text(encoding="utf-8")
    for nb in sorted((REPO / "notebooks").rglob("*.ipynb")):
        cells = json.loads(nb.read_text(encoding="utf-8")).get("cells", [])
        code = "\n".join("".join(c.get("source", "")) for c in cells if c.get("cell_type") == "code")
        code = "\n".join("pass" if ln.lstrip().startswith(("%", "!")) else ln for ln in code.splitlines())
        yield nb.relative_to(REPO).as_posix(), code


def test_the_scanner_catches_each_unsafe_form():
    bad = ("torch.load(f)\ntorch.load(f, weights_only=False)\npickle.load(fh)\npickle.loads(b)\n"
           "np.load(p, allow_pickle=True)\nAutoModel.from_pretrained(p, trust_remote_code=True)\n")
    assert len(unsafe_calls(bad)) == 6
    ok = ("torch.load(f, map_location='cpu', weights_only=True)\nnp.load(p)\n"
          "AutoTokenizer.from_pretrained(p, trust_remote_code=trust_remote_code)\n# torch.load(f)\n")
    assert unsafe_calls(ok) == []


def test_source_tree_never_unpickles_or_trusts_remote_code():
    sources = list(_sources())
    assert len(sources) > 30  # really scanned the tree
    problems = [p for name, src in sources for p in unsafe_calls(src, name)]
    assert problems == []


# ---------------------------------------------------------------------------------------------
# The app: root confinement, loopback, uploads
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def app_root(tmp_path):
    from workbench.store import StoreWriter

    root = tmp_path / "root"
    with StoreWriter(root / "run" / "store", {"model_id": "preset:tiny", "taps": {"depth": {"shape": [4]}}}) as w:
        w.add("a", {"depth": [1.0, 2.0, 3.0, 4.0]})
    outside = tmp_path / "root-evil"  # shares the root's name as a string prefix
    outside.mkdir()
    (outside / "secret.txt").write_text("no")
    return root, outside


def test_app_paths_stay_under_the_root(app_root):
    from workbench.app_views.context import PathRefused, make_config, resolve_under_root

    root, outside = app_root
    assert resolve_under_root("run/store", root, "--store") == (root / "run" / "store").resolve()
    (root / "run" / "link-in").symlink_to(root / "run" / "store", target_is_directory=True)
    assert resolve_under_root("run/link-in", root, "--store") == (root / "run" / "store").resolve()
    (root / "run" / "link-out").symlink_to(outside, target_is_directory=True)
    for sneaky in ("../root-evil", str(outside), "run/../../root-evil/secret.txt", "run/link-out",
                   "run/link-out/secret.txt", "/etc/passwd", "~"):
        with pytest.raises(PathRefused, match="outside the data root"):
            resolve_under_root(sneaky, root, "--store")
    for flag in ("--store", "--data", "--image-folder", "--model", "--run"):
        with pytest.raises(PathRefused, match=f"{flag} .*outside the data root"):
            make_config(["--root", str(root), flag, "../root-evil"])


def test_fvl_app_binds_loopback_by_default_and_refuses_escapes(app_root, capsys):
    root, outside = app_root
    assert fvl(["app", "--root", str(root), "--store", "run/store", "--dry-run"]) == 0
    cmd = capsys.readouterr().out.split()
    assert cmd[cmd.index("--server.address") + 1] == "127.0.0.1"
    assert fvl(["app", "--root", str(root), "--store", str(outside), "--dry-run"]) == 2
    assert "outside the data root" in capsys.readouterr().err
    # `streamlit run app.py` from the repository root reads .streamlit/config.toml: loopback there too
    config = REPO / ".streamlit" / "config.toml"
    if config.is_file():
        import tomllib

        from workbench.app_views.context import MAX_UPLOAD_MB

        server = tomllib.loads(config.read_text()).get("server", {})
        assert server.get("address") in ("127.0.0.1", "localhost", "::1")
        assert server.get("maxUploadSize", 200) <= MAX_UPLOAD_MB


def _png_header(width: int, height: int) -> bytes:
    """A valid PNG structure whose IHDR claims width x height, with almost no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


def test_uploads_are_size_limited_and_validated():
    from workbench.app_views.context import MAX_UPLOAD_MB, MAX_UPLOAD_PIXELS
    from workbench.data.images import ImageError, load_image

    assert 0 < MAX_UPLOAD_MB <= 50 and MAX_UPLOAD_PIXELS <= 64_000_000
    # what the live view calls on the uploaded bytes
    for side in (6_000, 60_000):  # over the upload bound (checked from the header), and over Pillow's own
        with pytest.raises(ImageError, match="decompression bomb"):
            load_image(_png_header(side, side), max_pixels=MAX_UPLOAD_PIXELS)
    with pytest.raises(ImageError, match="not a readable image"):
        load_image(b"<html>not an image</html>", max_pixels=MAX_UPLOAD_PIXELS)
    with pytest.raises(ImageError, match="empty"):
        load_image(b"", max_pixels=MAX_UPLOAD_PIXELS)


def _png(path: Path, value: int = 120) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), (value, 40, 200)).save(path)


@pytest.fixture
def escaping_data(tmp_path):
    """A root with a store of four items and a LLaVA data set that names one image inside the root and
    three outside it: a `../` path, an absolute path and a symlink inside the root that points out."""
    root = tmp_path / "root"
    secret = tmp_path / "elsewhere" / "secret.png"
    _png(secret, 250)
    _png(root / "data" / "inside.png")
    (root / "data" / "link.png").symlink_to(secret)
    turns = [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]
    rows = [{"id": "in", "image": "inside.png"}, {"id": "dotdot", "image": "../../elsewhere/secret.png"},
            {"id": "absolute", "image": str(secret)}, {"id": "symlink", "image": "link.png"}]
    (root / "data" / "train.json").write_text(json.dumps([{**r, "conversations": turns} for r in rows]))
    return root, secret


def test_data_set_images_outside_the_root_are_refused(escaping_data):
    from workbench.app_views.context import confine_images, refused_summary
    from workbench.data import open_dataset

    root, secret = escaping_data
    paths = {it.id: it.image_path for it in open_dataset(root / "data" / "train.json", check_images=False)}
    assert len(paths) == 4 and paths["absolute"] == secret  # the data set lists all four
    inside, refused = confine_images(paths, root)
    assert inside == {"in": str((root / "data" / "inside.png").resolve())}
    assert sorted(refused) == ["absolute", "dotdot", "symlink"]
    assert all("outside the data root" in msg for msg in refused.values())
    assert "3 image(s) not shown" in refused_summary(refused) and "--root" in refused_summary(refused)


def test_the_overview_gallery_shows_only_images_under_the_root(escaping_data):
    from streamlit.testing.v1 import AppTest

    from workbench.store import StoreWriter

    root, _ = escaping_data
    with StoreWriter(root / "run" / "store", {"model_id": "preset:tiny", "taps": {"depth": {"shape": [2]}}}) as w:
        for item in ("absolute", "dotdot", "in", "symlink"):
            w.add(item, {"depth": [1.0, 2.0]})
    argv = ["--root", str(root), "--store", "run/store", "--data", "data/train.json"]
    at = AppTest.from_string(f"from workbench.app_views.main import main\nmain({argv!r})\n", default_timeout=120)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert len(at.image) == 1  # the one image inside the root; the secret is never read
    assert any("3 image(s) not shown because they lie outside the data root" in w.value for w in at.warning)


def test_the_app_shows_missing_and_broken_data_set_images_as_messages(tmp_path):
    """A data set may list images that are missing or truncated (a capture records them as failed items);
    the gallery and the feature-map view say why they cannot be shown instead of failing."""
    from streamlit.testing.v1 import AppTest

    from workbench.store import StoreWriter

    root = tmp_path / "root"
    _png(root / "data" / "ok.png")
    (root / "data" / "trunc.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    turns = [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]
    rows = [{"id": "gone", "image": "gone.png"}, {"id": "ok", "image": "ok.png"}, {"id": "trunc", "image": "trunc.png"}]
    (root / "data" / "d.json").write_text(json.dumps([{**r, "conversations": turns} for r in rows]))
    with StoreWriter(root / "run" / "store", {"model_id": "preset:tiny", "pool": "mean",
                                               "taps": {"depth": {"shape": [2]}}}) as w:
        for r in rows:
            w.add(r["id"], {"depth": [1.0, 2.0]})
    argv = ["--root", str(root), "--store", "run/store", "--data", "data/d.json"]
    at = AppTest.from_string(f"from workbench.app_views.main import main\nmain({argv!r})\n", default_timeout=120)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert len(at.image) == 1
    notes = " ".join(c.value for c in at.caption)
    assert "gone: not shown" in notes and "does not exist" in notes and "trunc: not shown" in notes
    at.sidebar.radio(key="view").set_value("Feature maps").run()  # its first item is the missing one
    assert not at.exception, [e.value for e in at.exception]
    assert any("gone.png does not exist" in w.value for w in at.warning)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_fvl_app_refuses_a_taken_port_before_starting_a_server(app_root, capsys):
    import socket

    root, _ = app_root
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert fvl(["app", "--root", str(root), "--store", "run/store", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"--port {port}" in err and "in use" in err and "Traceback" not in err


@pytest.mark.parametrize("signum", ["SIGTERM", "SIGINT"])
def test_fvl_app_stops_its_server_on_sigterm_and_sigint(app_root, signum):
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil

    root, _ = app_root
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from workbench.cli import main; sys.exit(main())",
                             "app", "--root", str(root), "--store", "run/store", "--port", str(port)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HOME": str(root.parent)})
    try:
        deadline = time.monotonic() + 180  # a generous bound for a loaded machine; not an assertion on speed
        while not _listening(port):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the server never started listening"
            time.sleep(0.5)
        children = psutil.Process(proc.pid).children(recursive=True)
        assert children and any("streamlit" in " ".join(c.cmdline()) for c in children)
        proc.send_signal(getattr(signal, signum))
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "rerun the same command" not in err
    gone, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, [c.cmdline() for c in alive]
    assert not _listening(port)
