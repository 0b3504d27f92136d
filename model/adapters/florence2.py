"""Native Florence-2 (`Florence2ForConditionalGeneration`) as a feature source.

Taps: `vision.stage{s}` (DaViT stage s, (B, C_s, H_s, W_s): the last block of the stage), `depth` (the
projected image tokens V, (B, N, D), global token first: the multimodal projector's output),
`prompt.{name}.layer{i}` and `prompt.{name}` (BART encoder layer i / the last layer at the image positions,
with the image followed by the task prompt `name`, exactly as the family's own forward feeds its encoder).
The prompts run one at a time, unpadded, as `Florence2ForConditionalGeneration.forward` would; the decoder
never runs.
"""
from __future__ import annotations

import torch
from torch import nn

from model.adapters.base import FeatureSource
from model.hooks import HookPoint
from model.sources import TapPoint


class Florence2Adapter(FeatureSource):
    family = "florence2"

    def __init__(self, model: nn.Module, prompt_token_ids: dict[str, list[int]] | None = None):
        super().__init__(model)
        self.prompt_token_ids = {k: list(v) for k, v in (prompt_token_ids or {}).items()}
        n_layers = len(model.model.language_model.encoder.layers)
        self.views = nn.ModuleDict({_key(name, i): HookPoint() for name in self.prompt_token_ids
                                    for i in [*range(n_layers), None]})

    def tap_points(self) -> dict[str, TapPoint]:
        f2 = self.model.model
        taps = {f"vision.stage{s}": TapPoint(stage[-1], "map") for s, stage in enumerate(f2.vision_tower.blocks)}
        taps["depth"] = TapPoint(f2.multi_modal_projector, "tokens", has_global=True)
        n_layers = len(f2.language_model.encoder.layers)
        for name in self.prompt_token_ids:
            for i in range(n_layers):
                taps[f"prompt.{name}.layer{i}"] = TapPoint(self.views[_key(name, i)], "tokens", has_global=True)
            taps[f"prompt.{name}"] = TapPoint(self.views[_key(name, None)], "tokens", has_global=True)
        return taps

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """V (B, N, D); then one BART encoder pass per prompt over [V ; prompt], read through the views."""
        f2 = self.model.model
        depth = f2.get_image_features(pixel_values.to(self.device, self.dtype)).pooler_output
        n_img = depth.shape[1]
        embed = f2.get_input_embeddings()
        for name, ids in self.prompt_token_ids.items():
            prompt = torch.tensor([ids] * depth.shape[0], device=depth.device)
            text = embed(prompt)
            out = f2.language_model.encoder(inputs_embeds=torch.cat([depth.to(text.dtype), text], dim=1),
                                            output_hidden_states=True)
            for i, hidden in enumerate(out.hidden_states[1:]):
                self.views[_key(name, i)](hidden[:, :n_img])
            self.views[_key(name, None)](out.last_hidden_state[:, :n_img])
        return depth


def _key(prompt: str, layer: int | None) -> str:
    return f"{prompt}__last" if layer is None else f"{prompt}__layer{layer}"
