"""ViT (`ViTModel`): CLS token first, then the patches; last_hidden_state is after the final layernorm."""
from __future__ import annotations

from model.adapters.vit_style import ViTStyleAdapter


class ViTAdapter(ViTStyleAdapter):
    family = "vit"
    has_global = True
    model_classes = {"ViTModel": "ViTModel",
                     "vit": "ViTModel"}
    default_class = "ViTModel"
