"""Florence-VL on transformers' native classes: config and presets, depth/breadth extraction,
DBFusion, the LLaVA-style model, processing, loading and conversion of checkpoints, other encoders.

Public names are imported lazily (PEP 562): `import model` is instant, and torch and transformers
load only when a name that needs them is used. Training lives in `model.training`.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "ENCODERS": "model.encoders", "VisionEncoder": "model.encoders", "build_encoder": "model.encoders",
    "SELSA": "model.selsa",
    "build_config": "model.loading.build", "build_model": "model.loading.build",
    "build_processor": "model.loading.build",
    "load_model": "model.loading.load", "save_model": "model.loading.load",
    "DEFAULT_PROMPTS": "model.presets", "PRESETS": "model.presets", "REAL_SIZE_PRESETS": "model.presets",
    "FlorenceVLConfig": "model.config", "preset_config": "model.config",
    "FlorenceVLForConditionalGeneration": "model.florence_vl",
    "DBFusion": "model.fusion", "Projector": "model.fusion",
    "FlorenceVLProcessor": "model.processing",
    "Florence2DepthBreadth": "model.vision",
    "TapPoint": "model.sources",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'model' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
