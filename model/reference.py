"""The naive reference for depth/breadth extraction: transformers' own `Florence2ForConditionalGeneration`
run once per prompt (as the official Florence-VL code does through `generate`), plus once for V.

Used by the equivalence tests and `fvl bench extraction`; never on a hot path.
"""
from __future__ import annotations

import torch
from transformers import Florence2ForConditionalGeneration

from model.vision import Florence2DepthBreadth, extractor_state_dict_to_florence2


def native_from_extractor(extractor: Florence2DepthBreadth, seed: int = 0) -> Florence2ForConditionalGeneration:
    """A native Florence-2 (decoder included, random) holding the extractor's vision and encoder weights."""
    torch.manual_seed(seed)
    native = Florence2ForConditionalGeneration(extractor.config)
    missing, unexpected = native.load_state_dict(extractor_state_dict_to_florence2(extractor.state_dict()), strict=False)
    if unexpected:
        raise RuntimeError(f"unexpected keys mapping the extractor onto native Florence-2: {unexpected[:5]}")
    not_decoder = [k for k in missing if ".decoder." not in k and not k.startswith("lm_head")
                   and "shared" not in k and "encoder.embed_tokens" not in k]
    if not_decoder:
        raise RuntimeError(f"native Florence-2 keys left unset: {not_decoder[:5]}")
    native.tie_weights()
    return native.eval()


@torch.no_grad()
def naive_streams(native: Florence2ForConditionalGeneration, pixel_values: torch.Tensor,
                  prompt_token_ids: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """{depth, <prompt>...} the slow way: V from get_image_features, then one full forward per prompt."""
    cfg = native.config
    depth = native.get_image_features(pixel_values).pooler_output
    n_img = depth.shape[1]
    streams = {"depth": depth}
    for name, ids in prompt_token_ids.items():
        input_ids = torch.tensor([[cfg.image_token_id] * n_img + list(ids)] * pixel_values.shape[0])
        out = native(input_ids=input_ids, pixel_values=pixel_values)
        streams[name] = out.encoder_last_hidden_state[:, :n_img]
    return streams
