"""Named taps on a model: capture features per depth and per prompt, and intervene on streams.

A tap is a named hook point of the model (`model.tap_points()`, see `model.sources`); its names are
parsed by `workbench.tap_names.TapName` and pooled by `model.tokens`. The vocabulary:

  vision.stage{s}           (B, C_s, H_s, W_s)  DaViT/CvT stage s output (other encoders: their own stages)
  vision.block{j}           (B, C, H, W)        every DaViT block, numbered across stages
  vision.layer{i}           (B, T, C)           ViT-style encoders (CLIP, SigLIP, DINOv2, ViT)
  depth                     (B, N, D)           the depth stream V as fused
  prompt.{name}.layer{i}    (B, N, D)           BART encoder layer i at the image positions, under prompt `name`
  prompt.{name}             (B, N, D)           the breadth stream of prompt `name` as fused
  fusion.input              (B, N, (K+1)D)      DBFusion input; views fusion.input[depth], fusion.input[ocr], ...
  fusion.output             (B, N, H)           projector output: image tokens in the LLM's space
  llm.layer{i}              (B, T, H)           LLM hidden state after decoder layer i (per step during generate)

    with capture(model, taps=["depth", "prompt.*"], pool="mean") as cache:
        model.get_image_features(pixel_values)
    cache["prompt.ocr"]  # (B, D)

Every tap asked for must fire: a tap that did not fire raises `TapError` (never a silent gap).
"""
from __future__ import annotations

import contextlib

import torch

from model.sources import TapPoint
from model.tokens import PoolError
from model.tokens import parse_pool as _parse_pool
from model.tokens import pool_features
from workbench.tap_names import TapNameError, check_spec, expand


class TapError(ValueError):
    """Unknown tap, bad pattern or pooling, or a tap that did not fire."""


def parse_pool(pool: str) -> tuple[str, int]:
    """'none' | 'mean' | 'global' | 'grid{k}' -> (mode, k); anything else is a TapError."""
    try:
        return _parse_pool(pool)
    except PoolError as exc:
        raise TapError(str(exc)) from exc


def pool_tensor(x: torch.Tensor, kind: str, pool: str, has_global: bool = True,
                mask: torch.Tensor | None = None) -> torch.Tensor:
    """`model.tokens.pool_features`, with its errors as TapError."""
    try:
        return pool_features(x, kind, pool, has_global, mask)
    except PoolError as exc:
        raise TapError(str(exc)) from exc


