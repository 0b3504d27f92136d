"""Attributions with captum: which pixels, and which fusion streams, a Florence-VL answer rests on.

Targets (a scalar per image, differentiable in the pixels; defined in `probes.targets`, re-exported here):
  * `AnswerScore` - the logit of the answer's first token given the question (default), or the
    teacher-forced log-likelihood of the whole answer, via the full Florence-VL forward;
  * `ProbeScore` - a fitted probe's logit on a pooled tap (e.g. a `probes.estimator.LinearProbe` on
    `prompt.ocr`, read through `workbench.taps.capture(..., detach=False)`).

Methods:
  * `pixel_attribution(..., method="ig")` - integrated gradients on the pixels; the completeness
    delta ``sum(attr) - (F(x) - F(baseline))`` comes with every result;
  * `pixel_attribution(..., method="occlusion")` - a sliding patch set to the baseline (no
    completeness property, so no delta);
  * `stream_attribution` - layer integrated gradients at `model.fusion.hook_input` (the DBFusion
    input), |attributions| summed over each stream's channel slice (`model.tokens.stream_slices`):
    the share of the answer carried by depth, caption, ocr and grounding.

Stream attribution runs the vision tower once: the streams are computed, then captum integrates
along the path from the baseline streams to the image's streams through fusion, projector and LLM
only. With the default zero baseline a stream that is ablated to zero (`workbench.taps.ablate`)
gets exactly zero share, because its input equals its baseline (IG is (x - x') times an averaged
gradient). `baseline="image"` instead integrates from a baseline image through the whole model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from model.processing import IMAGENET_MEAN, IMAGENET_STD
from model.tokens import stream_slices as channel_slices
from probes.targets import (AnswerScore, AttributionError, ProbeScore, _param, linear_probe,  # noqa: F401 (re-exported)
                            probe_from_store)


# --------------------------------------------------------------------------- results
def _top_pixels(heat: np.ndarray, k: int, orig_size: tuple[int, int] | None) -> list[dict[str, Any]]:
    flat = np.abs(heat).ravel()
    k = min(k, flat.size)
    idx = np.argpartition(-flat, k - 1)[:k]
    idx = idx[np.argsort(-flat[idx])]
    h, w = heat.shape
    out = []
    for i in idx:
        y, x = divmod(int(i), w)
        row = {"x": x, "y": y, "value": float(heat[y, x])}
        if orig_size is not None:
            ow, oh = orig_size
            row["orig_x"], row["orig_y"] = int((x + 0.5) * ow / w), int((y + 0.5) * oh / h)
        out.append(row)
    return out


def to_display_image(pixel_values: torch.Tensor) -> np.ndarray:
    """Undo the processor's normalisation: (1|3, H, W) tensor -> (H, W, 3) uint8 as the model saw it."""
    x = pixel_values.detach().float().cpu()
    x = x[0] if x.dim() == 4 else x
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return ((x * std + mean).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


@dataclass
class PixelAttribution:
    method: str
    attributions: np.ndarray  # (3, H, W)
    heat: np.ndarray  # (H, W): attributions summed over colour channels
    output: float  # F(x)
    baseline_output: float  # F(baseline)
    delta: float | None  # completeness delta (IG); None for occlusion
    target: dict[str, Any]
    settings: dict[str, Any] = field(default_factory=dict)
    image: np.ndarray | None = None  # (H, W, 3) uint8, the model's input
    orig_size: tuple[int, int] | None = None

    @property
    def relative_delta(self) -> float | None:
        if self.delta is None:
            return None
        return abs(self.delta) / max(abs(self.output - self.baseline_output), 1e-12)

    def top_pixels(self, k: int = 10) -> list[dict[str, Any]]:
        return _top_pixels(self.heat, k, self.orig_size)

    def to_dict(self, top_k: int = 10) -> dict[str, Any]:
        return {"method": self.method, "target": self.target, "output": self.output,
                "baseline_output": self.baseline_output, "output_difference": self.output - self.baseline_output,
                "attribution_sum": float(self.attributions.sum()), "delta": self.delta,
                "relative_delta": self.relative_delta,
                "completeness": "sum(attr) - (F(x) - F(baseline))" if self.delta is not None
                else "not defined for occlusion", "settings": self.settings, "top_pixels": self.top_pixels(top_k)}


@dataclass
class StreamAttribution:
    streams: list[str]
    shares: dict[str, float]  # sum |attr| over the stream's slice / total; non-negative, sums to 1
    signed: dict[str, float]  # sum attr over the stream's slice; these add up to F(x) - F(b) - delta
    token_maps: dict[str, np.ndarray]  # (N,) sum |attr| per image token, per stream
    output: float
    baseline_output: float
    delta: float
    target: dict[str, Any]
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def relative_delta(self) -> float:
        return abs(self.delta) / max(abs(self.output - self.baseline_output), 1e-12)

    def to_dict(self, maps: bool = False) -> dict[str, Any]:
        d = {"streams": self.streams, "shares": self.shares, "signed": self.signed, "output": self.output,
             "baseline_output": self.baseline_output, "output_difference": self.output - self.baseline_output,
             "delta": self.delta, "relative_delta": self.relative_delta, "target": self.target,
             "settings": self.settings}
        if maps:
            d["token_maps"] = {k: [float(x) for x in v] for k, v in self.token_maps.items()}
        return d


# --------------------------------------------------------------------------- pixels
def _pixel_baseline(baseline: str | float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """'mean': zeros in normalised space (the ImageNet mean colour); 'black': pixel value 0;
    a float (normalised value) or a tensor shaped like the input."""
    if isinstance(baseline, torch.Tensor):
        if baseline.shape[-3:] != like.shape[-3:]:
            raise AttributionError(f"baseline shape {tuple(baseline.shape)} does not match the image {tuple(like.shape)}")
        return baseline.to(like).expand_as(like).clone()
    if isinstance(baseline, (int, float)):
        return torch.full_like(like, float(baseline))
    if baseline == "mean":
        return torch.zeros_like(like)
    if baseline == "black":
        mean = torch.tensor(IMAGENET_MEAN, dtype=like.dtype, device=like.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, dtype=like.dtype, device=like.device).view(1, 3, 1, 1)
        return ((0 - mean) / std).expand_as(like).clone()
    raise AttributionError(f"pixel baseline {baseline!r} is not 'mean', 'black', a number or a tensor")


def pixel_attribution(model, pixel_values: torch.Tensor, score_fn: Callable[[torch.Tensor], torch.Tensor], *,
                      method: str = "ig", steps: int = 32, baseline: str | float | torch.Tensor = "black",
                      internal_batch_size: int = 8, window: int | None = None, stride: int | None = None,
                      orig_size: tuple[int, int] | None = None) -> PixelAttribution:
    """Attribute `score_fn(pixel_values)` (one image, (1, 3, H, W)) to the pixels.

    The default baseline is a black image. The mean-colour baseline (all zeros after normalisation)
    is offered but is a poor path start for DaViT: the straight path from zero is a rescaling of the
    image, to which the LayerNorm after the first patch embedding is nearly blind, so the score jumps
    right next to the baseline and the integral (and its delta) do not converge with more steps.

    method "ig": captum IntegratedGradients (Gauss-Legendre, `steps` points, `internal_batch_size`
    images per forward), with the completeness delta. method "occlusion": captum Occlusion with a
    `window` x `window` patch (default side/8) moved by `stride` (default window/2), replaced by
    the baseline; attributions are F(x) - F(occluded) spread over each patch.
    """
    from captum.attr import IntegratedGradients, Occlusion

    if pixel_values.dim() != 4 or pixel_values.shape[0] != 1:
        raise AttributionError(f"pass one image as (1, 3, H, W); got {tuple(pixel_values.shape)}")
    p = _param(model)
    x = pixel_values.to(device=p.device, dtype=p.dtype)
    base = _pixel_baseline(baseline, x)
    with torch.no_grad():
        f_x, f_b = float(score_fn(x)[0]), float(score_fn(base)[0])
    settings: dict[str, Any] = {"baseline": baseline if isinstance(baseline, (str, int, float)) else "tensor"}
    if method == "ig":
        if steps < 2:
            raise AttributionError(f"--steps {steps}: integrated gradients needs at least 2 steps")
        ig = IntegratedGradients(score_fn)
        attr, delta = ig.attribute(x, baselines=base, n_steps=steps, internal_batch_size=internal_batch_size,
                                   return_convergence_delta=True)
        delta_v: float | None = float(delta.sum())
        settings.update(steps=steps, internal_batch_size=internal_batch_size, integration="gausslegendre")
    elif method == "occlusion":
        side = x.shape[-1]
        window = window or max(2, side // 8)
        stride = stride or max(1, window // 2)
        if window > side:
            raise AttributionError(f"occlusion window {window} is larger than the image ({side} px)")
        with torch.no_grad():
            attr = Occlusion(score_fn).attribute(x, sliding_window_shapes=(3, window, window), strides=(3, stride, stride),
                                                 baselines=base, perturbations_per_eval=internal_batch_size)
        delta_v = None
        settings.update(window=window, stride=stride)
    else:
        raise AttributionError(f"method {method!r} is not 'ig' or 'occlusion'")
    a = attr.detach().float().cpu().numpy()[0]
    target = score_fn.describe() if hasattr(score_fn, "describe") else {"kind": "custom"}
    return PixelAttribution(method, a, a.sum(0), f_x, f_b, delta_v, target, settings, to_display_image(x), orig_size)


# --------------------------------------------------------------------------- streams
def stream_slices(model) -> dict[str, tuple[int, int, int]]:
    """stream -> (dim, start, stop) of its part of `fusion.input`: channels for channel concat
    (`model.tokens.stream_slices`), token ranges for token concat. Averaging mixes the streams
    into one tensor, so it has no per-stream slice."""
    fusion = model.config.fusion
    if fusion == "channel":
        channels = channel_slices(list(model.stream_names), model.config.stream_width)
        return {k: (-1, a, b) for k, (a, b) in channels.items()}
    if fusion == "token":
        n = model.config.num_image_tokens() // len(model.stream_names)
        return {k: (1, i * n, (i + 1) * n) for i, k in enumerate(model.stream_names)}
    raise AttributionError("stream attribution needs channel or token fusion; with fusion='average' the streams "
                           "are summed before the projector and cannot be told apart at its input")


def stream_attribution(model, pixel_values: torch.Tensor, score: AnswerScore, *, steps: int = 64,
                       baseline: str = "zero", mean_features: Mapping[str, Any] | None = None,
                       pixel_baseline: str | float | torch.Tensor = "black",
                       internal_batch_size: int = 8) -> StreamAttribution:
    """Share of each fusion stream in `score` for one image (captum LayerIntegratedGradients on
    `model.fusion.hook_input`).

    baseline "zero": every stream integrates from zeros (the `ablate(mode="zero")` reference);
    "mean": from `mean_features[stream]` ((N, D) or (D,), e.g. a data-set mean), or, when not
    given, from the stream's own mean over tokens (keeps the stream's average, removes where things
    are); "image": from `pixel_baseline` pushed through the whole model (the vision tower runs per
    step). Streams are computed by `model.image_streams`, so `ablate`/`patch` contexts apply.
    From zero streams the path passes near all-zero image tokens, where the LLM's RMSNorm is steep
    (exactly so for a projector with zero biases, as at initialisation): use 64+ steps and check
    `relative_delta`. (One function: the three baselines differ only in how the path starts; the
    per-stream slicing of the attributions after it is shared.)
    """
    from captum.attr import LayerIntegratedGradients

    if pixel_values.dim() != 4 or pixel_values.shape[0] != 1:
        raise AttributionError(f"pass one image as (1, 3, H, W); got {tuple(pixel_values.shape)}")
    if steps < 2:
        raise AttributionError(f"--steps {steps}: integrated gradients needs at least 2 steps")
    slices = stream_slices(model)
    names = list(model.stream_names)
    p = _param(model)
    x = pixel_values.to(device=p.device, dtype=p.dtype)
    layer = model.fusion.hook_input
    settings: dict[str, Any] = {"method": "layer_integrated_gradients", "layer": "fusion.input", "steps": steps,
                                "baseline": baseline, "internal_batch_size": internal_batch_size}
    if baseline == "image":
        base_px = _pixel_baseline(pixel_baseline, x)
        lig = LayerIntegratedGradients(score, layer)
        attr, delta = lig.attribute(x, baselines=base_px, n_steps=steps, internal_batch_size=internal_batch_size,
                                    return_convergence_delta=True)
        with torch.no_grad():
            f_x, f_b = float(score(x)[0]), float(score(base_px)[0])
    else:
        with torch.no_grad():
            streams = model.image_streams(x)
        inputs = tuple(streams[n].detach() for n in names)
        if baseline == "zero":
            bases = tuple(torch.zeros_like(s) for s in inputs)
        elif baseline == "mean":
            bases = []
            for n, s in zip(names, inputs):
                if mean_features is not None and n in mean_features:
                    bases.append(torch.as_tensor(mean_features[n]).to(s).expand_as(s).clone())
                else:
                    bases.append(s.mean(dim=1, keepdim=True).expand_as(s).clone())
            bases = tuple(bases)
        else:
            raise AttributionError(f"stream baseline {baseline!r} is not 'zero', 'mean' or 'image'")
        lig = LayerIntegratedGradients(score.from_streams, layer)
        attr, delta = lig.attribute(inputs, baselines=bases, n_steps=steps, internal_batch_size=internal_batch_size,
                                    return_convergence_delta=True)
        with torch.no_grad():
            f_x, f_b = float(score.from_streams(*inputs)[0]), float(score.from_streams(*bases)[0])
    a = attr.detach().double()[0]  # (N, C) for channel fusion, (K*N, D) for token fusion
    mags, signed, maps = {}, {}, {}
    for n in names:
        dim, lo, hi = slices[n]
        part = a[..., lo:hi] if dim == -1 else a[lo:hi]
        mags[n] = float(part.abs().sum())
        signed[n] = float(part.sum())
        maps[n] = part.abs().sum(-1).cpu().numpy()
    total = sum(mags.values())
    shares = {n: (mags[n] / total if total > 0 else 0.0) for n in names}
    if total == 0:
        settings["note"] = "all attributions are zero (the score does not depend on the streams along this path)"
    return StreamAttribution(names, shares, signed, maps, f_x, f_b, float(delta.sum()), score.describe(), settings)


def token_grid(values: np.ndarray, has_global: bool = True) -> np.ndarray:
    """(N,) per-token values -> (h, w) patch grid (global token dropped) for overlays."""
    v = np.asarray(values)
    patches = v[1:] if has_global and int(round(math.sqrt(len(v) - 1))) ** 2 == len(v) - 1 else v
    side = int(round(math.sqrt(len(patches))))
    if side * side != len(patches):
        raise AttributionError(f"{len(patches)} tokens do not form a square grid")
    return patches.reshape(side, side)


def attribute_answer(model, processor, image: Any, question: str, answer: str, *, method: str = "ig",
                     steps: int = 32, stream_steps: int = 64, score: str = "logit", pixel_baseline: str | float = "black",
                     stream_baseline: str = "zero", internal_batch_size: int = 8, streams: bool = True,
                     window: int | None = None, stride: int | None = None) -> dict[str, Any]:
    """Pixels and streams for one (image, question, answer): {"pixels": PixelAttribution,
    "streams": StreamAttribution | None}."""
    from workbench.data.images import load_image

    img = load_image(image)
    px = processor.images([img])
    target = AnswerScore(model, processor, question, answer, score=score)
    pixels = pixel_attribution(model, px, target, method=method, steps=steps, baseline=pixel_baseline,
                               internal_batch_size=internal_batch_size, window=window, stride=stride,
                               orig_size=tuple(img.size))
    by_stream = None
    if streams and model.config.encoder_type == "florence2" and model.config.fusion in ("channel", "token"):
        by_stream = stream_attribution(model, px, target, steps=stream_steps, baseline=stream_baseline,
                                       pixel_baseline=pixel_baseline, internal_batch_size=internal_batch_size)
    return {"pixels": pixels, "streams": by_stream}


def plot_attribution(pixels: PixelAttribution, streams: StreamAttribution | None = None, path: Any = None,
                     has_global: bool = True):
    """One figure: the model's input image, |pixel attribution| over it, the stream shares and each
    stream's per-token |attribution| map. Saved as PNG when `path` is given; returns the figure.
    Agg canvas, no pyplot. (Kept here: probes.plots' `plot_attribution_overlay` draws one overlay;
    this puts pixels, stream shares and per-stream token maps side by side.)"""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from probes.plots import save

    n_maps = len(streams.streams) if streams is not None else 0
    cols = 2 + (1 if streams is not None else 0) + n_maps
    fig = Figure(figsize=(2.6 * cols, 3.0), layout="constrained")
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(1, cols))
    img = pixels.image if pixels.image is not None else np.zeros((*pixels.heat.shape, 3), np.uint8)
    axes[0].imshow(img)
    axes[0].set_title("input", fontsize=9)
    heat = np.abs(pixels.heat)
    heat = heat / heat.max() if heat.max() > 0 else heat
    axes[1].imshow(img)
    axes[1].imshow(heat, cmap="inferno", alpha=0.6)
    delta = "" if pixels.delta is None else f"\nrel. delta {pixels.relative_delta:.1e}"
    axes[1].set_title(f"|{pixels.method}| on pixels{delta}", fontsize=9)
    if streams is not None:
        ax = axes[2]
        ax.bar(range(len(streams.streams)), [streams.shares[s] for s in streams.streams], color="tab:blue")
        ax.set_xticks(range(len(streams.streams)), streams.streams, rotation=30, fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_title(f"stream shares\nrel. delta {streams.relative_delta:.1e}", fontsize=9)
        vmax = max(float(m.max()) for m in streams.token_maps.values()) or 1.0
        for k, s in enumerate(streams.streams):
            ax = axes[3 + k]
            try:
                ax.imshow(token_grid(streams.token_maps[s], has_global), cmap="viridis", vmin=0, vmax=vmax)
            except AttributionError:  # token concat / unusual layouts: show the raw token profile
                ax.plot(streams.token_maps[s])
            ax.set_title(f"{s} per token", fontsize=9)
    for ax in axes:
        if ax.images:
            ax.set_xticks([])
            ax.set_yticks([])
    t = pixels.target
    if t.get("kind") == "answer":
        fig.suptitle(f"{t['score']} of {t['first_token']!r} for answer {t['answer']!r}", fontsize=10)
    elif t.get("kind") == "probe":
        what = f" = {t['class']!r}" if t.get("class") is not None else ""
        fig.suptitle(f"probe logit on {t['tap']} ({t.get('label', 'probe')}{what})", fontsize=10)
    if path is not None:
        save(fig, path, dpi=110)
    return fig


__all__: Sequence[str] = [
    "AnswerScore", "AttributionError", "PixelAttribution", "ProbeScore", "StreamAttribution", "attribute_answer",
    "linear_probe", "pixel_attribution", "plot_attribution", "probe_from_store", "stream_attribution",
    "stream_slices", "to_display_image", "token_grid",
]
