"""What the instrumentation needs from a model: named hook points, and a way to run the vision part.

Every model the workbench can capture from (this project's Florence-VL, and the adapters of other
transformers families in `model.adapters`) is a *feature source*:

    source.tap_points() -> dict[str, TapPoint]   every tap of the model, in a stable order
    source.image_features(pixel_values)          runs what the vision taps need (no LLM)
    processor.images(images) -> Tensor           pixel values, preprocessed as the model expects

and, where the model has an LLM (`llm.layer{i}` taps), an ordinary forward with `input_ids`.

A tap is a forward hook on one module: its output (the first element of a tuple output) *is* the feature,
already in the tap's documented shape. Where a feature is a view of a bigger tensor (one prompt's rows of
the batched BART encoder, one stream of the fusion input), the model calls a pass-through module on that
view (`model.hooks.HookPoint`), so no reader has to know how the model batched its work.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class TapPoint:
    """One named place to read a feature from.

    kind: "map" (B, C, H, W), "tokens" (B, N, D) image tokens, "seq" (B, T, H) a sequence
    (see `model.tokens`). has_global: token 0 is a global / CLS token (tokens and seq kinds)."""

    module: nn.Module
    kind: str
    has_global: bool = False

