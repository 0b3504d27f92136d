"""Labels and folds for the linear probes: missing values, task detection, label encoding, the grouped
(and roughly stratified) k-fold splits with their inner validation splits, and the control task.

Kept apart from the probe matrix because every one of these decides *which rows* a probe is fitted
and scored on, and the benchmarks rebuild exactly these splits to give scikit-learn the same rows.
"""
from __future__ import annotations

import heapq
import math
from typing import Sequence

import numpy as np

MISSING_STRINGS = {"", "none", "nan", "null"}


def missing_mask(y: np.ndarray) -> np.ndarray:
    """True where a label is missing (None, NaN or an empty/"none" string)."""
    y = np.asarray(y)
    if y.dtype.kind == "f":
        return ~np.isfinite(y)
    if y.dtype.kind in "OUS":
        return np.array([v is None or (isinstance(v, float) and not math.isfinite(v))
                         or (isinstance(v, (str, bytes)) and str(v).strip().lower() in MISSING_STRINGS)
                         for v in y.tolist()], dtype=bool)
    return np.zeros(y.shape[0], dtype=bool)


def detect_task(y: Sequence | np.ndarray, max_classes: int = 20) -> str:
    """'classification' for non-numeric labels, booleans, or numbers taking at most
    ``max_classes`` distinct integer values; otherwise 'regression'."""
    y = np.asarray(y)
    valid = y[~missing_mask(y)]
    if y.dtype.kind in "bOUS":
        if y.dtype.kind == "O":
            try:
                numeric = valid.astype(np.float64)
            except (TypeError, ValueError):
                return "classification"
            return detect_task(numeric, max_classes)
        return "classification"
    if valid.size == 0:
        return "classification"
    distinct = np.unique(valid)
    if y.dtype.kind in "iu":
        return "classification" if distinct.size <= max_classes else "regression"
    if np.all(np.equal(np.mod(distinct, 1), 0)) and distinct.size <= max_classes:
        return "classification"
    return "regression"


