"""Linear probes done rigorously and fast.

What a probe result here means (the choices follow the probing checklist in
interpretability-anchors.md section 4):

* **Grouped k-fold CV.** Rows that share a group (an image id) are never split between train
  and test; folds are deterministic for a seed and roughly stratified by label.
* **Train-split statistics only.** Every split standardises (and, when asked, PCA-reduces) the
  features with statistics of its own training rows.
* **Regularisation sweep.** Every C of the grid is fitted on every split; the whole curve is kept.
  C is *selected* per outer fold on an inner grouped validation split of that fold's training
  rows (``select="inner"``, the default, which keeps the reported score unbiased) or by the
  mean outer-CV score (``select="cv"``, faster and optimistic).
* **Control task (Hewitt & Liang 2019).** Each *type* (``types``; by default each group)
  gets one random label drawn from the empirical label distribution; all its rows share it.
  A probe that merely memorises types scores as well on the control as on the task, so
  ``selectivity = task score - control score`` (same C per fold) is near zero for it.
* Classification reports accuracy (and a pooled confusion matrix at the chosen C);
  regression reports R^2 (closed-form ridge, ``alpha = 1 / C``).

Speed (the solver is ``probes.solver``): all splits x targets (labels and their controls) of
one tap that share a class count are solved as ONE batched problem per C, walking the C grid
upwards with warm starts (``path="warm"``; ``"joint"`` solves every C at once). Multinomial
logistic regression, objective per problem ``mean_i CE_i + ||W||^2 / (2 C n_train)`` (the same
optimum as scikit-learn's ``C * sum_i CE_i + ||W||^2 / 2``), is minimised by a batched L-BFGS in
torch in which every problem keeps its own curvature memory, step size and stopping test, and
converged problems drop out of the batch. Without PCA the per-split standardisation is folded
into the weights, so one centred copy of X serves every split and the data term is a single
matrix product per evaluation. Binary targets use one logit (like scikit-learn). A fit starts one
Newton step from the class prior. On features whose covariance is far from isotropic (real features:
a few directions dominate) the solver is preconditioned with that covariance
(``precondition="auto"``); start and preconditioner change the path to the optimum, not the optimum.
"""
from __future__ import annotations

import heapq
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

from probes.solver import batched_lbfgs, fit_logistic, fit_ridge, make_design  # noqa: F401 (batched_lbfgs re-exported)

DEFAULT_CS = tuple(float(c) for c in np.logspace(-4, 2, 8))
MISSING_STRINGS = {"", "none", "nan", "null"}


# --------------------------------------------------------------------------- labels and folds
def _missing_mask(y: np.ndarray) -> np.ndarray:
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
    valid = y[~_missing_mask(y)]
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
    missing = _missing_mask(y) if valid is None else ~np.asarray(valid, dtype=bool)
    valid_idx = np.flatnonzero(~missing)
    if valid_idx.size == 0:
        return y.copy()
    uniq, inverse = np.unique(types.astype(str) if types.dtype.kind == "O" else types, return_inverse=True)
    rng = np.random.default_rng(seed + 7919)
    draw = valid_idx[rng.integers(0, valid_idx.size, size=uniq.size)]
    out = y[draw][inverse.reshape(-1)].copy()
    out[missing] = y[missing]
    return out


def pool_tokens(x: np.ndarray, how: str = "mean") -> np.ndarray:
    """Pool stored features to (n, d): (n, N, D) token maps by ``mean`` over tokens or ``global``
    (token 0); (n, C, H, W) spatial maps by mean over H, W; (n, d) unchanged."""
    x = np.asarray(x)
    if x.ndim == 2:
        return x
    if x.ndim == 3:
        if how == "mean":
            return x.mean(1)
        if how == "global":
            return x[:, 0]
    if x.ndim == 4 and how == "mean":
        return x.mean((2, 3))
    raise ValueError(f"features of shape {x.shape} cannot be pooled with {how!r}; "
                     "pass (n, d) features, or pool='mean' / 'global' for (n, N, D) token maps")


