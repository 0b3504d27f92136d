"""Do the cheap measures predict the VQA ranking? Spearman correlation across variants, and the pick.

For each measure: its Spearman rank correlation with VQA accuracy across the variants (seed means; a measure
where lower is better is negated first, so a positive correlation always means "ranks the variants as VQA
does"), a bootstrap interval over variants and seeds, and the variant it would have chosen without training
any LLM - beside the variant VQA actually favours, with the interval of their VQA difference (a pick inside
that interval is as good as the best, as far as this data can tell).
"""
from __future__ import annotations

import numpy as np

from workbench.pipelines.compare.config import CompareConfig
from workbench.pipelines.compare.orderings import Evidence
from workbench.pipelines.compare.stats import bootstrap_accuracy, spearman_interval

MEASURES = {"alignment": "lower", "probe": "higher", "correspondence": "higher"}


def proxy_table(cfg: CompareConfig, ev: Evidence) -> dict[str, dict]:
    """{measure: {"spearman", "ci_low", "ci_high", "better", "picks", "picked_vqa", "best", "picks_best",
    "pick_gap", "pick_gap_ci", "values"}}."""
    variants = cfg.variants
    vqa = np.stack([ev.correct(v).mean(1) for v in variants])  # (variants, seeds)
    best = variants[int(np.argmax(vqa.mean(1)))]
    out: dict[str, dict] = {}
    for name, better in MEASURES.items():
        m = np.asarray([ev.per_seed(v, name) for v in variants], dtype=np.float64)
        signed = -m if better == "lower" else m
        rho, lo, hi = spearman_interval(signed, vqa, n_boot=int(cfg.stats["bootstrap"]),
                                        level=float(cfg.stats["level"]), seed=cfg.seed)
        means = signed.mean(1)
        finite = np.isfinite(means)
        pick = variants[int(np.nanargmax(np.where(finite, means, -np.inf)))] if finite.any() else None
        gap = (bootstrap_accuracy(ev.correct(best), ev.correct(pick), **ev.boot) if pick is not None
               else (float("nan"),) * 3)
        out[name] = {"spearman": rho, "ci_low": lo, "ci_high": hi, "better": better,
                     "picks": pick.name if pick else None,
                     "picked_vqa": float(vqa[variants.index(pick)].mean()) if pick else None,
                     "best": best.name, "best_vqa": float(vqa.mean(1).max()),
                     "picks_best": bool(pick is not None and pick.name == best.name),
                     "pick_gap": gap[0], "pick_gap_ci": [gap[1], gap[2]],
                     "values": {v.name: float(np.mean(m[i])) for i, v in enumerate(variants)}}
    return out
