"""The common shape of ViT-style encoders (CLIP, SigLIP, DINOv2, ViT): patch tokens through N blocks.

Taps: `vision.layer{i}` = the output of block i (the family's `hidden_states[i + 1]` under
output_hidden_states=True; hidden_states[0] is the embedding), `vision.output` = the vision model's
`last_hidden_state` (after the final norm where the family has one: SigLIP, DINOv2, ViT; CLIP applies its
post-norm only to the pooled token, so there it equals the last block's output).
"""
from __future__ import annotations

import torch
from torch import nn

from model.adapters.base import FeatureSource, find_layers, vit_tap_points
from model.hooks import HookPoint
from model.sources import TapPoint


class ViTStyleAdapter(FeatureSource):
    """A family that subclasses this names its model classes and whether token 0 is a CLS token."""

    has_global = True
    model_classes: dict[str, str] = {}  # architecture name or model_type -> transformers class name
    default_class = ""

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.vision = getattr(model, "vision_model", model)  # CLIPModel / SiglipModel hold a vision_model
        self.layers = find_layers(self.vision)
        self.output_view = HookPoint()

    def tap_points(self) -> dict[str, TapPoint]:
        return vit_tap_points(self.layers, self.output_view, self.has_global)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The vision model's last_hidden_state (B, T, C); every block runs, so every layer tap fires."""
        out = self.vision(pixel_values=pixel_values.to(self.device, self.dtype))
        return self.output_view(out.last_hidden_state)

    @classmethod
    def model_class(cls, config: dict):
        """The transformers class named by config.json's architectures, else by its model_type."""
        import transformers

        keys = [*(config.get("architectures") or []), config.get("model_type", "")]
        name = next((cls.model_classes[k] for k in keys if k in cls.model_classes), cls.default_class)
        return getattr(transformers, name)