# --------------------------------------------------------------------------- results
@dataclass
class ProbeResult:
    """One probe (one tap x one label). Scores are accuracy (classification) or R^2 (regression),
    each fold scored at the C chosen for that fold; control scores use the same C."""
    tap: str
    label: str
    task: str
    metric: str
    n: int
    d: int
    dim: int
    n_folds: int
    select: str
    score_mean: float
    score_std: float
    score_folds: list[float]
    control_mean: float | None
    control_std: float | None
    control_folds: list[float] | None
    selectivity_mean: float | None
    selectivity_std: float | None
    chosen_C: list[float]
    best_C: float
    Cs: list[float]
    curve_mean: list[float]
    curve_std: list[float]
    fold_curves: list[list[float]]
    control_curve_mean: list[float] | None
    chance: float
    classes: list[str] | None = None
    confusion: list[list[int]] | None = None
    pca_explained: float | None = None
    solver: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ProbeMatrix:
    """Table of probes: taps x labels. ``results[(tap, label)]`` is a ProbeResult."""
    taps: list[str]
    labels: list[str]
    results: dict[tuple[str, str], ProbeResult]
    settings: dict

    def __getitem__(self, key: tuple[str, str]) -> ProbeResult:
        return self.results[key]

    def table(self, field_name: str = "score_mean") -> np.ndarray:
        """(len(taps), len(labels)) array of one ProbeResult field (NaN where absent)."""
        out = np.full((len(self.taps), len(self.labels)), np.nan)
        for i, tap in enumerate(self.taps):
            for j, lab in enumerate(self.labels):
                r = self.results.get((tap, lab))
                v = getattr(r, field_name) if r is not None else None
                if v is not None:
                    out[i, j] = float(v)
        return out

    def to_dict(self) -> dict:
        return {"taps": list(self.taps), "labels": list(self.labels), "settings": dict(self.settings),
                "results": [r.to_dict() for r in self.results.values()]}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ProbeMatrix":
        results = {(r["tap"], r["label"]): ProbeResult(**r) for r in data["results"]}
        return cls(list(data["taps"]), list(data["labels"]), results, dict(data.get("settings", {})))

    def to_markdown(self) -> str:
        """One row per tap, one column per label: ``score ± sd (sel s)``; accuracy for
        classification, R^2 for regression; sel = selectivity against the control task."""
        head = "| tap | " + " | ".join(self.labels) + " |"
        lines = [head, "|" + "---|" * (len(self.labels) + 1)]
        for tap in self.taps:
            cells = []
            for lab in self.labels:
                r = self.results.get((tap, lab))
                if r is None:
                    cells.append("-")
                    continue
                cell = f"{r.score_mean:.3f} ± {r.score_std:.3f}"
                if r.selectivity_mean is not None:
                    cell += f" (sel {r.selectivity_mean:+.3f})"
                cells.append(cell)
            lines.append(f"| {tap} | " + " | ".join(cells) + " |")
        metrics = sorted({r.metric for r in self.results.values()})
        lines.append("")
        lines.append(f"metric: {', '.join(metrics)}; {self.settings.get('n_folds')}-fold grouped CV; "
                     f"C selected by {self.settings.get('select')}; sel = score - control-task score")
        return "\n".join(lines)


# --------------------------------------------------------------------------- the probe matrix
def _encode(y: np.ndarray, task: str) -> tuple[np.ndarray, np.ndarray, list[str] | None]:
    """-> (values, valid mask, class names). Class codes are -1 where missing; numeric classes
    are ordered numerically, others alphabetically."""
    missing = _missing_mask(y)
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


