"""`fvl demo`: the resumable pipeline (skip what is complete, redo after an interruption), the quick run
end to end with its report, the layout the app reads, and `fvl app`'s path checks."""
from __future__ import annotations

import json

import pytest

from workbench.cli import main


def _fake_steps(calls: list[str], fail_at: str | None = None):
    """Three cheap steps with the real Step/run_demo machinery: each writes its output file and appends to
    a work file (which a rerun with other settings must clean, and a resumed run must keep)."""
    from workbench.pipelines.demo import Step

    def make(name: str):
        def run(ctx):
            calls.append(name)
            work = ctx.out / f"{name}.work"
            work.write_text(work.read_text() + "x" if work.exists() else "x")
            if name == fail_at:
                raise KeyboardInterrupt  # killed half-way: partial work, no output, no record
            (ctx.out / f"{name}.txt").write_text(name)
            return {"wrote": name}
        return Step(name, f"{name}.txt", run, f"step {name}", ("seed",), (f"{name}.work",))

    return [make("a"), make("b"), make("c")]


def test_pipeline_skips_complete_steps_and_resumes_after_an_interruption(tmp_path):
    from workbench.pipelines.demo import DemoSettings, run_demo

    calls: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        run_demo(tmp_path, DemoSettings(), steps=_fake_steps(calls, fail_at="b"), progress=False, log=lambda m: None)
    assert calls == ["a", "b"] and (tmp_path / "a.txt").exists() and not (tmp_path / ".steps" / "b.json").exists()
    calls.clear()
    out = run_demo(tmp_path, DemoSettings(), steps=_fake_steps(calls), progress=False, log=lambda m: None)
    assert calls == ["b", "c"]  # a was complete; b and c run
    assert (tmp_path / "b.work").read_text() == "xx"  # the interrupted step resumed its partial work
    assert [v["status"] for v in out["steps"].values()] == ["done", "ran", "ran"]
    calls.clear()
    out = run_demo(tmp_path, DemoSettings(), steps=_fake_steps(calls), progress=False, log=lambda m: None)
    assert calls == [] and all(v["status"] == "done" for v in out["steps"].values())
    # another setting the steps depend on, or a deleted output, or --redo: that step and all after it rerun
    run_demo(tmp_path, DemoSettings(seed=1), steps=_fake_steps(calls), progress=False, log=lambda m: None)
    assert calls == ["a", "b", "c"]
    assert (tmp_path / "b.work").read_text() == "x"  # other settings: started over
    calls.clear()
    (tmp_path / "b.txt").unlink()
    run_demo(tmp_path, DemoSettings(seed=1), steps=_fake_steps(calls), progress=False, log=lambda m: None)
    assert calls == ["b", "c"]
    calls.clear()
    run_demo(tmp_path, DemoSettings(seed=1), steps=_fake_steps(calls), force=["c"], only=["c"], progress=False,
             log=lambda m: None)
    assert calls == ["c"]
    with pytest.raises(ValueError, match="unknown demo step"):
        run_demo(tmp_path, steps=_fake_steps(calls), only=["zzz"], progress=False)


def test_demo_and_app_commands_refuse_bad_input(tmp_path, capsys, monkeypatch):
    assert main(["demo", "--quick", "--out", str(tmp_path / "x"), "--n", "5"]) == 2
    assert "--n 5" in capsys.readouterr().err
    assert main(["demo", "--quick", "--out", str(tmp_path / "x"), "--only", "bogus"]) == 2
    assert "unknown step 'bogus'" in capsys.readouterr().err
    assert main(["demo", "--out", str(tmp_path / "x"), "--preset", "florence-vl-8b"]) == 2
    monkeypatch.chdir(tmp_path)
    assert main(["app", "--store", "/etc", "--dry-run"]) == 2
    assert "outside the data root" in capsys.readouterr().err
    assert main(["app", "--store", "nothing-here", "--dry-run"]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.slow
def test_quick_demo_end_to_end_then_reused(tmp_path, capsys):
    """`fvl demo --quick`: every step runs, the layout the app reads exists, the report has its figures;
    a second run does nothing; the app opens the result without an exception."""
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [k for k, v in summary["steps"].items() if v["status"] == "ran"] == \
        ["data", "train", "capture", "probe", "align", "attribute", "project", "report"]
    for rel in ("data/scenes.jsonl", "model/config.json", "store/manifest.json", "probe/probe.json",
                "align/alignment.json", "attribute/attribution.json", "project/umap.json", "results.json"):
        assert (out / rel).is_file(), rel
    from probes.linear import ProbeMatrix
    from workbench.store import FeatureStore

    store = FeatureStore(out / "store")
    assert len(store) == 48 and not store.failed and store.manifest["pool"] == "grid4"
    matrix = ProbeMatrix.from_dict(json.loads((out / "probe" / "probe.json").read_text()))
    assert ("fusion.output", "main_color") in matrix.results
    align = json.loads((out / "align" / "alignment.json").read_text())
    assert set(align["summary"]["florence2"]) >= {"depth", "caption", "ocr", "grounding", "all", "-ocr"}
    items = json.loads((out / "attribute" / "attribution.json").read_text())["items"]
    assert len(items) == 2 and abs(sum(items[0]["streams"]["shares"].values()) - 1) < 1e-6
    report = (out / "report.md").read_text()
    for section in ("## Data", "## Model and training", "## Linear probes", "## Vision-language alignment",
                    "## Attribution", "fvl app"):
        assert section in report
    figures = [f for line in report.splitlines() for f in
               [part.split(")")[0] for part in line.split("](")[1:]]]
    assert len(figures) >= 6 and all((out / f).is_file() and (out / f).stat().st_size > 5000 for f in figures)

    assert main(["demo", "--quick", "--out", str(out), "--json"]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert all(v["status"] == "done" for v in again["steps"].values())
    assert again["app"].startswith("fvl app ")

    from streamlit.testing.v1 import AppTest

    argv = ["--root", str(tmp_path), "--store", str(out / "store")]
    at = AppTest.from_string(f"from workbench.app_views.main import main\nmain({argv!r})\n", default_timeout=300).run()
    assert not at.exception
    for view in ("Probe matrix", "Attribution"):
        at.sidebar.radio(key="view").set_value(view).run()
        assert not at.exception, [e.value for e in at.exception]
        assert at.header[0].value == view