def grouped_kfold(groups: Sequence | np.ndarray, n_splits: int = 5, seed: int = 0,
                  strata: Sequence | np.ndarray | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Deterministic grouped k-fold: returns ``[(train_idx, test_idx), ...]``.

    Groups are shuffled with ``seed``, ordered by stratum (the most common label of the group,
    when ``strata`` is given) and size, then each goes to the fold with the fewest rows so far;
    equal-size groups therefore go round-robin within each stratum, which stratifies the folds.
    (scikit-learn's StratifiedGroupKFold does this too but takes seconds for 10^4 groups.)
    """
    groups = np.asarray(groups)
    n = groups.shape[0]
    uniq, inverse, sizes = np.unique(groups, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    if uniq.size < n_splits:
        raise ValueError(f"groups: only {uniq.size} distinct groups for {n_splits} folds; "
                         f"pass fewer folds (n_folds <= {uniq.size}) or more groups")
    rng = np.random.default_rng(seed)
    order = rng.permutation(uniq.size)
    stratum = np.zeros(uniq.size, dtype=np.int64)
    if strata is not None:
        _, s_codes = np.unique(np.asarray(strata).astype(str), return_inverse=True)
        counts = np.zeros((uniq.size, s_codes.max() + 1), dtype=np.int64)
        np.add.at(counts, (inverse, s_codes.reshape(-1)), 1)
        stratum = counts.argmax(1)
    # stable sorts: size descending is the primary key, stratum the secondary, shuffle the tertiary
    order = order[np.argsort(stratum[order], kind="stable")]
    order = order[np.argsort(-sizes[order], kind="stable")]
    # greedy: each group to the least-loaded fold (the lowest index on ties); a heap of (load, fold)
    # gives the same choice as an argmin over the loads at a fraction of the cost per group
    fold_of_group = np.empty(uniq.size, dtype=np.int64)
    heap = [(0, f) for f in range(n_splits)]
    for g, size in zip(order.tolist(), sizes[order].tolist()):
        load, f = heap[0]
        fold_of_group[g] = f
        heapq.heapreplace(heap, (load + size, f))
    fold_of_row = fold_of_group[inverse]
    idx = np.arange(n)
    return [(idx[fold_of_row != f], idx[fold_of_row == f]) for f in range(n_splits)]


def control_labels(y: Sequence | np.ndarray, types: Sequence | np.ndarray, seed: int = 0,
                   valid: np.ndarray | None = None) -> np.ndarray:
    """Hewitt & Liang control task: every distinct type gets one label drawn at random from the
    empirical label distribution (the label of a random valid row); all rows of the type share
    it. Missing labels (None/NaN/'' or ``valid == False``) stay missing and are never drawn."""
    y = np.asarray(y)
    types = np.asarray(types)
    missing = missing_mask(y) if valid is None else ~np.asarray(valid, dtype=bool)
    valid_idx = np.flatnonzero(~missing)
    if valid_idx.size == 0:
        return y.copy()
    uniq, inverse = np.unique(types.astype(str) if types.dtype.kind == "O" else types, return_inverse=True)
    rng = np.random.default_rng(seed + 7919)
    draw = valid_idx[rng.integers(0, valid_idx.size, size=uniq.size)]
    out = y[draw][inverse.reshape(-1)].copy()
    out[missing] = y[missing]
    return out


def encode_labels(y: np.ndarray, task: str) -> tuple[np.ndarray, np.ndarray, list[str] | None]:
    """-> (values, valid mask, class names). Class codes are -1 where missing; numeric classes
    are ordered numerically, others alphabetically."""
    missing = missing_mask(y)
    if task == "regression":
        vals = np.zeros(y.shape[0], dtype=np.float64)
        vals[~missing] = np.asarray(y[~missing], dtype=np.float64)
        return vals, ~missing, None
    codes = np.full(y.shape[0], -1, dtype=np.int64)
    raw = y[~missing]
    if y.dtype.kind == "O":
        try:
            raw = raw.astype(np.float64)
        except (TypeError, ValueError):
            pass
    if raw.dtype.kind in "iubf":
        uniq = np.unique(raw)
        names = [str(int(v)) if raw.dtype.kind == "f" and float(v).is_integer() else str(v) for v in uniq.tolist()]
        codes[~missing] = np.searchsorted(uniq, raw)
    else:
        keys = np.array([str(v) for v in raw.tolist()], dtype=object)
        names = sorted(set(keys.tolist()))
        lookup = {name: i for i, name in enumerate(names)}
        codes[~missing] = [lookup[k] for k in keys.tolist()]
    return codes, codes >= 0, names


def cv_splits(groups: np.ndarray, strata: np.ndarray | None, n_folds: int, select: str, seed: int
            ) -> tuple[np.ndarray, np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    """Train / eval masks (S, n): the n_folds outer splits, then (select='inner') one inner split
    per outer fold (a grouped split of that fold's training rows)."""
    n = groups.shape[0]
    outer = grouped_kfold(groups, n_folds, seed, strata)
    trains, evals = [], []
    for tr, te in outer:
        trains.append(np.isin(np.arange(n), tr))
        evals.append(np.isin(np.arange(n), te))
    if select == "inner":
        for f, (tr, _) in enumerate(outer):
            k_in = max(2, min(n_folds - 1, np.unique(groups[tr]).size))
            itr, iva = grouped_kfold(groups[tr], k_in, seed + 1 + f, None if strata is None else strata[tr])[0]
            m_tr = np.zeros(n, dtype=bool)
            m_tr[tr[itr]] = True
            m_va = np.zeros(n, dtype=bool)
            m_va[tr[iva]] = True
            trains.append(m_tr)
            evals.append(m_va)
    return np.stack(trains), np.stack(evals), outer