def _splits(groups: np.ndarray, strata: np.ndarray | None, n_folds: int, select: str, seed: int
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


def _score(pred: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor, evals: torch.Tensor,
           task: str) -> np.ndarray:
    """Scores (S, T, L) on each split's eval rows: accuracy or R^2."""
    m = (evals.unsqueeze(2) & valid.T.unsqueeze(0)).unsqueeze(-1).to(torch.float64)  # (S, n, T, 1)
    cnt = m.sum(1).clamp_min(1.0)
    y = targets.T.unsqueeze(0).unsqueeze(-1)                                          # (1, n, T, 1)
    if task == "classification":
        return ((pred == y).to(torch.float64) * m).sum(1).div(cnt).numpy()
    pred = pred.to(torch.float64)
    y = y.to(torch.float64)
    ym = (y * m).sum(1, keepdim=True) / cnt.unsqueeze(1)
    ss_res = (((pred - y) ** 2) * m).sum(1)
    ss_tot = (((y - ym) ** 2) * m).sum(1).clamp_min(1e-12)
    return (1.0 - ss_res / ss_tot).numpy()


def probe_matrix(features: Mapping[str, np.ndarray], labels: Mapping[str, Sequence | np.ndarray],
                 groups: Sequence | np.ndarray | None = None, *, types: Sequence | np.ndarray | None = None,
                 tasks: Mapping[str, str] | None = None, Cs: Iterable[float] = DEFAULT_CS, n_folds: int = 5,
                 select: str = "inner", control: bool = True, pca: int | str | None = "auto",
                 pool: str = "mean", max_iter: int = 100, tol: float = 1e-4, seed: int = 0,
                 max_classes: int = 20, path: str = "warm", dtype: torch.dtype = torch.float32,
                 threads: int | None = None, precondition: bool | str = "auto", progress: bool = True) -> ProbeMatrix:
    """Probe every tap's features for every label.

    features: tap -> (n, d) array ((n, N, D) token maps are pooled with ``pool``).
    labels:   name -> (n,) labels; strings/ints/bools are classes, floats regression targets
              (``tasks={name: 'classification'|'regression'}`` overrides); None/NaN/'' = missing.
    groups:   (n,) group ids (image ids): a group never spans train and test. Default: one per row.
    types:    (n,) control-task types (default: ``groups``), see ``control_labels``.
    Cs:       inverse L2 strengths (logistic C; ridge alpha = 1/C). ``select``: 'inner' | 'cv'.
    pca:      'auto' (reduce to 256 dims, fitted per split, when d > 512), an int, or None.
    path:     'warm' (solve C ascending, warm-starting each from the last) or 'joint' (all C at once).
    precondition: 'auto' (when the standardised features' top covariance eigenvalue is > 10x the
              median, as for real, correlated features), True or False; it changes how fast the
              solver gets there, not the solution (see ``probes.solver.logistic_bucket``).
    threads:  torch threads while solving (restored after). None: 1 thread for small problems
              (n * d < 2^21, where thread start-up and, on a busy machine, oversubscription cost
              more than they give: measured 20x slower with 2 threads on a loaded 2-core box),
              torch's current setting otherwise.
    """
    n_rows = len(next(iter(labels.values()))) if labels else 0
    widest = max((int(np.prod(np.shape(x)[1:])) for x in features.values()), default=0)
    want = threads if threads is not None else (1 if n_rows * widest < 2 ** 21 else None)
    old_threads = torch.get_num_threads()
    if want is not None and want != old_threads:
        torch.set_num_threads(max(1, int(want)))
    try:
        return _probe_matrix(features, labels, groups, types=types, tasks=tasks, Cs=Cs, n_folds=n_folds,
                             select=select, control=control, pca=pca, pool=pool, max_iter=max_iter, tol=tol,
                             seed=seed, max_classes=max_classes, path=path, dtype=dtype, precondition=precondition,
                             progress=progress)
    finally:
        if torch.get_num_threads() != old_threads:
            torch.set_num_threads(old_threads)


def _probe_matrix(features, labels, groups, *, types, tasks, Cs, n_folds, select, control, pca, pool, max_iter,
                  tol, seed, max_classes, path, dtype, precondition, progress) -> ProbeMatrix:
    if path not in ("warm", "joint"):
        raise ValueError(f"path={path!r}: use 'warm' (C path with warm starts) or 'joint'")
    if precondition not in ("auto", True, False):
        raise ValueError(f"precondition={precondition!r}: use 'auto', True or False")
    if select not in ("inner", "cv"):
        raise ValueError(f"select={select!r}: use 'inner' (nested validation) or 'cv' (mean CV score)")
    if not features:
        raise ValueError("features: no taps given; pass {tap_name: (n, d) array}")
    if not labels:
        raise ValueError("labels: no labels given; pass {label_name: (n,) array}")
    feats = {tap: pool_tokens(np.asarray(x), pool) for tap, x in features.items()}
    n = next(iter(feats.values())).shape[0]
    for tap, x in feats.items():
        if x.shape[0] != n:
            raise ValueError(f"features[{tap!r}] has {x.shape[0]} rows, expected {n} (all taps must share rows)")
        if not np.all(np.isfinite(x)):
            raise ValueError(f"features[{tap!r}] contains NaN or inf; drop or fix those items first")
    labs = {name: np.asarray(y) for name, y in labels.items()}
    for name, y in labs.items():
        if y.shape[0] != n:
            raise ValueError(f"labels[{name!r}] has {y.shape[0]} values, expected {n} (one per feature row)")
    groups = np.arange(n) if groups is None else np.asarray(groups)
    if groups.shape[0] != n:
        raise ValueError(f"groups has {groups.shape[0]} values, expected {n} (one per feature row)")
    types = groups if types is None else np.asarray(types)
    if types.shape[0] != n:
        raise ValueError(f"types has {types.shape[0]} values, expected {n} (one per feature row)")
    Cs_sorted = sorted(float(c) for c in Cs)
    if not Cs_sorted or min(Cs_sorted) <= 0:
        raise ValueError(f"Cs={list(Cs)}: give one or more positive regularisation values")
    tasks = dict(tasks or {})
    for name, t in tasks.items():
        if t not in ("classification", "regression"):
            raise ValueError(f"tasks[{name!r}]={t!r}: use 'classification' or 'regression'")

    # encode every label (task + control)
    enc: dict[str, dict] = {}
    for i, (name, y) in enumerate(labs.items()):
        task = tasks.get(name) or detect_task(y, max_classes)
        vals, valid, classes = _encode(y, task)
        if valid.sum() < n_folds * 2:
            raise ValueError(f"labels[{name!r}] has only {int(valid.sum())} non-missing values; need >= {2 * n_folds}")
        entry = {"task": task, "vals": vals, "valid": valid, "classes": classes}
        if control:
            entry["control"] = control_labels(vals, types, seed + 101 * (i + 1), valid=valid)
        enc[name] = entry

    strata = None
    first_cls = next((e for e in enc.values() if e["task"] == "classification"), None)
    if first_cls is not None:
        strata = first_cls["vals"]
    train_np, eval_np, _ = _splits(groups, strata, n_folds, select, seed)
    train = torch.from_numpy(train_np)
    evals = torch.from_numpy(eval_np)
    Cs_t = torch.tensor(Cs_sorted, dtype=dtype)
    results: dict[tuple[str, str], ProbeResult] = {}

    taps = list(feats)
    iterator: Iterable[str] = taps
    if progress:
        from tqdm.auto import tqdm
        iterator = tqdm(taps, desc="probe taps", leave=False)
    for tap in iterator:
        X = torch.from_numpy(np.ascontiguousarray(feats[tap], dtype=np.float32)).to(dtype)
        d = X.shape[1]
        pdim = None
        if pca == "auto":
            pdim = 256 if d > 512 else None
        elif pca:
            pdim = int(pca)
        if pdim is not None:
            pdim = min(pdim, int(train_np.sum(1).min()) - 1, d)
        design = make_design(X, train, pdim, precondition=precondition)
        for task in ("classification", "regression"):
            names = [nm for nm, e in enc.items() if e["task"] == task]
            if not names:
                continue
            rows, valids, kinds = [], [], []
            for nm in names:
                e = enc[nm]
                rows.append(e["vals"])
                valids.append(e["valid"])
                if control:
                    rows.append(e["control"])
                    valids.append(e["valid"])
            tdtype = torch.int64 if task == "classification" else dtype
            targets = torch.from_numpy(np.stack(rows)).to(tdtype)
            valid = torch.from_numpy(np.stack(valids))
            info: dict = {}
            if task == "classification":
                ncls = []
                for nm in names:
                    k = len(enc[nm]["classes"])
                    ncls += [k, k] if control else [k]
                pred, info = fit_logistic(design, targets, valid, ncls, Cs_t, max_iter=max_iter, tol=tol,
                                              warm=path == "warm")
            else:
                pred = fit_ridge(design, targets, valid, Cs_t)
                info = {"solver": "closed-form ridge (alpha = 1/C)"}
            scores = _score(pred, targets, valid, evals, task)                  # (S, T, L)
            step = 2 if control else 1
            for j, nm in enumerate(names):
                results[(tap, nm)] = _assemble(tap, nm, enc[nm], scores, pred, targets, valid, evals,
                                               j * step, control, n_folds, select, Cs_sorted, n, d, design, info)
    settings = {"n_folds": n_folds, "select": select, "Cs": Cs_sorted, "control": control, "seed": seed,
                "pca": pca, "pool": pool, "max_iter": max_iter, "tol": tol, "path": path, "precondition": precondition,
                "objective": "mean CE + ||W||^2/(2 C n_train) (logistic); sum SE + ||w||^2/C (ridge)",
                "selection_rule": ("C per outer fold by accuracy/R^2 on an inner grouped validation split of its "
                                   "training rows; ties -> smaller C" if select == "inner" else
                                   "C maximising the mean outer-CV score (optimistic); ties -> smaller C"),
                "control_rule": "one random label per type (default type = group) drawn from the empirical "
                                "label distribution; scored at the task's chosen C"}
    return ProbeMatrix(taps, list(labs), results, settings)


def _assemble(tap, name, e, scores, pred, targets, valid, evals, t, control, n_folds, select, Cs, n, d,
              design, info) -> ProbeResult:
    F = n_folds
    outer = scores[:F, t]                                             # (F, L)
    if select == "inner":
        chosen = scores[F:2 * F, t].argmax(1)                         # first max -> smallest C
    else:
        chosen = np.full(F, int(outer.mean(0).argmax()))
    folds = outer[np.arange(F), chosen]
    ctrl_folds = ctrl_curve = sel = None
    if control:
        cscores = scores[:F, t + 1]
        ctrl_folds = cscores[np.arange(F), chosen]
        ctrl_curve = cscores.mean(0).tolist()
        sel = folds - ctrl_folds
    vals, ok = e["vals"], e["valid"]
    classes = confusion = None
    if e["task"] == "classification":
        classes = e["classes"]
        k = len(classes)
        conf = np.zeros((k, k), dtype=np.int64)
        for f in range(F):
            rows = (evals[f].numpy() & ok)
            p = pred[f, :, t, chosen[f]].numpy()[rows]
            np.add.at(conf, (vals[rows], np.clip(p, 0, k - 1)), 1)
        confusion = conf.tolist()
        chance = float(np.bincount(vals[ok]).max() / ok.sum())
    else:
        chance = 0.0
    values, counts = np.unique(chosen, return_counts=True)
    best = int(values[counts.argmax()])
    return ProbeResult(
        tap=tap, label=name, task=e["task"], metric="accuracy" if e["task"] == "classification" else "r2",
        n=int(ok.sum()), d=int(d), dim=int(design.dim), n_folds=F, select=select,
        score_mean=float(folds.mean()), score_std=float(folds.std()), score_folds=folds.tolist(),
        control_mean=None if sel is None else float(ctrl_folds.mean()),
        control_std=None if sel is None else float(ctrl_folds.std()),
        control_folds=None if sel is None else ctrl_folds.tolist(),
        selectivity_mean=None if sel is None else float(sel.mean()),
        selectivity_std=None if sel is None else float(sel.std()),
        chosen_C=[Cs[i] for i in chosen], best_C=Cs[best], Cs=list(Cs),
        curve_mean=outer.mean(0).tolist(), curve_std=outer.std(0).tolist(),
        fold_curves=outer.tolist(), control_curve_mean=ctrl_curve,
        chance=chance, classes=classes, confusion=confusion, pca_explained=design.explained,
        solver=dict(info, preconditioned=design.pre_eig is not None))


def probe(X: np.ndarray, y: Sequence | np.ndarray, groups: Sequence | np.ndarray | None = None, **kwargs
          ) -> ProbeResult:
    """One probe: features X (n, d) for labels y. Keyword arguments as ``probe_matrix``."""
    m = probe_matrix({"x": X}, {"y": y}, groups, **kwargs)
    return m.results[("x", "y")]
