"""`fvl compare`: config validation, the orderings logic, and the whole quick pipeline (trained once per module).

The quick run IS the pipeline test: it trains every kind of step (Florence-2 pretraining, a CLIP-style encoder,
stage 1 + 2 of five variants), evaluates, captures, probes and aligns. Then a rerun must reuse it unchanged, and a
fresh run of two of its variants must reproduce their rows exactly (determinism under the seed).
"""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest

from workbench.cli import main
from workbench.experiments import (
    TIMING_COLUMNS,
    ConfigError,
    compute_orderings,
    load_config,
    metric_columns,
    shipped_config,
)

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
    (_variant(encoder="clip", prompts=[], encoder_config={"depth": 3}), "variants[0] (v).encoder_config", "depth"),
    (_variant(name="a/b"), "variants[0].name", "a/b"),
])
def test_bad_variant_names_the_field(variant, field, word):
    with pytest.raises(ConfigError) as exc:
        load_config(_cfg(variants=[variant], align={"reference": "v"}))
    assert field in str(exc.value) and word in str(exc.value)


@pytest.mark.parametrize("changes, field", [
    ({"preset": "huge"}, "preset"),
    ({"preset": "florence-vl-8b"}, "preset"),
    ({"probe": {"labels": ["colour"]}}, "probe.labels"),
    ({"probe": {"taps": ["llm.layer0"]}}, "probe.taps"),
    ({"encoders": {"dino": {}}}, "encoders"),
    ({"training": {"pretrain": {"max_step": 3}}}, "training.pretrain"),
    ({"align": {"reference": "nope"}}, "align.reference"),
    ({"data": {"n": 5}}, "data.n"),
    ({"varients": []}, "unknown top-level key"),
])
def test_bad_settings_name_the_field(changes, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(_cfg(**changes))


def test_duplicate_variant_names_are_refused():
    raw = _cfg(variants=[_variant(name="a"), _variant(name="a")], align={"reference": "a"})
    with pytest.raises(ConfigError, match="used twice"):
        load_config(raw)


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


def test_shipped_configs_cover_every_paper_ordering():
    """The full config has a variant for every role, so no ordering of it is 'n/a'; 'trained' resolves to
    each kind's own objective and random baselines exist for every encoder kind used."""
    full = load_config(shipped_config())
    load_config(shipped_config(quick=True))
    kinds = {v.encoder for v in full.variants}
    assert kinds == {"florence2", "davit", "clip", "cvt", "cycle"}
    assert {v.encoder for v in full.variants if v.training == "random"} >= kinds - {"cycle"}
    assert {v.training for v in full.variants if v.encoder == "cvt"} == {"supervised", "random"}
    records, aligns = _fake_results(full, lambda v: 0.5)
    fig5 = {"all": {"eval_loss": 3.0}, "without": {s: {"eval_loss": 3.1} for s in ("depth", "caption", "ocr", "grounding")}}
    verdicts = [o["reproduced"] for o in compute_orderings(full, records, aligns, fig5)]
    assert not [v for v in verdicts if v.startswith("n/a")]


# ------------------------------------------------------------------------------------------- orderings
def _fake_results(cfg, score, loss=lambda v: 3.0):
    records, aligns = {}, {}
    for v in cfg.variants:
        acc = {t: score(v) for t in ("count", "color", "shape", "position", "reading", "existence", "overall")}
        records[v.name] = {"vqa": {"accuracy": acc, "n": {t: 100 for t in acc}}}
        aligns[v.name] = {"curve": {"eval_loss": loss(v)}}
    return records, aligns


def test_orderings_come_from_the_numbers():
    cfg = load_config(shipped_config())
    by_fusion = {"channel": 0.6, "average": 0.5, "token": 0.4}
    good = lambda v: by_fusion[v.fusion] if v.prompts == ("caption", "ocr", "grounding") else 0.3  # noqa: E731
    rows = compute_orderings(cfg, *_fake_results(cfg, good), None)
    t1 = next(o for o in rows if o["source"] == "Table 1")
    assert t1["reproduced"] == "yes" and t1["smallest_gap"] == pytest.approx(0.1)
    assert next(o for o in rows if o["source"] == "Fig. 5")["reproduced"].startswith("n/a")
    bad = lambda v: 1.0 - good(v)  # noqa: E731
    rows = compute_orderings(cfg, *_fake_results(cfg, bad), None)
    assert next(o for o in rows if o["source"] == "Table 1")["reproduced"] == "no"
    assert all(o["reproduced"] == "no" for o in rows if o["source"] in ("Table 4", "Table 5"))
    # Fig. 4 is lower-is-better: Florence-2 lowest -> yes; a tie is not a reproduction
    f2_low = lambda v: 2.9 if v.encoder == "florence2" else 3.2  # noqa: E731
    rows = compute_orderings(cfg, *_fake_results(cfg, good, f2_low), None)
    assert next(o for o in rows if o["source"] == "Fig. 4")["reproduced"] == "yes"
    rows = compute_orderings(cfg, *_fake_results(cfg, good, lambda v: 3.0), None)
    assert next(o for o in rows if o["source"] == "Fig. 4")["reproduced"] == "no"


# ------------------------------------------------------------------------------------------- the quick run
@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare") / "quick"
    import io
    from contextlib import redirect_stdout

    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = main(["compare", "--quick", "--out", str(out), "--json", "--quiet"])
    assert rc == 0
    return out, json.loads(buf.getvalue().strip().splitlines()[-1])


def _metrics_only(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in TIMING_COLUMNS}


def test_quick_run_writes_a_complete_table(quick_run):
    out, result = quick_run
    cfg = load_config(shipped_config(quick=True))
    rows = result["rows"]
    assert [r["variant"] for r in rows] == [v.name for v in cfg.variants]
    for r in rows:
        for col in metric_columns(cfg):
            assert isinstance(r.get(col), (int, float)) and math.isfinite(r[col]), (r["variant"], col, r.get(col))
        assert 0 <= r["vqa.overall"] <= 1 and r["align.loss"] > 0
    saved = json.loads((out / "compare.json").read_text())
    assert saved["tables"]["results"] == rows
    assert saved["cka"]["encoder features by variant"]["labels"] == [v.name for v in cfg.variants]
    for name in ("vqa.png", "probes.png", "alignment_variants.png", "alignment_streams.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000, name
    md = (out / "compare.md").read_text()
    for paper_number in ("50.8", "50.3", "58.3", "57.3", "31.2"):
        assert paper_number in md
    assert "reproduced" in md and "| fvl-channel |" in md
    verdicts = {o["claim"]: o["reproduced"] for o in result["orderings"]}
    assert all(v in ("yes", "no") or v.startswith("n/a") for v in verdicts.values())
    # the quick config has no token-fusion variant: that ordering cannot be judged, and says why
    assert verdicts["channel fusion beats token concat and averaging"] == "n/a (missing: token fusion)"
    t4 = next(o for o in result["orderings"] if o["source"] == "Table 4" and o["metric"] == "VQA reading")
    assert t4["reproduced"] in ("yes", "no")  # depth-only variant present: judged from the numbers


def test_rerun_reuses_finished_work(quick_run, capsys):
    out, first = quick_run
    assert main(["compare", "--quick", "--out", str(out), "--json", "--quiet"]) == 0
    captured = capsys.readouterr()
    again = json.loads(captured.out.strip().splitlines()[-1])
    assert again["rows"] == first["rows"]  # timings included: nothing was retrained
    assert captured.err.count("finished earlier, reusing it") == len(first["rows"])
    assert "training encoder" not in captured.err


def test_changed_settings_are_refused_not_mixed(quick_run, capsys):
    out, _ = quick_run
    changed = _cfg(training={"finetune": {"max_steps": 17, "batch_size": 8, "lr": 1e-3}})
    path = out.parent / "changed.json"
    path.write_text(json.dumps(changed))
    assert main(["compare", "--config", str(path), "--out", str(out), "--quiet"]) == 2
    assert "other settings" in capsys.readouterr().err


def test_same_seed_gives_the_same_rows(quick_run, tmp_path):
    """A fresh run of two variants (Florence-2 pretraining included) reproduces their rows exactly."""
    out, first = quick_run
    import io
    from contextlib import redirect_stdout

    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = main(["compare", "--quick", "--out", str(tmp_path / "again"), "--only", "fvl-channel,davit-depth-only",
                   "--json", "--quiet"])
    assert rc == 0
    second = json.loads(buf.getvalue().strip().splitlines()[-1])
    before = {r["variant"]: _metrics_only(r) for r in first["rows"]}
    for row in second["rows"]:
        assert _metrics_only(row) == before[row["variant"]]
    fig5 = "Fig. 5: alignment loss by removed stream"
    a = json.loads((out / "compare.json").read_text())["tables"][fig5]
    b = json.loads((tmp_path / "again" / "compare.json").read_text())["tables"][fig5]
    assert a == b
