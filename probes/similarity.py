"""Representation similarity: linear CKA, and per-patch differences between prompt streams.

Linear CKA (Kornblith et al. 2019) compares two representations of the SAME n inputs,
X (n, d1) and Y (n, d2), after centring each feature:

    CKA = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)

It is 1 for identical representations and invariant to orthogonal transforms and isotropic
scaling of either side (not to arbitrary invertible linear maps). The plain (biased) estimate
is inflated for small n relative to d; the debiased variant uses the unbiased HSIC estimator
(Song et al. 2012; Nguyen et al. 2021) and ``minibatch_cka`` averages unbiased HSIC over
minibatches so huge n never needs an n x n Gram matrix.

Difference maps: Florence-VL runs the same image tokens through the encoder under different
prompts (caption / ocr / grounding); the per-patch cosine similarity between two streams shows
WHERE a prompt changes the features.
"""
from __future__ import annotations

import math
from typing import Mapping

import numpy as np


def _as2d(x, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2:
        raise ValueError(f"{name}: expected (n, d) features, got shape {a.shape}; pool or reshape token maps first")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name}: contains NaN or inf")
    return a


def _hsic_unbiased(K: np.ndarray, L: np.ndarray) -> float:
    """Unbiased HSIC estimator (Song et al. 2012) of two n x n Gram matrices (n > 3)."""
    n = K.shape[0]
    K = K.copy()
    L = L.copy()
    np.fill_diagonal(K, 0.0)
    np.fill_diagonal(L, 0.0)
    ones_K = K.sum(0)
    ones_L = L.sum(0)
    term = (K * L).sum() + ones_K.sum() * ones_L.sum() / ((n - 1) * (n - 2)) - 2.0 * (ones_K @ ones_L) / (n - 2)
    return float(term / (n * (n - 3)))


def cka(X, Y, debiased: bool = False) -> float:
    """Linear CKA between X (n, d1) and Y (n, d2) (rows are the same inputs)."""
    X = _as2d(X, "X")
    Y = _as2d(Y, "Y")
    if X.shape[0] != Y.shape[0]:
        raise ValueError(f"X has {X.shape[0]} rows and Y {Y.shape[0]}; CKA compares the same inputs, pass aligned rows")
    n = X.shape[0]
    if n < 2 or (debiased and n < 4):
        raise ValueError(f"CKA needs at least {4 if debiased else 2} rows, got {n}")
    X = X - X.mean(0)
    Y = Y - Y.mean(0)
    if debiased:
        return _ratio(*(_hsic_unbiased(a, b) for a, b in ((X @ X.T, Y @ Y.T), (X @ X.T, X @ X.T), (Y @ Y.T, Y @ Y.T))))
    if n < max(X.shape[1], Y.shape[1]):  # Gram form is cheaper when n is small
        Kx, Ky = X @ X.T, Y @ Y.T
        return _ratio(float((Kx * Ky).sum()), float((Kx * Kx).sum()), float((Ky * Ky).sum()))
    xy = float(np.linalg.norm(Y.T @ X) ** 2)
    xx = float(np.linalg.norm(X.T @ X) ** 2)
    yy = float(np.linalg.norm(Y.T @ Y) ** 2)
    return _ratio(xy, xx, yy)


linear_cka = cka


def _ratio(xy: float, xx: float, yy: float) -> float:
    denom = math.sqrt(max(xx, 0.0) * max(yy, 0.0))
    if denom <= 0.0:
        return float("nan")  # a constant representation has no similarity structure
    return xy / denom


def minibatch_cka(X, Y, batch_size: int = 256, seed: int = 0, epochs: int = 1) -> float:
    """Debiased linear CKA accumulated over random minibatches (Nguyen et al. 2021): the
    unbiased HSIC terms are averaged across batches before the ratio, so memory is
    O(batch_size^2) whatever n is. Rows left over after the last full batch are dropped."""
    X = _as2d(X, "X")
    Y = _as2d(Y, "Y")
    if X.shape[0] != Y.shape[0]:
        raise ValueError(f"X has {X.shape[0]} rows and Y {Y.shape[0]}; pass aligned rows")
    if batch_size < 4 or X.shape[0] < batch_size:
        raise ValueError(f"batch_size={batch_size} must be >= 4 and <= n={X.shape[0]}")
    rng = np.random.default_rng(seed)
    xy = xx = yy = 0.0
    count = 0
    for _ in range(epochs):
        perm = rng.permutation(X.shape[0])
        for i in range(0, X.shape[0] - batch_size + 1, batch_size):
            idx = perm[i:i + batch_size]
            a = X[idx] - X[idx].mean(0)
            b = Y[idx] - Y[idx].mean(0)
            K, L = a @ a.T, b @ b.T
            xy += _hsic_unbiased(K, L)
            xx += _hsic_unbiased(K, K)
            yy += _hsic_unbiased(L, L)
            count += 1
    return _ratio(xy / count, xx / count, yy / count)


