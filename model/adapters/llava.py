"""LLaVA (`LlavaForConditionalGeneration`): a vision tower, a projector, an LLM.

Taps: `vision.layer{i}` (the vision tower's block i), `projector.output` (image tokens in the LLM's space,
(B, N, H); token 0 is CLS only when the vision_feature_select_strategy is "full"), and `llm.layer{i}` (the
LLM's decoder layer i, (B, T, H), for an ordinary forward with `input_ids`: `adapter(input_ids=...,
pixel_values=...)`). The last `llm.layer` is before the final norm; transformers' hidden_states[-1] is after it.
"""
from __future__ import annotations

import torch
from torch import nn

from model.adapters.base import FeatureSource, find_layers
from model.sources import TapPoint


class LlavaAdapter(FeatureSource):
    family = "llava"

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.vision_layers = find_layers(model.model.vision_tower)
        self.llm_layers = model.model.language_model.layers

    def tap_points(self) -> dict[str, TapPoint]:
        full = getattr(self.config, "vision_feature_select_strategy", "default") == "full"
        taps = {f"vision.layer{i}": TapPoint(layer, "seq", has_global=True) for i, layer in enumerate(self.vision_layers)}
        taps["projector.output"] = TapPoint(self.model.model.multi_modal_projector, "tokens", has_global=full)
        taps.update({f"llm.layer{i}": TapPoint(layer, "seq") for i, layer in enumerate(self.llm_layers)})
        return taps

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected image tokens (B, N, H), as the model puts them in place of its image placeholders."""
        out = self.model.model.get_image_features(pixel_values=pixel_values.to(self.device, self.dtype))
        feats = out.pooler_output
        return torch.stack(list(feats)) if isinstance(feats, (list, tuple)) else feats

    def forward(self, **inputs):
        """The family's own forward (LLM taps fire here)."""
        return self.model(**inputs)
