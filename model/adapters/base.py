"""What every adapter shares: the feature-source protocol of `model.sources` around a transformers model,
and a processor built from the model's own image processor.

An adapter is an `nn.Module` holding the family's model (`adapter.model`), so `.to()`, `.eval()` and hooks
work as on any module; the family's own modules are the hook points wherever they already output the
feature (an encoder layer), and a `HookPoint` is called on a feature that is a view of a bigger output.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from model.hooks import HookPoint
from model.sources import TapPoint
from workbench.data.images import load_image

LAYER_PATHS = ("encoder.layers", "encoder.layer", "layers", "vision_model.encoder.layers")


def find_layers(module: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks of a ViT-style model, under the name its family uses."""
    for path in LAYER_PATHS:
        obj = module
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList):
            return obj
    raise TypeError(f"cannot find the transformer layers of {type(module).__name__} (looked for {', '.join(LAYER_PATHS)})")


def first(output):
    """A module's output as a tap sees it: the first element of a tuple, the tensor otherwise."""
    return output[0] if isinstance(output, (tuple, list)) else output


class FeatureSource(nn.Module):
    """Base of the adapters: `tap_points()` and `image_features(pixel_values)` (`model.sources`)."""

    family = ""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.eval()

    @property
    def config(self):
        return self.model.config

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def tap_points(self) -> dict[str, TapPoint]:
        raise NotImplementedError

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def vit_tap_points(layers: nn.ModuleList, output_view: HookPoint, has_global: bool) -> dict[str, TapPoint]:
    """`vision.layer{i}` on each block (its output = hidden_states[i + 1] of the family's forward) and
    `vision.output` (the vision model's last_hidden_state)."""
    taps = {f"vision.layer{i}": TapPoint(layer, "seq", has_global) for i, layer in enumerate(layers)}
    taps["vision.output"] = TapPoint(output_view, "seq", has_global)
    return taps


class AdapterProcessor:
    """Preprocessing with the model's own `AutoImageProcessor` (and its tokenizer, where it has one)."""

    def __init__(self, image_processor, tokenizer=None):
        self.image_processor = image_processor
        self.tokenizer = tokenizer

    @classmethod
    def from_directory(cls, path: str | Path, with_tokenizer: bool = False) -> "AdapterProcessor":
        from transformers import AutoImageProcessor, AutoTokenizer

        image_processor = AutoImageProcessor.from_pretrained(str(path), local_files_only=True)
        tokenizer = None
        if with_tokenizer and any((Path(path) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        return cls(image_processor, tokenizer)

    def images(self, images: Sequence) -> torch.Tensor:
        """PIL images or paths -> pixel_values (B, 3, H, W) as the model expects them."""
        pil = [load_image(im) for im in images]
        return self.image_processor(images=pil, return_tensors="pt")["pixel_values"]

    def save_pretrained(self, path: str | Path) -> None:
        self.image_processor.save_pretrained(str(path))
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(path))
