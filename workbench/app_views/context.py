"""The app's inputs as the views see them: the checked configuration (`AppConfig`), the data-root guard
(`resolve_under_root`, `confine_images`) and the run-directory results.

The implementation is `workbench.pipelines.app_inputs`, one layer down, because `fvl app` runs the same
checks before it starts a server and commands may not import the views; this module gives the views
their names without reaching across layers.
"""
from __future__ import annotations

from workbench.pipelines.app_inputs import (
    ENV_ROOT,
    ENV_STORE,
    MAX_UPLOAD_MB,
    MAX_UPLOAD_PIXELS,
    RESULTS,
    AppConfig,
    PathRefused,
    build_parser,
    confine_images,
    default_root,
    find_stores,
    is_dataset,
    is_model_dir,
    is_store,
    make_config,
    model_preset,
    read_json,
    refused_summary,
    resolve_under_root,
)

__all__ = [
    "AppConfig", "ENV_ROOT", "ENV_STORE", "MAX_UPLOAD_MB", "MAX_UPLOAD_PIXELS", "PathRefused", "RESULTS",
    "build_parser", "confine_images", "default_root", "find_stores", "is_dataset", "is_model_dir", "is_store",
    "make_config", "model_preset", "read_json", "refused_summary", "resolve_under_root"
]
