"""Loading, saving and converting models: one entry point, `load_model(path_or_hub_id, device=, dtype=)`.

Modules, from the bottom up: `errors` (CheckpointError and friends, no torch), `layout` (what a directory or
hub id holds, decided once, no torch), `weights` (reading tensors safely, key checks), `florence2` and
`convert` (pure conversion of official checkpoints: a directory in, config + tensors + processor out),
`build` (random-init models of the presets), `load` (load_model, save_model, convert_checkpoint).

Names are imported lazily (PEP 562), so `from model.loading import CheckpointError` loads no torch.
"""
from __future__ import annotations

from model.lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "CheckpointError": "model.loading.errors", "UnsupportedModelError": "model.loading.errors",
    "ConversionReport": "model.loading.errors",
    "Layout": "model.loading.layout", "detect_layout": "model.loading.layout",
    "build_config": "model.loading.build", "build_model": "model.loading.build",
    "build_processor": "model.loading.build",
    "load_model": "model.loading.load", "save_model": "model.loading.load",
    "convert_checkpoint": "model.loading.load", "load_florence2": "model.loading.load",
}
__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