def _unwrap(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def tap_table(model) -> dict[str, TapPoint]:
    """All taps of a model (any feature source), in a stable order."""
    return model.tap_points()


def default_taps(model) -> list[str]:
    """The taps captured by default: stages, depth, every prompt tap, fusion output (ViT-style encoders:
    every layer and the output)."""
    names = list(tap_table(model))
    chosen = [n for n in names if n.startswith(("vision.stage", "prompt.")) or n in ("depth", "fusion.output")]
    return chosen or [n for n in names if n.startswith("vision.layer") or n == "vision.output"]


def resolve(model, patterns: list[str] | str) -> list[str]:
    """Expand glob patterns ("prompt.*", "vision.stage*", "all", "default") into this model's tap names.

    A view (`fusion.input[ocr]`) resolves to the tap it is a view of; unknown names are errors."""
    try:
        patterns = check_spec(patterns)
    except TapNameError as exc:
        raise TapError(f"{exc} (list them all with `fvl taps`)") from exc
    available = list(tap_table(model))
    names: list[str] = []
    for pattern in patterns:
        if pattern == "all":
            matched = available
        elif pattern == "default":
            matched = default_taps(model)
        else:
            base = pattern.split("[", 1)[0] if pattern.endswith("]") else pattern
            try:
                matched = expand([base], available)
            except TapNameError as exc:
                raise TapError(f"{exc} (list them all with `fvl taps`)") from exc
        names += [m for m in matched if m not in names]
    return names


class Cache(dict):
    """tap name -> captured tensor (the first call); `steps(name)` gives every call (generate steps)."""

    def __init__(self):
        super().__init__()
        self._steps: dict[str, list[torch.Tensor]] = {}

    def steps(self, name: str) -> list[torch.Tensor]:
        return self._steps.get(name, [])

    def record(self, name: str, x: torch.Tensor) -> None:
        self._steps.setdefault(name, []).append(x)
        if name not in self:
            dict.__setitem__(self, name, x)


@contextlib.contextmanager
def capture(model, taps: list[str] | str = "default", pool: str = "none", device: str | torch.device | None = "cpu",
            dtype: torch.dtype | None = None, attention_mask: torch.Tensor | None = None, detach: bool = True):
    """Record the named taps during any forward or `generate()` call inside the block.

    ``detach=False`` keeps the captured tensors in the autograd graph (on the model's device), so an
    attribution can differentiate a score of a tap with respect to the input; ``device=None`` leaves
    the tensors where the model computed them."""
    names = resolve(model, taps)
    parse_pool(pool)
    points = tap_table(model)
    cache = Cache()

    def make_hook(name: str, point: TapPoint):
        def hook(module, args, output):
            x = _unwrap(output)
            x = x.detach() if detach else x
            mask = attention_mask if name.startswith("llm.") else None
            x = pool_tensor(x, point.kind, pool, point.has_global, mask)
            if detach and x.device.type != "meta" and (device is not None or dtype is not None):
                x = x.to(device=device if device is not None else x.device, dtype=dtype or x.dtype)
            cache.record(name, x)
        return hook

    # Several taps can share a module: one hook each is fine.
    handles = [points[name].module.register_forward_hook(make_hook(name, points[name])) for name in names]
    try:
        yield cache
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in names if n not in cache]
    if missing:
        raise TapError(f"taps did not fire: {missing}. Run a forward that reaches them inside the block "
                       "(vision-only calls such as get_image_features never reach llm.* taps)")


def fusion_views(model) -> dict[str, tuple[int, int]]:
    """Per-stream channel slices of `fusion.input` (channel fusion only; other sources have none)."""
    config = getattr(model, "config", None)
    if getattr(config, "fusion", None) != "channel" or not hasattr(model, "fusion"):
        return {}
    return model.fusion.stream_slices(config.stream_width)


def tap_shapes(model, image_size: int | None = None, with_llm: bool = True, processor=None) -> dict[str, tuple]:
    """Shapes of every tap for one image (batch 1), found by running the model once with hooks.

    Real-size presets on the meta device are computed from the config, so nothing is allocated. Other
    feature sources run `image_features` on one blank image made by their own processor; their text-side
    taps (`llm.layer{i}`) depend on the text, so their length is shown as "T"."""
    param = next(model.parameters())
    if param.device.type == "meta":
        return _analytic_shapes(model, image_size or model.config.image_size, with_llm)
    points = tap_table(model)
    runs_llm = with_llm and hasattr(model, "merge_image_features")  # this project's model: a full forward
    names = [n for n in points if runs_llm or not n.startswith("llm.")]
    px = _blank_pixels(model, image_size, processor).to(device=param.device, dtype=param.dtype)
    with torch.no_grad(), capture(model, names, pool="none", device=None) as cache:
        if runs_llm:
            n_img = model.config.num_image_tokens(px.shape[-1])
            ids = torch.full((1, n_img + 4), model.config.image_token_id, dtype=torch.long, device=param.device)
            ids[0, -4:] = 1
            model(input_ids=ids, pixel_values=px)
        else:
            model.image_features(px)
    shapes = {n: tuple(cache[n].shape) for n in names}
    if with_llm and not runs_llm:
        hidden = getattr(getattr(model.config, "text_config", None), "hidden_size", "H")
        shapes.update({n: (1, "T", hidden) for n in points if n.startswith("llm.")})
    return {n: shapes[n] for n in points if n in shapes}


def _blank_pixels(model, image_size: int | None, processor) -> torch.Tensor:
    if processor is not None and not hasattr(model, "merge_image_features"):
        from PIL import Image

        side = image_size or 64
        return processor.images([Image.new("RGB", (side, side), (128, 128, 128))])
    size = image_size or model.config.image_size
    return torch.zeros(1, 3, size, size)


