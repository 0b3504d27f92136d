"""Named taps on a Florence-VL model: capture features per depth and per prompt, and intervene on streams.

Tap vocabulary (derived from the model, so it holds for every preset and encoder):

  vision.stage{s}           (B, C_s, H_s, W_s)  DaViT/CvT stage s output (other encoders: their own stages)
  vision.block{j}           (B, C, H, W)        every DaViT block, numbered across stages
  vision.layer{i}           (B, T, C)           ViT-style encoders (CLIP)
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
import fnmatch
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

POOLS = ("none", "mean", "global", "grid")


class TapError(ValueError):
    """Unknown tap, bad pattern, or a tap that did not fire."""


@dataclass
class Tap:
    name: str
    module: nn.Module
    kind: str  # "map" (B,C,H,W), "tokens" (B,N,D) with optional global token, "seq" (B,T,H)
    prompt_index: int | None = None  # for prompt.{name}.layer{i}: which of the K batched prompts
    has_global: bool = True


def _unwrap(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def tap_table(model) -> dict[str, Tap]:
    """All taps of a model, in a stable order."""
    taps: dict[str, Tap] = {}
    vt = model.vision_tower
    for name, module in vt.tap_modules().items():
        kind = "seq" if name.startswith("vision.layer") else "map"
        taps[name] = Tap(name, module, kind)
    has_global = not model.config.drop_global_token
    taps["depth"] = Tap("depth", model.stream_hooks["depth"], "tokens", has_global=has_global)
    prompt_names = [n for n in model.stream_names if n != "depth"]
    layers = vt.encoder_layers() if hasattr(vt, "encoder_layers") else []
    for k, pname in enumerate(prompt_names):
        for i, layer in enumerate(layers):
            taps[f"prompt.{pname}.layer{i}"] = Tap(f"prompt.{pname}.layer{i}", layer, "tokens", prompt_index=k,
                                                   has_global=has_global)
        taps[f"prompt.{pname}"] = Tap(f"prompt.{pname}", model.stream_hooks[pname], "tokens", has_global=has_global)
    fusion_kind = "tokens" if model.config.fusion != "token" else "seq"
    taps["fusion.input"] = Tap("fusion.input", model.fusion.hook_input, fusion_kind, has_global=has_global)
    taps["fusion.output"] = Tap("fusion.output", model.mm_projector, fusion_kind, has_global=has_global)
    for i, layer in enumerate(llm_layers(model)):
        taps[f"llm.layer{i}"] = Tap(f"llm.layer{i}", layer, "seq")
    return taps


def llm_layers(model) -> list[nn.Module]:
    lm = model.language_model
    inner = getattr(lm, "model", lm)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise TapError(f"cannot find the decoder layers of {type(lm).__name__}; expected `.model.layers`")
    return list(layers)


def resolve(model, patterns: list[str] | str) -> list[str]:
    """Expand glob patterns ("prompt.*", "vision.stage*", "all") into tap names; unknown names are errors."""
    table = tap_table(model)
    if isinstance(patterns, str):
        patterns = [p.strip() for p in patterns.split(",") if p.strip()]
    names: list[str] = []
    for pattern in patterns:
        if pattern == "all":
            matched = list(table)
        elif pattern == "default":
            matched = default_taps(model)
        else:
            base = re.sub(r"\[.*\]$", "", pattern)
            matched = [n for n in table if fnmatch.fnmatchcase(n, base)]
        if not matched:
            close = [n for n in table if n.split(".")[0] == pattern.split(".")[0]][:8]
            raise TapError(f"tap {pattern!r} matches nothing; known taps include {close or list(table)[:8]} "
                           "(list them all with `fvl taps --preset NAME`)")
        names += [m for m in matched if m not in names]
    return names


def default_taps(model) -> list[str]:
    """The taps captured by default: stages, depth, per-prompt last and per-layer states, fusion output."""
    table = tap_table(model)
    return [n for n in table if n.startswith("vision.stage") or n in ("depth", "fusion.output")
            or (n.startswith("prompt.") )]


def parse_pool(pool: str) -> tuple[str, int]:
    if pool in ("none", "mean", "global"):
        return pool, 0
    m = re.fullmatch(r"grid(\d+)", pool)
    if m and int(m.group(1)) > 0:
        return "grid", int(m.group(1))
    raise TapError(f"pool {pool!r} is not one of none, mean, global, grid<k> (e.g. grid4)")


def pool_tensor(x: torch.Tensor, kind: str, pool: str, has_global: bool = True,
                mask: torch.Tensor | None = None) -> torch.Tensor:
    """Pool one tap's batch at capture time.

    maps (B,C,H,W): mean -> (B,C); global -> (B,C) (maps have no global token: same as mean);
      grid{k} -> (B, k*k, C).
    tokens (B,N,D) with a global token first: mean over patch tokens -> (B,D); global -> token 0;
      grid{k} -> patch tokens as an h x w map, averaged to (B, k*k, D).
    seq (B,T,H): mean over valid positions (mask) -> (B,H); global -> first position; grid not defined.
    """
    mode, k = parse_pool(pool)
    if mode == "none":
        return x
    if kind == "map":
        if mode in ("mean", "global"):
            return x.mean(dim=(2, 3))
        return F.adaptive_avg_pool2d(x, k).flatten(2).transpose(1, 2)
    if kind == "tokens":
        patches = x[:, 1:] if has_global else x
        if mode == "mean":
            return patches.mean(dim=1)
        if mode == "global":
            return x[:, 0] if has_global else patches.mean(dim=1)
        side = int(round(patches.shape[1] ** 0.5))
        if side * side != patches.shape[1]:
            raise TapError(f"grid pooling needs a square token map; got {patches.shape[1]} patch tokens")
        grid = patches.transpose(1, 2).reshape(x.shape[0], x.shape[2], side, side)
        return F.adaptive_avg_pool2d(grid, k).flatten(2).transpose(1, 2)
    if mode == "mean":
        if mask is not None and mask.shape[:2] == x.shape[:2]:
            m = mask.to(x.dtype).unsqueeze(-1)
            return (x * m).sum(1) / m.sum(1).clamp_min(1)
        return x.mean(dim=1)
    if mode == "global":
        return x[:, 0]
    raise TapError("grid pooling is defined for spatial taps only (vision.*, depth, prompt.*, fusion.*)")


class Cache(dict):
    """tap name -> captured tensor (the first call); `steps(name)` gives every call (generate steps)."""

    def __init__(self):
        super().__init__()
        self._steps: dict[str, list[torch.Tensor]] = {}

    def steps(self, name: str) -> list[torch.Tensor]:
        return self._steps.get(name, [])


@contextlib.contextmanager
def capture(model, taps: list[str] | str = "default", pool: str = "none", device: str | torch.device = "cpu",
            dtype: torch.dtype | None = None, attention_mask: torch.Tensor | None = None):
    """Record the named taps during any forward or `generate()` call inside the block."""
    names = resolve(model, taps)
    parse_pool(pool)
    table = tap_table(model)
    cache = Cache()
    handles = []
    vt = model.vision_tower

    def make_hook(tap: Tap):
        def hook(module, args, output):
            x = _unwrap(output).detach()
            if tap.prompt_index is not None:
                bsz, k, n_img = vt.layout
                x = x.reshape(bsz, k, x.shape[1], x.shape[2])[:, tap.prompt_index, :n_img]
                if getattr(vt, "drop_global_token", False):
                    x = x[:, 1:]
            mask = attention_mask if tap.kind == "seq" and tap.name.startswith("llm.") else None
            x = pool_tensor(x, tap.kind, pool, tap.has_global, mask)
            if x.device.type != "meta":
                x = x.to(device=device, dtype=dtype or x.dtype)
            cache._steps.setdefault(tap.name, []).append(x)
            if tap.name not in cache:
                dict.__setitem__(cache, tap.name, x)
        return hook

    # Several taps can share a module (the BART layers serve every prompt): one hook each is fine.
    for name in names:
        handles.append(table[name].module.register_forward_hook(make_hook(table[name])))
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
    """Per-stream channel slices of `fusion.input` (only for channel fusion)."""
    if model.config.fusion != "channel":
        return {}
    return model.fusion.stream_slices(model.config.stream_width)


def tap_shapes(model, image_size: int | None = None, with_llm: bool = True) -> dict[str, tuple]:
    """Shapes of every tap for one image (batch 1), found by running the model once.

    Works on the meta device too, so real-size presets are listed without allocating memory."""
    size = image_size or model.config.image_size
    param = next(model.parameters())
    if param.device.type == "meta":
        return _analytic_shapes(model, size, with_llm)
    px = torch.zeros(1, 3, size, size, device=param.device, dtype=param.dtype)
    n_img = model.config.num_image_tokens(size)
    ids = torch.full((1, n_img + 4), model.config.image_token_id, dtype=torch.long, device=param.device)
    ids[0, -4:] = 1
    names = list(tap_table(model)) if with_llm else [n for n in tap_table(model) if not n.startswith("llm.")]
    with torch.no_grad(), capture(model, names, pool="none") as cache:
        if with_llm:
            model(input_ids=ids, pixel_values=px)
        else:
            model.get_image_features(px)
    return {n: tuple(cache[n].shape) for n in names}


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
