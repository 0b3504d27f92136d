"""CLIP (`CLIPModel`, `CLIPVisionModel`): the vision tower, CLS token first."""
from __future__ import annotations

from model.adapters.vit_style import ViTStyleAdapter


class ClipAdapter(ViTStyleAdapter):
    family = "clip"
    has_global = True
    model_classes = {"CLIPModel": "CLIPModel", "CLIPVisionModel": "CLIPVisionModel",
                     "clip": "CLIPModel", "clip_vision_model": "CLIPVisionModel"}
    default_class = "CLIPVisionModel"
