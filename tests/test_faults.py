"""Every `fvl` command that writes output, pointed into a read-only directory, refuses with exit
status 2 and one message that names the path, never a traceback.

Root ignores permission bits, so the directory is made read-only the way a user meets it: a
read-only bind mount (`mount --bind D D; mount -o remount,ro,bind D`) when the process may mount,
else the immutable attribute (`chattr +i`), else (not root) mode 0555. Whichever is used is first
proven to refuse a write, so the test never passes against a directory that is in fact writable.
The inputs (a synthetic data set, a saved tiny model, feature stores, stick figures) are built
once per module with tiny settings, in a writable directory beside it.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from workbench.cli import main as fvl


def _refuses_writes(d: Path) -> bool:
    try:
        (d / "probe").write_text("x")
    except OSError:
        return True
    (d / "probe").unlink()
    return False


def _run(*cmd: str) -> bool:
    exe = shutil.which(cmd[0])
    return exe is not None and subprocess.run([exe, *cmd[1:]], capture_output=True).returncode == 0


@contextlib.contextmanager
def read_only(d: Path):
    """Make `d` and everything under it refuse writes for this process (root included); yields how."""
    d.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        for p in [d, *d.rglob("*")]:
            if p.is_dir():
                p.chmod(0o555)
        how, undo = "mode 0555", lambda: [p.chmod(0o755) for p in [d, *d.rglob("*")] if p.is_dir()]
    elif _run("mount", "--bind", str(d), str(d)):
        if not _run("mount", "-o", "remount,ro,bind", str(d)):
            _run("umount", str(d))
            pytest.fail(f"could not remount {d} read-only")
        how, undo = "read-only bind mount", lambda: _run("umount", str(d))
    elif _run("chattr", "-R", "+i", str(d)):
        how, undo = "chattr -R +i", lambda: _run("chattr", "-R", "-i", str(d))
    else:
        pytest.fail("cannot make a directory read-only here: no mount, no chattr, and running as root")
    try:
        assert _refuses_writes(d), f"{d} still accepts writes after {how}"
        yield how
    finally:
        undo()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny):
    """Writable inputs for every command: data, model, stores of the data and of stick figures."""
    from model.loading import save_model

    base = tmp_path_factory.mktemp("inputs")
    data, figs = base / "data", base / "figs"
    assert fvl(["data", "synth", "--out", str(data), "--n", "8", "--image-size", "64", "--workers", "1",
                "--quiet"]) == 0
    model = save_model(*tiny, base / "model")
    assert fvl(["capture", "--model", str(model), "--data", str(data), "--taps", "depth,prompt.*", "--pool",
                "mean", "--out", str(base / "store")]) == 0
    assert fvl(["heatmap", "figures", "--out", str(figs), "--n", "4", "--size", "32"]) == 0
    assert fvl(["capture", "--model", str(model), "--data", str(figs / "images"), "--taps", "depth", "--pool",
                "none", "--out", str(base / "figstore")]) == 0
    image = sorted((data / "images").glob("*.png"))[0]
    return {"data": str(data), "model": str(model), "store": str(base / "store"), "figs": str(figs),
            "figstore": str(base / "figstore"), "image": str(image)}


def commands(i: dict[str, str], ro: Path) -> dict[str, list[str]]:
    """Each command that writes, with valid tiny inputs and its output inside `ro`."""
    m = ["--model", i["model"]]
    return {
        "data synth": ["data", "synth", "--out", f"{ro}/synth", "--n", "2", "--image-size", "64", "--quiet"],
        "heatmap figures": ["heatmap", "figures", "--out", f"{ro}/figs", "--n", "4", "--size", "32"],
        "heatmap probe": ["heatmap", "probe", "--store", i["figstore"], "--figures", i["figs"], "--epochs", "1",
                          "--out", f"{ro}/heatmap"],
        "capture": ["capture", *m, "--data", i["data"], "--taps", "depth", "--out", f"{ro}/store"],
        "probe": ["probe", "--store", i["store"], "--folds", "2", "--out", f"{ro}/probe"],
        "similarity": ["similarity", "--store", i["store"], "--out", f"{ro}/similarity"],
        "align": ["align", "--store", i["store"], "--data", i["data"], *m, "--steps", "2", "--out", f"{ro}/align"],
        "attribute": ["attribute", *m, "--image", i["image"], "--question", "What color?", "--answer", "red",
                      "--steps", "2", "--out", f"{ro}/attribute"],
        "contributions": ["contributions", *m, "--data", i["data"], "--limit", "2", "--out", f"{ro}/contrib"],
        "eval vqa": ["eval", "vqa", *m, "--data", i["data"], "--limit", "2", "--predictions", f"{ro}/preds.jsonl"],
        "convert": ["convert", "--src", i["model"], "--out", f"{ro}/converted"],
        "train florence2": ["train", "florence2", "--data", i["data"], "--out", f"{ro}/f2", "--max-steps", "1"],
        "train pretrain": ["train", "pretrain", *m, "--data", f"{i['data']}/pretrain.json", "--max-steps", "1",
                           "--out", f"{ro}/pretrain"],
        "train finetune": ["train", "finetune", *m, "--data", f"{i['data']}/instruct.json", "--max-steps", "1",
                           "--out", f"{ro}/finetune"],
        "train recipe": ["train", "recipe", "--out", f"{ro}/recipe", "--n", "8", "--quiet"],
        "demo": ["demo", "--quick", "--out", f"{ro}/demo"],
        "compare": ["compare", "--quick", "--quiet", "--out", f"{ro}/compare"],
        "store verify --repair": ["store", "verify", "--repair", f"{ro}/damaged-store"],
    }


def _damaged_store_in(ro: Path, store: str) -> None:
    """A copy of a store with one truncated shard, so `fvl store verify --repair` has something to write."""
    copy = shutil.copytree(store, ro / "damaged-store")
    shard = sorted((copy / "shards").iterdir())[0]
    shard.write_bytes(shard.read_bytes()[:100])


def test_every_command_refuses_a_read_only_output_by_name(inputs, tmp_path, capsys):
    ro = tmp_path / "read-only"
    ro.mkdir()
    _damaged_store_in(ro, inputs["store"])
    before = sorted(p.relative_to(ro) for p in ro.rglob("*"))
    problems = []
    with read_only(ro):
        for name, argv in commands(inputs, ro).items():
            capsys.readouterr()
            try:
                rc = fvl(argv)
            except BaseException as exc:  # noqa: BLE001 - a traceback is exactly what is tested for
                problems.append(f"{name}: raised {type(exc).__name__}: {exc}")
                continue
            err = capsys.readouterr().err
            says_why = any(w in err.lower() for w in ("read-only", "not writable", "cannot write", "permission"))
            if rc != 2 or "Traceback" in err or str(ro) not in err or not says_why:
                problems.append(f"{name}: exit {rc}, stderr {err.strip()[-300:]!r}")
        assert sorted(p.relative_to(ro) for p in ro.rglob("*")) == before
    assert not problems, "\n".join(problems)