def _analytic_shapes(model, size: int, with_llm: bool) -> dict[str, tuple]:
    """Tap shapes from the config alone (meta-device models cannot run attention masks)."""
    cfg = model.config
    if cfg.encoder_type != "florence2":
        raise TapError("analytic tap shapes exist for the Florence-2 encoder only; build other encoders on CPU")
    vc = cfg.vision_config.vision_config
    shapes: dict[str, tuple] = {}
    side, j = size, 0
    for s, (stride, dim, depth) in enumerate(zip(vc.patch_stride, vc.embed_dim, vc.depths)):
        side = (side + stride - 1) // stride
        for _ in range(depth):
            shapes[f"vision.block{j}"] = (1, dim, side, side)
            j += 1
        shapes[f"vision.stage{s}"] = (1, dim, side, side)
    n, d, h = cfg.num_image_tokens(size), cfg.stream_width, cfg.text_config.hidden_size
    n_stream = n // len(cfg.stream_names) if cfg.fusion == "token" else n
    ordered: dict[str, tuple] = {}
    for name in tap_table(model):
        if name in shapes:
            ordered[name] = shapes[name]
        elif name == "depth" or name.startswith("prompt."):
            ordered[name] = (1, n_stream, d)
        elif name == "fusion.input":
            ordered[name] = (1, n, cfg.fusion_width)
        elif name == "fusion.output":
            ordered[name] = (1, n, h)
        elif name.startswith("llm.") and with_llm:
            ordered[name] = (1, n + 4, h)
    return ordered


# ---------------------------------------------------------------------------------------------
# Interventions on the fusion streams
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def ablate(model, streams: list[str] | str, mode: str = "zero", mean_features: dict | None = None, seed: int = 0):
    """Replace fusion streams before DBFusion.

    zero  - all zeros;
    mean  - `mean_features[stream]` ((N,D) or (D,), e.g. a dataset mean from a feature store), or the
            mean over the current batch when not given;
    noise - Gaussian noise with the stream's per-channel mean and std (seeded).
    """
    streams = [streams] if isinstance(streams, str) else list(streams)
    unknown = [s for s in streams if s not in model.stream_hooks]
    if unknown:
        raise TapError(f"unknown stream(s) {unknown}; this model fuses {list(model.stream_hooks)}")
    if mode not in ("zero", "mean", "noise"):
        raise TapError(f"ablation mode {mode!r} is not zero, mean or noise")
    gen = torch.Generator().manual_seed(seed)

    def make_hook(stream: str):
        def hook(module, args, output):
            if mode == "zero":
                return torch.zeros_like(output)
            if mode == "mean":
                if mean_features is not None and stream in mean_features:
                    m = torch.as_tensor(mean_features[stream], dtype=output.dtype, device=output.device)
                    return m.expand_as(output).clone()
                return output.mean(dim=0, keepdim=True).expand_as(output).clone()
            mu = output.mean(dim=(0, 1), keepdim=True)
            sd = output.std(dim=(0, 1), keepdim=True)
            noise = torch.randn(output.shape, generator=gen, dtype=torch.float32).to(output)
            return mu + sd * noise
        return hook

    handles = [model.stream_hooks[s].register_forward_hook(make_hook(s)) for s in streams]
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def patch(model, stream: str, source_features: torch.Tensor):
    """Put another image's stream into this forward (e.g. image A's OCR stream into image B).

    `source_features` is (N, D) or (B, N, D) as captured with pool="none" from the same tap."""
    if stream not in model.stream_hooks:
        raise TapError(f"unknown stream {stream!r}; this model fuses {list(model.stream_hooks)}")

    def hook(module, args, output):
        src = torch.as_tensor(source_features).to(output)
        if src.dim() == 2:
            src = src.unsqueeze(0)
        if src.shape[1:] != output.shape[1:]:
            raise TapError(f"patch source for {stream!r} has shape {tuple(src.shape[1:])}, "
                           f"the stream has {tuple(output.shape[1:])}")
        return src.expand_as(output).clone()

    handle = model.stream_hooks[stream].register_forward_hook(hook)
    try:
        yield model
    finally:
        handle.remove()
