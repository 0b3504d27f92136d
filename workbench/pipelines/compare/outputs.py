"""What a comparison leaves behind: compare.json (the app and notebook read it), compare.md and two figures.

    compare.json      {"seeds", "variants" (rows with intervals), "orderings", "untestable", "proxies", "meta"}
    compare.md        per claim the paper's numbers, ours with intervals, the difference's interval, the verdict;
                      the variants table; the cheap measures with their rank correlation and pick
    forest.png        every claim's difference with its interval (0 = no difference; right = the paper's way)
    proxies.png       each cheap measure against VQA accuracy across variants, with its Spearman correlation
"""
from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from workbench.data.files import atomic_write_text
from workbench.data.scenes import QA_TYPES
from workbench.pipelines.compare.config import CompareConfig
from workbench.pipelines.compare.orderings import PAPER_NOTES, Evidence
from workbench.pipelines.compare.proxies import MEASURES
from workbench.pipelines.compare.stats import t_interval
from workbench.pipelines.report import markdown_table

VERDICT_COLOURS = {"reproduced": "tab:green", "reversed": "tab:red", "unresolved": "tab:gray"}


def _r(x: Any, digits: int = 4) -> Any:
    if x is None:
        return None
    x = float(x)
    return round(x, digits) if math.isfinite(x) else None


def fmt_ci(value: Any, low: Any, high: Any, digits: int = 3) -> str:
    """'0.412 [0.380, 0.445]' ('-' for a missing number, 'n/a' for a missing bound)."""
    if value is None or not math.isfinite(float(value)):
        return "-"
    b = [f"{float(x):.{digits}f}" if x is not None and math.isfinite(float(x)) else "n/a" for x in (low, high)]
    return f"{float(value):.{digits}f} [{b[0]}, {b[1]}]"


def variant_rows(cfg: CompareConfig, ev: Evidence) -> list[dict]:
    """One row per variant: VQA per type and overall, and each cheap measure, all with intervals."""
    level = float(cfg.stats["level"])
    rows = []
    for v in cfg.variants:
        recs = ev.records[v.name]
        row: dict[str, Any] = {"variant": v.name, "encoder": v.encoder, "training": v.training, "fusion": v.fusion,
                               "prompts": "+".join(v.prompts) or "-", "seeds": [r["seed"] for r in recs]}
        types = set(recs[0]["types"])
        for t in (*QA_TYPES, "overall"):
            if t == "overall" or t in types:
                a = ev.accuracy(v, t)
                row[f"vqa.{t}"] = {k: _r(x) for k, x in a.items()}
        for m in MEASURES:
            mean, lo, hi = t_interval(ev.per_seed(v, m), level)
            row[m] = {"value": _r(mean), "ci_low": _r(lo), "ci_high": _r(hi)}
        row["chance"] = recs[0]["vqa"].get("chance")
        row["encoder_minutes"] = _r(recs[0]["encoder_minutes"], 3)
        row["vlm_minutes"] = _r(sum(r["vlm_minutes"] for r in recs), 3)
        rows.append(row)
    return rows


def _plt():
    # no matplotlib.use(): the default backend is Agg on a headless machine, and forcing it here
    # would switch a notebook's inline backend off for the rest of its kernel
    import matplotlib.pyplot as plt

    return plt


