"""Train-and-compare runs of small Florence-VL variants (`fvl compare`), with seeds, intervals and verdicts.

Why: the paper's ablations (fusion strategy, Table 1; depth only vs depth + breadth, Table 4; leave one prompt
out, Tables 5 and 6a; alignment loss by encoder and by removed stream, Figs. 4-5) are claims about *differences*.
This package reruns them in miniature on synthetic scenes, with several seeds per variant, and says from the
interval of each difference whether our numbers reproduce the claim, reverse it, or cannot tell. It also asks
whether cheap measures of the encoder's stored features predict the VQA ranking before any LLM is trained.

    config       the config file: variants, seeds, budgets (light: validates before torch loads)
    variants     encoders (trained once, shared) and VLMs (one per seed): training, evaluation, capture
    views        two augmented views of each scene with the objects' boxes (for the correspondence score)
    measures     the cheap measures from stored features: alignment loss, probe accuracy, correspondence
    stats        bootstrap and t intervals, verdicts, Spearman with an interval
    orderings    the paper's claims as oriented differences with verdicts
    proxies      each measure's rank correlation with VQA, and which variant it would have picked
    outputs      compare.json, compare.md, forest.png, proxies.png
    run          run_compare: the whole run, resumable

The heavy parts (torch, training) load on first use of a name below, so `fvl compare` can refuse a bad config
at once.
"""
from __future__ import annotations

import importlib

from workbench.pipelines.compare.config import (
    CompareConfig,
    ConfigError,
    Variant,
    configs_dir,
    load_config,
    shipped_config,
)

_LAZY = {
    "run_compare": "workbench.pipelines.compare.run",
    "check_encoder_configs": "workbench.pipelines.compare.variants",
    "compute_orderings": "workbench.pipelines.compare.orderings",
    "Evidence": "workbench.pipelines.compare.orderings",
    "proxy_table": "workbench.pipelines.compare.proxies",
    "encoder_table_rows": "workbench.pipelines.compare.outputs",
}
__all__ = ["CompareConfig", "ConfigError", "Variant", "configs_dir", "load_config", "shipped_config", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'workbench.pipelines.compare' has no attribute {name!r}")
