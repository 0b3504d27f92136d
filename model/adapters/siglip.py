"""SigLIP (`SiglipModel`, `SiglipVisionModel`): the vision tower; no CLS token (pooling is a separate head)."""
from __future__ import annotations

from model.adapters.vit_style import ViTStyleAdapter


class SiglipAdapter(ViTStyleAdapter):
    family = "siglip"
    has_global = False
    model_classes = {"SiglipModel": "SiglipModel", "SiglipVisionModel": "SiglipVisionModel",
                     "siglip": "SiglipModel", "siglip_vision_model": "SiglipVisionModel"}
    default_class = "SiglipVisionModel"
