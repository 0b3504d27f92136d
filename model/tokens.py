"""Token-map geometry shared by capture, the probes and the encoders: pooling, the per-stream channel
slices of the fusion input, and the per-prompt view of the batched BART encoder.

One implementation, so that a feature pooled at capture time and a stored token map pooled later by an
analysis are the same numbers.

Kinds of feature:
  ``map``     (B, C, H, W)  a spatial map (DaViT / CvT stages and blocks)
  ``tokens``  (B, N, D)     image tokens, the global token first when ``has_global`` (depth, prompt.*, fusion.*)
  ``seq``     (B, T, H)     a sequence (ViT hidden states with their CLS token, LLM hidden states)
"""
from __future__ import annotations

import re

import numpy as np
import torch
import torch.nn.functional as F

POOLS = ("none", "mean", "global", "grid")
KINDS = ("map", "tokens", "seq")


class PoolError(ValueError):
    """An unknown pooling name, or a pooling that is not defined for this kind of feature."""


def parse_pool(pool: str) -> tuple[str, int]:
    """'none' | 'mean' | 'global' | 'grid{k}' -> (mode, k); k is 0 except for grid."""
    if pool in ("none", "mean", "global"):
        return pool, 0
    m = re.fullmatch(r"grid(\d+)", str(pool))
    if m and int(m.group(1)) > 0:
        return "grid", int(m.group(1))
    raise PoolError(f"pool {pool!r} is not one of none, mean, global, grid<k> (e.g. grid4)")


def pool_features(x: torch.Tensor, kind: str, pool: str, has_global: bool = True,
                  mask: torch.Tensor | None = None) -> torch.Tensor:
    """Pool one batch of one feature.

    map (B,C,H,W): mean -> (B,C); global -> (B,C) (a map has no global token: the mean);
      grid{k} -> (B, k*k, C).
    tokens (B,N,D): mean over the patch tokens (the global token left out) -> (B,D); global -> token 0
      (the patch mean when there is none); grid{k} -> the patch tokens as a square map, averaged to (B, k*k, D).
    seq (B,T,H): mean over the valid positions of ``mask`` -> (B,H); global -> the first position.
    """
    mode, k = parse_pool(pool)
    if mode == "none":
        return x
    if kind == "map":
        if mode in ("mean", "global"):
            return x.mean(dim=(2, 3))
        return F.adaptive_avg_pool2d(x, k).flatten(2).transpose(1, 2)
    if kind == "tokens":
        patches = x[:, 1:] if has_global and x.shape[1] > 1 else x
        if mode == "mean":
            return patches.mean(dim=1)
        if mode == "global":
            return x[:, 0] if has_global else patches.mean(dim=1)
        return F.adaptive_avg_pool2d(tokens_to_map(patches), k).flatten(2).transpose(1, 2)
    if kind != "seq":
        raise PoolError(f"unknown feature kind {kind!r}; expected one of {KINDS}")
    if mode == "mean":
        if mask is not None and mask.shape[:2] == x.shape[:2]:
            m = mask.to(x.dtype).unsqueeze(-1)
            return (x * m).sum(1) / m.sum(1).clamp_min(1)
        return x.mean(dim=1)
    if mode == "global":
        return x[:, 0]
    raise PoolError("grid pooling is defined for spatial features only (vision.*, depth, prompt.*, fusion.*)")


def tokens_to_map(patches: torch.Tensor) -> torch.Tensor:
    """(B, h*w, D) patch tokens, row-major -> (B, D, h, w); the token count must be a square."""
    side = int(round(patches.shape[1] ** 0.5))
    if side * side != patches.shape[1]:
        raise PoolError(f"a square token map is needed here; got {patches.shape[1]} patch tokens")
    return patches.transpose(1, 2).reshape(patches.shape[0], patches.shape[2], side, side)


def kind_of_stored(shape: tuple[int, ...]) -> str:
    """The kind of a stored per-item feature from its shape (without the item axis)."""
    return {1: "vector", 2: "tokens", 3: "map"}.get(len(shape), "unknown")


def to_vectors(x: np.ndarray | torch.Tensor, has_global: bool = True, how: str = "mean") -> np.ndarray:
    """Stored features of n items -> (n, d) float32 for an analysis, pooled as at capture time.

    (n, d) stays; (n, N, D) token maps pool with ``how`` ('mean' over patch tokens, 'global' = token 0);
    (n, C, H, W) maps average over H, W. ``has_global`` says whether token 0 is a global token (the
    store's manifest records it per tap; grid-pooled taps have none)."""
    t = torch.as_tensor(np.asarray(x))
    if t.ndim == 2:
        return t.float().numpy()
    if t.ndim == 3:
        kind = "tokens"
    elif t.ndim == 4:
        kind = "map"
    else:
        raise PoolError(f"features of shape {tuple(t.shape)} cannot be pooled; expected (n, d), (n, N, D) "
                        "or (n, C, H, W)")
    if how not in ("mean", "global"):
        raise PoolError(f"pool {how!r} cannot make vectors; use 'mean' or 'global'")
    return pool_features(t.float(), kind, how, has_global=has_global).numpy()


def stream_slices(stream_names: list[str] | tuple[str, ...], width: int) -> dict[str, tuple[int, int]]:
    """Channel range of each stream inside the channel-fused input: streams are concatenated in order,
    each ``width`` channels wide (DBFusion's channel integration)."""
    return {name: (i * width, (i + 1) * width) for i, name in enumerate(stream_names)}


def split_prompts(hidden: torch.Tensor, n_prompts: int, n_image: int) -> torch.Tensor:
    """The batched BART encoder runs every image under every prompt as rows ``b * K + k``; this gives the
    image positions of those rows as (B, K, n_image, D)."""
    rows, length, dim = hidden.shape
    return hidden.reshape(rows // n_prompts, n_prompts, length, dim)[:, :, :n_image]