def plot_forest(orderings: list[dict], path: Path) -> Path:
    """Each claim's difference (paper's direction = right of 0) with its interval, coloured by verdict;
    accuracy claims and alignment-loss claims in separate panels (different units)."""
    plt = _plt()
    groups = [("VQA accuracy difference (paper's direction > 0)", [o for o in orderings if o["metric"].startswith("VQA")]),
              ("alignment loss difference (paper's direction > 0)",
               [o for o in orderings if not o["metric"].startswith("VQA")])]
    groups = [(t, g) for t, g in groups if g]
    heights = [max(1, len(g)) for _, g in groups] or [1]
    fig, axes = plt.subplots(len(heights), 1, figsize=(10, 0.55 * sum(heights) + 1.6 * len(heights)),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    for ax, (title, group) in zip(axes[:, 0], groups):
        for i, o in enumerate(group):
            y = len(group) - 1 - i
            colour = VERDICT_COLOURS[o["verdict"]]
            lo, hi = o["ci_low"], o["ci_high"]
            if lo is not None and hi is not None and math.isfinite(lo) and math.isfinite(hi):
                ax.plot([lo, hi], [y, y], color=colour, lw=2)
            ax.plot([o["diff"]], [y], "o", color=colour)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_yticks(range(len(group)), [textwrap.fill(f"{o['source']}: {o['claim']}", 42) for o in reversed(group)],
                      fontsize=7)
        ax.set_title(title, fontsize=9)
    handles = [plt.Line2D([], [], color=c, marker="o", lw=2, label=k) for k, c in VERDICT_COLOURS.items()]
    fig.legend(handles=handles, loc="lower right", fontsize=7, ncol=3)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_proxies(rows: list[dict], proxies: Mapping[str, dict], path: Path) -> Path:
    """One panel per cheap measure: the measure (x) against VQA overall (y) per variant, with intervals."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(proxies), figsize=(4.2 * len(proxies), 3.8), squeeze=False)
    for ax, (name, p) in zip(axes[0], proxies.items()):
        for r in rows:
            x, y = r[name], r["vqa.overall"]
            if x["value"] is None:
                continue
            xerr = None if x["ci_low"] is None else [[x["value"] - x["ci_low"]], [x["ci_high"] - x["value"]]]
            yerr = [[y["value"] - y["ci_low"]], [y["ci_high"] - y["value"]]]
            ax.errorbar([x["value"]], [y["value"]], xerr=xerr, yerr=yerr, fmt="o", ms=4, capsize=2)
            ax.annotate(r["variant"], (x["value"], y["value"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(f"{name} ({p['better']} is better)")
        ax.set_ylabel("VQA overall accuracy")
        ax.set_title(f"Spearman {fmt_ci(p['spearman'], p['ci_low'], p['ci_high'], 2)}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _claim_rows(orderings: list[dict]) -> list[dict]:
    rows = []
    for o in orderings:
        paper = "; ".join(f"{k} {'?' if v is None else v}" for k, v in o["paper"].items())
        ours = "; ".join(f"{k} {fmt_ci(x['value'], x['ci_low'], x['ci_high'])}" for k, x in o["ours"].items())
        rows.append({"source": o["source"], "claim": o["claim"], "metric": o["metric"], "paper": paper,
                     "ours (95% interval)": ours, "difference": fmt_ci(o["diff"], o["ci_low"], o["ci_high"]),
                     "verdict": o["verdict"]})
    return rows


def _markdown(cfg: CompareConfig, rows: list[dict], encoders: list[dict], orderings: list[dict],
              untestable: list[dict], proxies: Mapping[str, dict], meta: dict) -> str:
    counts = {k: sum(o["verdict"] == k for o in orderings) for k in ("reproduced", "reversed", "unresolved")}
    md = [f"# Florence-VL comparison in miniature: {cfg.name}", "",
          f"Preset `{cfg.preset}`, {cfg.data['n']} synthetic scenes at {cfg.data['image_size']} px, seeds "
          f"{cfg.seeds} (each seed = one VLM initialisation and data order; encoders are pretrained once, seed "
          f"{cfg.seed}); VQA on the `{cfg.eval['split']}` split ({meta['n_questions']} questions). Wall time "
          f"{meta['minutes']} min. Intervals are {int(100 * cfg.stats['level'])}%: VQA numbers by a bootstrap over "
          "seeds and then test questions (differences paired), alignment losses by Student's t over seeds. A verdict "
          "is `reproduced` when the interval of the difference excludes 0 in the paper's direction, `reversed` when "
          "it excludes 0 the other way, and `unresolved` otherwise.", ""]
    if cfg.notes:
        md += [cfg.notes, ""]
    md += ["## The paper's claims", "", markdown_table(_claim_rows(orderings)),
           f"Reproduced: {counts['reproduced']}; reversed: {counts['reversed']}; unresolved: {counts['unresolved']}"
           f"; untestable with these variants: {len(untestable)}.", ""]
    md += [f"- {u['source']} {u['claim']}: no variant for {', '.join(u['missing'])}" for u in untestable]
    md += ["", f"Paper, Fig. 4: {PAPER_NOTES['fig4']}. Fig. 5: {PAPER_NOTES['fig5']}.", ""]
    cols = ["variant", "encoder", "training", "fusion", "prompts", "vqa.overall", "vqa.reading", *MEASURES]
    flat = [{c: (fmt_ci(r[c]["value"], r[c]["ci_low"], r[c]["ci_high"]) if isinstance(r.get(c), dict) else r.get(c))
             for c in cols} for r in rows]
    md += ["## Variants", "", markdown_table(flat, cols)]
    types = [t for t in QA_TYPES if f"vqa.{t}" in rows[0]]
    md += ["VQA accuracy per question type (chance: " + ", ".join(f"{t} {rows[0]['chance'].get(t)}" for t in types)
           + "):", "", markdown_table([{"variant": r["variant"], **{t: fmt_ci(r[f'vqa.{t}']['value'],
                                        r[f'vqa.{t}']['ci_low'], r[f'vqa.{t}']['ci_high']) for t in types}}
                                       for r in rows], ["variant", *types])]
    md += ["## Pretrained encoders", "", markdown_table(encoder_table_rows(encoders), digits=4),
           "The Florence-2 tower's own scores (OCR exact match on images with text, caption token F1, region "
           f"recall at IoU 0.5) are on the `{cfg.eval['split']}` split: they say whether reading fails in the tower "
           "or in the VLM.", ""]
    prow = [{"measure": k, "better": p["better"], "Spearman with VQA": fmt_ci(p["spearman"], p["ci_low"], p["ci_high"], 2),
             "would pick": p["picks"], "its VQA": _r(p["picked_vqa"], 3), "best by VQA": p["best"],
             "VQA gap to best": fmt_ci(p["pick_gap"], *p["pick_gap_ci"])} for k, p in proxies.items()]
    md += ["## Cheap measures: do they predict the VQA ranking?", "",
           "Computed from stored features only, for every variant and seed: the paper's alignment loss (one fixed "
           "text side), mean linear-probe accuracy over the scene labels, and the correspondence score (an object's "
           "features in one augmented view nearest to its own in the other, among all objects of the split). Spearman "
           "is across variants (a lower-is-better measure is negated first); its interval resamples variants and "
           "seeds.", "", markdown_table(prow), "",
           "## Figures", "", "![claims](forest.png)", "", "![cheap measures](proxies.png)", ""]
    return "\n".join(md)


def encoder_rows(cfg: CompareConfig, ev: Evidence) -> list[dict]:
    """One row per pretrained encoder (shared by variants and seeds): objective, budget, corpus, own scores."""
    seen: dict[tuple, dict] = {}
    for v in cfg.variants:
        rec = ev.records[v.name][0].get("encoder") or {}
        if v.training == "random" or not rec:
            continue
        name = "florence2" if v.training == "florence2" else v.encoder
        seen.setdefault((name, v.training), {
            "encoder": name, "objective": v.training, "steps": rec.get("steps"), "scenes": rec.get("scenes"),
            "first_loss": rec.get("first_loss"), "final_loss": rec.get("final_loss"),
            "minutes": _r(rec.get("minutes"), 2), "tower_eval": rec.get("tower_eval")})
    return list(seen.values())


def encoder_table_rows(encoders: list[dict]) -> list[dict]:
    """The encoder rows of compare.json as flat table rows (compare.md, the app's Compare view, notebook 05)."""
    own = ("ocr_exact_match_with_text", "caption_token_f1", "region_recall_iou50")
    return [{"encoder": e.get("encoder"), "objective": e.get("objective"), "steps": e.get("steps"),
             "scenes": e.get("scenes"), "loss": f"{e.get('first_loss')} -> {e.get('final_loss')}",
             "minutes": e.get("minutes"), **{k: (e.get("tower_eval") or {}).get(k) for k in own}}
            for e in encoders]


def write_outputs(cfg: CompareConfig, out: Path, ev: Evidence, orderings: list[dict], untestable: list[dict],
                  proxies: Mapping[str, dict], meta: dict) -> dict[str, str]:
    """compare.json, compare.md, forest.png, proxies.png; returns {kind: path}."""
    rows, encoders = variant_rows(cfg, ev), encoder_rows(cfg, ev)
    files = {"forest_png": str(plot_forest(orderings, out / "forest.png")),
             "proxies_png": str(plot_proxies(rows, proxies, out / "proxies.png"))}
    atomic_write_text(out / "compare.md", _markdown(cfg, rows, encoders, orderings, untestable, proxies, meta))
    files["markdown"] = str(out / "compare.md")
    payload = {"seeds": list(cfg.seeds), "variants": rows, "encoders": clean(encoders), "orderings": clean(orderings),
               "untestable": untestable, "proxies": clean(proxies), "meta": meta, "files": files}
    # not atomic_write_json: that sorts keys, and a claim's roles read best in the paper's order (better first)
    atomic_write_text(out / "compare.json", json.dumps(payload, indent=1) + "\n")
    files["json"] = str(out / "compare.json")
    return files


def clean(obj: Any) -> Any:
    """JSON-safe copy: numpy scalars to Python, NaN/inf to None, floats rounded to 4 digits."""
    if isinstance(obj, dict):
        return {k: clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return _r(obj)
    return obj
