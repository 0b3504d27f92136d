"""Intervals and verdicts: how sure we are of each number, and of each difference the paper claims.

Why these choices:

- VQA accuracy varies with the training seed and with which test questions happened to be drawn. The interval
  of an accuracy (or of a difference of two) is a two-level percentile bootstrap: resample the seeds, then the
  test questions within each resampled seed. A difference is *paired*: both variants get the same seeds and
  the same questions in every draw, so what they share (hard questions, a lucky data order) cancels.
- Measures that give one number per seed (the alignment loss) have no questions to resample; their interval is
  Student's t over the seeds (n - 1 degrees of freedom: wide with 2-3 seeds, as it should be).
- A verdict comes from the interval of the difference oriented in the paper's direction: `reproduced` when it
  excludes 0 on the paper's side, `reversed` when it excludes 0 on the other side, `unresolved` otherwise -
  a difference inside its interval is never called "not reproduced".
- A measure's Spearman correlation with VQA across variants gets a bootstrap interval that resamples the
  variants and, within each, the seeds.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import stats as sps

VERDICTS = ("reproduced", "reversed", "unresolved")


def _percentiles(samples: np.ndarray, level: float) -> tuple[float, float]:
    samples = samples[np.isfinite(samples)]
    if samples.size == 0:
        return float("nan"), float("nan")
    lo, hi = np.percentile(samples, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def bootstrap_accuracy(a: np.ndarray, b: np.ndarray | None = None, *, n_boot: int = 2000, level: float = 0.95,
                       seed: int = 0) -> tuple[float, float, float]:
    """(estimate, low, high) of mean(a) - mean(b) (or of mean(a)) over seeds and questions.

    `a`, `b`: (seeds, questions) 0/1 arrays, rows in the same seed order, columns the same questions."""
    a = np.asarray(a, dtype=np.float32)
    if a.ndim != 2 or a.size == 0:
        raise ValueError(f"expected a (seeds, questions) array of 0/1, got shape {a.shape}")
    est = float(a.mean() - (0.0 if b is None else np.asarray(b, dtype=np.float32).mean()))
    diff = a if b is None else a - np.asarray(b, dtype=np.float32)
    s, q = diff.shape
    rng = np.random.default_rng(seed)
    out = np.empty(n_boot, dtype=np.float64)
    chunk = max(1, 4_000_000 // max(1, s * q))  # bound memory: draws are made in chunks
    for start in range(0, n_boot, chunk):
        k = min(chunk, n_boot - start)
        si = rng.integers(0, s, size=(k, s))
        qi = rng.integers(0, q, size=(k, s, q))
        out[start:start + k] = diff[si[..., None], qi].mean(axis=(1, 2))
    lo, hi = _percentiles(out, level)
    return est, lo, hi


def t_interval(values, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high) of per-seed values with Student's t; the bounds are NaN with fewer than 2 values."""
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if x.size == 0:
        return float("nan"), float("nan"), float("nan")
    m = float(x.mean())
    if x.size < 2:
        return m, float("nan"), float("nan")
    half = float(sps.t.ppf(0.5 + level / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    return m, m - half, m + half


def verdict(low: float, high: float) -> str:
    """`reproduced` / `reversed` / `unresolved` from the interval of a difference oriented so that > 0 is the
    paper's direction."""
    if math.isfinite(low) and low > 0:
        return "reproduced"
    if math.isfinite(high) and high < 0:
        return "reversed"
    return "unresolved"


def _rank_corr(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman correlation of each row of x with the same row of y (NaN where a row is constant)."""
    rx = sps.rankdata(x, axis=-1)
    ry = sps.rankdata(y, axis=-1)
    rx = rx - rx.mean(-1, keepdims=True)
    ry = ry - ry.mean(-1, keepdims=True)
    den = np.sqrt((rx ** 2).sum(-1) * (ry ** 2).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (rx * ry).sum(-1) / np.where(den > 0, den, 1), np.nan)


def spearman_interval(measure: np.ndarray, vqa: np.ndarray, *, n_boot: int = 2000, level: float = 0.95,
                      seed: int = 0) -> tuple[float, float, float]:
    """(rho, low, high): Spearman correlation across variants of a measure with VQA accuracy (both
    (variants, seeds); seed means are correlated), with a bootstrap over variants and, within each, seeds."""
    m = np.asarray(measure, dtype=np.float64)
    y = np.asarray(vqa, dtype=np.float64)
    ok = np.isfinite(m).all(1) & np.isfinite(y).all(1)
    m, y = m[ok], y[ok]
    n_var, n_seed = m.shape
    if n_var < 3:
        return float("nan"), float("nan"), float("nan")
    rho = float(_rank_corr(m.mean(1), y.mean(1)))
    rng = np.random.default_rng(seed)
    vi = rng.integers(0, n_var, size=(n_boot, n_var))
    si = rng.integers(0, n_seed, size=(n_boot, n_var, n_seed))
    mb = m[vi[..., None], si].mean(-1)
    yb = y[vi[..., None], si].mean(-1)
    lo, hi = _percentiles(_rank_corr(mb, yb), level)
    return rho, lo, hi
