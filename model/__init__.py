"""Florence-VL on transformers' native classes: config and presets, depth/breadth extraction,
DBFusion, the LLaVA-style model, processing, loading and conversion of checkpoints, other encoders.

Public names are imported lazily (PEP 562): `import model` is instant, and torch and transformers
load only when a name that needs them is used. Training lives in `model.training`.
"""
from __future__ import annotations

from model.lazy import lazy_exports

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

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
