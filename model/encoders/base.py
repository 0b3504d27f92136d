"""The one interface of every vision encoder (`VisionEncoder`) and the helpers they share.

Every encoder returns an ordered dict of token streams {name: (B, N, D)} with a global token first
(N = h*w + 1, like Florence-2's V) and names the modules whose forward output is each tap.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.tokens import pool_features

# ImageNet statistics, as the Florence-2 processor uses.
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)
POOLINGS = ("mean", "global", "patch_mean")


# ----------------------------------------------------------------------------- inputs and helpers

def as_pixel_values(images, size: int | None = None) -> Tensor:
    """Turn images into normalised float pixel values (B, 3, H, W).

    Accepts uint8 arrays/tensors (B, H, W, 3) (e.g. video frames from workbench.data.videos), which are
    scaled to [0, 1] and normalised with ImageNet mean/std, or float tensors (B, 3, H, W), which are
    taken as already normalised. `size` resizes (bilinear) to a square.
    """
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    if not isinstance(images, Tensor):
        raise TypeError(f"images must be a numpy array or torch tensor, got {type(images).__name__}")
    if images.dtype == torch.uint8:
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"uint8 images must have shape (B, H, W, 3), got {tuple(images.shape)}")
        x = images.permute(0, 3, 1, 2).float() / 255.0
        mean = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
        x = (x - mean) / std
    elif images.is_floating_point():
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"float images must be normalised pixel values (B, 3, H, W), got {tuple(images.shape)}")
        x = images
    else:
        raise TypeError(f"images must be uint8 (B, H, W, 3) or float (B, 3, H, W), got dtype {images.dtype}")
    if size is not None and tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x


def pool_tokens(tokens: Tensor, pooling: str = "mean") -> Tensor:
    """(B, N, D) -> (B, D): `mean` over all N tokens (the global one included), `global` = token 0
    (CLS / mean token), `patch_mean` = mean of tokens 1..N-1. The pooling itself is `model.tokens`'."""
    if pooling == "mean":
        return pool_features(tokens, "seq", "mean")  # every position, as a sequence is pooled
    if pooling == "global":
        return pool_features(tokens, "tokens", "global")
    if pooling == "patch_mean":
        return pool_features(tokens, "tokens", "mean")
    raise ValueError(f"pooling={pooling!r} is unknown; choose from {POOLINGS}")


def _conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def _merge_config(kind: str, defaults: dict, config: dict | None) -> dict:
    config = dict(config or {})
    unknown = sorted(set(config) - set(defaults))
    if unknown:
        raise ValueError(f"encoder kind {kind!r}: unknown config key(s) {unknown}; valid keys are {sorted(defaults)}")
    merged = copy.deepcopy(defaults)
    merged.update(config)
    return merged


def _seeded(seed: int):
    """Fork the global RNG so building an encoder is reproducible and leaves the caller's RNG alone."""
    class _Ctx:
        def __enter__(self):
            self._fork = torch.random.fork_rng(devices=[])
            self._fork.__enter__()
            torch.manual_seed(int(seed))

        def __exit__(self, *exc):
            return self._fork.__exit__(*exc)
    return _Ctx()


# ----------------------------------------------------------------------------- the interface

class VisionEncoder(nn.Module):
    """One interface for every vision encoder feeding Florence-VL and the taps.

    stream_names: ordered stream names; single-stream encoders give ["depth"].
    hidden_size: channel width D of every stream.
    forward(pixel_values (B, 3, H, W)) -> OrderedDict {stream: (B, N, D)}, token 0 global.
    tap_modules(): tap name -> module whose forward output is that tap (hook-able, actually called):
        vision.stage{s} (B, C, H, W) and/or vision.block{j} / vision.layer{i}. The `depth` tap is the
        forward output itself; Florence-VL hooks it at its own stream hook point.
    """

    kind: str = ""
    stream_names: list[str] = ["depth"]
    hidden_size: int = 0

    def __init__(self, config: dict):
        super().__init__()
        self.config = config  # JSON-able; with `kind` it rebuilds this encoder (save_encoder/load_encoder)

    def num_tokens(self, image_size: int) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, pixel_values: Tensor) -> dict[str, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def tap_modules(self) -> dict[str, nn.Module]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _check_pixels(self, pixel_values: Tensor) -> Tensor:
        if not isinstance(pixel_values, Tensor) or pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            shape = tuple(pixel_values.shape) if isinstance(pixel_values, Tensor) else type(pixel_values).__name__
            raise ValueError(f"{self.kind} encoder: pixel_values must be a float tensor (B, 3, H, W), got {shape}; "
                             "use model.encoders.as_pixel_values(images) to convert uint8 (B, H, W, 3) images")
        if not pixel_values.is_floating_point():
            raise ValueError(f"{self.kind} encoder: pixel_values must be float (normalised), got {pixel_values.dtype}; "
                             "use model.encoders.as_pixel_values(images)")
        param = next(self.parameters())
        return pixel_values.to(device=param.device, dtype=param.dtype)

    def pooled(self, pixel_values: Tensor, pooling: str = "mean", stream: str = "depth") -> Tensor:
        """(B, D) summary of one stream: what the training objectives and probes consume."""
        return pool_tokens(self(pixel_values)[stream], pooling)

    @torch.no_grad()
    def tap_shapes(self, image_size: int, batch: int = 1) -> dict[str, tuple]:
        """Shapes of every tap for a square image, found by one forward on a dummy input."""
        shapes: dict[str, tuple] = {}
        handles = []
        for name, module in self.tap_modules().items():
            def hook(_m, _inp, out, name=name):
                out = out[0] if isinstance(out, (tuple, list)) else out
                shapes[name] = tuple(out.shape)
            handles.append(module.register_forward_hook(hook))
        was_training = self.training
        try:
            self.eval()
            param = next(self.parameters())
            self(torch.zeros(batch, 3, image_size, image_size, device=param.device, dtype=param.dtype))
        finally:
            self.train(was_training)
            for h in handles:
                h.remove()
        missing = sorted(set(self.tap_modules()) - set(shapes))
        if missing:
            raise RuntimeError(f"{self.kind} encoder: taps {missing} never fired; their modules are not called in forward")
        return shapes


class _ProjectedTokens(nn.Module):
    """Linear(C -> D) then LayerNorm(D): the same order as Florence-2's image projection, so every
    encoder's depth stream lives on a comparable scale when fused."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.norm(self.linear(tokens))

