"""DINOv2 (`Dinov2Model`): CLS token first, then the patches; last_hidden_state is after the final layernorm."""
from __future__ import annotations

from model.adapters.vit_style import ViTStyleAdapter


class Dinov2Adapter(ViTStyleAdapter):
    family = "dinov2"
    has_global = True
    model_classes = {"Dinov2Model": "Dinov2Model",
                     "dinov2": "Dinov2Model"}
    default_class = "Dinov2Model"