def cka_matrix(reps: Mapping[str, np.ndarray], debiased: bool = False) -> tuple[list[str], np.ndarray]:
    """Pairwise linear CKA between named representations of the same n inputs.

    Each centred Gram matrix is computed once (n x n), so m representations cost m Gram
    matrices plus m^2 elementwise products; for very large n use ``minibatch_cka`` pairwise."""
    names = list(reps)
    if not names:
        raise ValueError("reps: give at least one representation {name: (n, d) array}")
    mats = [_as2d(reps[nm], f"reps[{nm!r}]") for nm in names]
    n = mats[0].shape[0]
    for nm, m in zip(names, mats):
        if m.shape[0] != n:
            raise ValueError(f"reps[{nm!r}] has {m.shape[0]} rows, expected {n} (the same inputs for every representation)")
    if n < (4 if debiased else 2):
        raise ValueError(f"CKA needs at least {4 if debiased else 2} rows, got {n}")
    grams = []
    for m in mats:
        c = m - m.mean(0)
        K = c @ c.T
        if debiased:
            np.fill_diagonal(K, 0.0)
        grams.append(K)
    k = len(names)
    hs = np.zeros((k, k))
    for i in range(k):
        for j in range(i, k):
            if debiased:
                Ki, Kj = grams[i], grams[j]
                si, sj = Ki.sum(0), Kj.sum(0)
                v = ((Ki * Kj).sum() + si.sum() * sj.sum() / ((n - 1) * (n - 2)) - 2.0 * (si @ sj) / (n - 2)) / (n * (n - 3))
            else:
                v = (grams[i] * grams[j]).sum()
            hs[i, j] = hs[j, i] = v
    d = np.sqrt(np.clip(np.diag(hs), 0.0, None))
    with np.errstate(invalid="ignore", divide="ignore"):
        out = hs / np.outer(d, d)
    return names, out


# --------------------------------------------------------------------------- token maps
def split_global(tokens, grid: tuple[int, int] | None = None) -> tuple[np.ndarray | None, np.ndarray]:
    """Token map (..., N, D) -> (global token (..., D) or None, patches (..., h, w, D)).

    N = h*w + 1 means token 0 is the global token (Florence-VL's depth features put it first);
    N = h*w means all tokens are patches. Without ``grid`` the map is taken as square."""
    t = np.asarray(tokens)
    if t.ndim < 2:
        raise ValueError(f"tokens: expected (N, D) or (B, N, D), got shape {t.shape}")
    N = t.shape[-2]
    if grid is not None:
        h, w = grid
        if N == h * w:
            return None, t.reshape(*t.shape[:-2], h, w, t.shape[-1])
        if N == h * w + 1:
            return t[..., 0, :], t[..., 1:, :].reshape(*t.shape[:-2], h, w, t.shape[-1])
        raise ValueError(f"tokens: {N} tokens do not fit grid {grid} (need {h * w} or {h * w + 1} with a global token)")
    for has_global in (False, True):
        m = N - int(has_global)
        side = int(round(math.sqrt(m)))
        if m > 0 and side * side == m:
            g = t[..., 0, :] if has_global else None
            p = t[..., int(has_global):, :]
            return g, p.reshape(*t.shape[:-2], side, side, t.shape[-1])
    raise ValueError(f"tokens: {N} tokens is neither a square grid nor a square grid + 1 global token; pass grid=(h, w)")


def token_cosine_map(a, b, grid: tuple[int, int] | None = None, eps: float = 1e-8) -> np.ndarray:
    """Per-patch cosine similarity between two token maps of the same image, (N, D) -> (h, w)
    (or (B, N, D) -> (B, h, w)); the global token, if any, is dropped."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"token maps differ in shape: {a.shape} vs {b.shape}; compare streams of the same tap width")
    _, pa = split_global(a, grid)
    _, pb = split_global(b, grid)
    num = (pa * pb).sum(-1)
    den = np.linalg.norm(pa, axis=-1) * np.linalg.norm(pb, axis=-1)
    return num / np.maximum(den, eps)


def difference_maps(streams: Mapping[str, np.ndarray], reference: str | None = None,
                    grid: tuple[int, int] | None = None, metric: str = "cosine") -> dict[str, np.ndarray]:
    """Per-prompt difference maps: every stream's token map compared patch-by-patch with the
    ``reference`` stream (default: the first, e.g. ``depth``).

    metric ``cosine``: cosine similarity (1 = unchanged); ``distance``: 1 - cosine; ``l2``:
    the L2 norm of the difference, divided by the reference token norm. Returns
    {name: (h, w) or (B, h, w)} for every stream but the reference."""
    names = list(streams)
    if len(names) < 2:
        raise ValueError("streams: give at least two token maps {name: (N, D)} to compare")
    ref = names[0] if reference is None else reference
    if ref not in streams:
        raise ValueError(f"reference {ref!r} is not one of the streams {names}")
    if metric not in ("cosine", "distance", "l2"):
        raise ValueError(f"metric={metric!r}: use 'cosine', 'distance' or 'l2'")
    out = {}
    for nm in names:
        if nm == ref:
            continue
        if metric == "l2":
            _, pr = split_global(np.asarray(streams[ref], dtype=np.float64), grid)
            _, pn = split_global(np.asarray(streams[nm], dtype=np.float64), grid)
            if pr.shape != pn.shape:
                raise ValueError(f"streams {ref!r} {pr.shape} and {nm!r} {pn.shape} differ in shape")
            out[nm] = np.linalg.norm(pn - pr, axis=-1) / np.maximum(np.linalg.norm(pr, axis=-1), 1e-8)
        else:
            cos = token_cosine_map(streams[ref], streams[nm], grid)
            out[nm] = cos if metric == "cosine" else 1.0 - cos
    return out


def pairwise_stream_cka(streams: Mapping[str, np.ndarray], grid: tuple[int, int] | None = None,
                        debiased: bool = False) -> tuple[list[str], np.ndarray]:
    """CKA between prompt streams of ONE image, with patches as the inputs: (N, D) token maps
    -> patches (h*w, D) -> ``cka_matrix``. Says how much each prompt reorganises the patch
    geometry (1 = same geometry up to rotation and scale)."""
    reps: dict[str, np.ndarray] = {}
    for nm, t in streams.items():
        _, p = split_global(t, grid)
        reps[nm] = p.reshape(-1, p.shape[-1])
    return cka_matrix(reps, debiased=debiased)
