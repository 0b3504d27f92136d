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
At research scale (``fvl bench probe-scale``, docs/probes.md) this is 23-54x scikit-learn's GridSearchCV
pipeline run to convergence (n 5,000-20,000, d 256-512, one thread each), at <= 0.005 accuracy difference.

Folds, labels and the control task live in ``probes.folds``; one fitted probe as a scikit-learn
estimator (fit once, reuse, attribute) is ``probes.estimator.LinearProbe``; stored token maps are pooled
by ``model.tokens.to_vectors``, as capture pools them.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

from model.tokens import to_vectors
from probes.folds import control_labels, cv_splits, detect_task, encode_labels
from probes.folds import grouped_kfold  # noqa: F401 (exported by the probes package from here)
from probes.lbfgs import batched_lbfgs  # noqa: F401 (exported by the probes package from here)
from probes.solver import fit_logistic, fit_ridge, make_design

DEFAULT_CS = tuple(float(c) for c in np.logspace(-4, 2, 8))


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


def resolve_device(device: str | torch.device | None = "cpu") -> torch.device:
    """'auto' -> the first CUDA device when there is one, else the CPU; 'cpu', 'cuda', 'cuda:N' as given.
    A CUDA device that is absent is refused by name (not left to fail inside the solver)."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device {device!r}: use auto, cpu, cuda or cuda:N") from exc
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (dev.index or 0) >= count:
            raise ValueError(f"device {device!r}: this machine has {count} CUDA device(s); use --device cpu or auto")
    elif dev.type != "cpu":
        raise ValueError(f"device {device!r}: use auto, cpu, cuda or cuda:N")
    return dev


def probe_matrix(features: Mapping[str, np.ndarray], labels: Mapping[str, Sequence | np.ndarray],
                 groups: Sequence | np.ndarray | None = None, *, types: Sequence | np.ndarray | None = None,
                 tasks: Mapping[str, str] | None = None, Cs: Iterable[float] = DEFAULT_CS, n_folds: int = 5,
                 select: str = "inner", control: bool = True, pca: int | str | None = "auto",
                 pool: str = "mean", has_global: bool | Mapping[str, bool] = False, max_iter: int = 100,
                 tol: float = 1e-4, seed: int = 0, max_classes: int = 20, path: str = "warm",
                 dtype: torch.dtype = torch.float32, threads: int | None = None, precondition: bool | str = "auto",
                 device: str | torch.device = "cpu", progress: bool = True) -> ProbeMatrix:
    """Probe every tap's features for every label.

    features: tap -> (n, d) array ((n, N, D) token maps and (n, C, H, W) maps are pooled with ``pool`` by
              ``model.tokens.to_vectors``; ``has_global`` (one bool, or per tap) says whether token 0 of a
              token map is a global token, which the mean leaves out, as capture-time pooling does).
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
    device:   where the solver runs ('cpu', 'cuda', 'cuda:N', 'auto'); scores are computed on the CPU.
    threads:  torch threads while solving (restored after). None: 1 thread for small problems
              (n * d < 2^21, where thread start-up and, on a busy machine, oversubscription cost
              more than they give: measured 20x slower with 2 threads on a loaded 2-core box),
              torch's current setting otherwise.
    progress: a tqdm bar (shown only once the matrix has run for 2 s) counting fits
              (split x target x C), with the tap and labels being solved and the time left.
    """
    dev = resolve_device(device)
    n_rows = len(next(iter(labels.values()))) if labels else 0
    widest = max((int(np.prod(np.shape(x)[1:])) for x in features.values()), default=0)
    want = threads if threads is not None else (1 if n_rows * widest < 2 ** 21 else None)
    old_threads = torch.get_num_threads()
    if want is not None and want != old_threads:
        torch.set_num_threads(max(1, int(want)))
    try:
        return _probe_matrix(features, labels, groups, types=types, tasks=tasks, Cs=Cs, n_folds=n_folds,
                             select=select, control=control, pca=pca, pool=pool, has_global=has_global,
                             max_iter=max_iter, tol=tol, seed=seed, max_classes=max_classes, path=path, dtype=dtype,
                             precondition=precondition, device=dev, progress=progress)
    finally:
        if torch.get_num_threads() != old_threads:
            torch.set_num_threads(old_threads)


def _check_inputs(features, labels, groups, types, Cs, tasks, pool, has_global, path, precondition, select):
    """Validate and pool the inputs -> (feats, labs, groups, types, sorted Cs, tasks)."""
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
    flags = has_global if isinstance(has_global, Mapping) else {tap: bool(has_global) for tap in features}
    feats = {tap: to_vectors(x, has_global=bool(flags.get(tap, False)), how=pool) for tap, x in features.items()}
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
    return feats, labs, groups, types, Cs_sorted, tasks


def _encode_all(labs, tasks, types, n_folds, control, seed, max_classes) -> dict[str, dict]:
    """Every label encoded for the solver, with its control-task labels."""
    enc: dict[str, dict] = {}
    for i, (name, y) in enumerate(labs.items()):
        task = tasks.get(name) or detect_task(y, max_classes)
        vals, valid, classes = encode_labels(y, task)
        if valid.sum() < n_folds * 2:
            raise ValueError(f"labels[{name!r}] has only {int(valid.sum())} non-missing values; need >= {2 * n_folds}")
        entry = {"task": task, "vals": vals, "valid": valid, "classes": classes}
        if control:
            entry["control"] = control_labels(vals, types, seed + 101 * (i + 1), valid=valid)
        enc[name] = entry
    return enc


def _probe_matrix(features, labels, groups, *, types, tasks, Cs, n_folds, select, control, pca, pool, has_global,
                  max_iter, tol, seed, max_classes, path, dtype, precondition, device, progress) -> ProbeMatrix:
    feats, labs, groups, types, Cs_sorted, tasks = _check_inputs(features, labels, groups, types, Cs, tasks, pool,
                                                                 has_global, path, precondition, select)
    n = next(iter(feats.values())).shape[0]
    enc = _encode_all(labs, tasks, types, n_folds, control, seed, max_classes)
    strata = None
    first_cls = next((e for e in enc.values() if e["task"] == "classification"), None)
    if first_cls is not None:
        strata = first_cls["vals"]
    train_np, eval_np, _ = cv_splits(groups, strata, n_folds, select, seed)
    evals = torch.from_numpy(eval_np)
    Cs_t = torch.tensor(Cs_sorted, dtype=dtype, device=device)
    results: dict[tuple[str, str], ProbeResult] = {}
    per_tap = train_np.shape[0] * len(enc) * (2 if control else 1) * len(Cs_sorted)
    from tqdm.auto import tqdm

    bar = tqdm(total=per_tap * len(feats), desc="probe fits", unit="fit", disable=not progress, delay=2.0,
               leave=False)
    step = 2 if control else 1
    with bar:
        for tap in feats:
            X = torch.from_numpy(np.ascontiguousarray(feats[tap], dtype=np.float32)).to(device=device, dtype=dtype)
            d = X.shape[1]
            pdim = (256 if d > 512 else None) if pca == "auto" else (int(pca) if pca else None)
            if pdim is not None:
                pdim = min(pdim, int(train_np.sum(1).min()) - 1, d)
            design = make_design(X, torch.from_numpy(train_np).to(device), pdim, precondition=precondition)
            for task in ("classification", "regression"):
                names = [nm for nm, e in enc.items() if e["task"] == task]
                if not names:
                    continue
                bar.set_postfix_str(f"{tap}: {', '.join(names)}"[:60])
                targets, valid = _stack_targets(enc, names, control, torch.int64 if task == "classification" else dtype)
                if task == "classification":
                    ncls = [len(enc[nm]["classes"]) for nm in names for _ in range(step)]
                    pred, info = fit_logistic(design, targets.to(device), valid.to(device), ncls, Cs_t,
                                              max_iter=max_iter, tol=tol, warm=path == "warm", on_fits=bar.update)
                else:
                    pred = fit_ridge(design, targets.to(device), valid.to(device), Cs_t)
                    info = {"solver": "closed-form ridge (alpha = 1/C)"}
                    bar.update(train_np.shape[0] * targets.shape[0] * len(Cs_sorted))
                scores = _score(pred, targets, valid, evals, task)                  # (S, T, L)
                for j, nm in enumerate(names):
                    results[(tap, nm)] = _assemble(tap, nm, enc[nm], scores, pred, targets, valid, evals,
                                                   j * step, control, n_folds, select, Cs_sorted, n, d, design,
                                                   dict(info, device=str(device)))
    settings = {"n_folds": n_folds, "select": select, "Cs": Cs_sorted, "control": control, "seed": seed,
                "pca": pca, "pool": pool, "max_iter": max_iter, "tol": tol, "path": path, "precondition": precondition,
                "device": str(device),
                "objective": "mean CE + ||W||^2/(2 C n_train) (logistic); sum SE + ||w||^2/C (ridge)",
                "selection_rule": ("C per outer fold by accuracy/R^2 on an inner grouped validation split of its "
                                   "training rows; ties -> smaller C" if select == "inner" else
                                   "C maximising the mean outer-CV score (optimistic); ties -> smaller C"),
                "control_rule": "one random label per type (default type = group) drawn from the empirical "
                                "label distribution; scored at the task's chosen C"}
    return ProbeMatrix(list(feats), list(labs), results, settings)


def _stack_targets(enc: dict, names: list[str], control: bool, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets (T, n) and valid masks (T, n) of ``names``, each label followed by its control when asked."""
    rows, valids = [], []
    for nm in names:
        e = enc[nm]
        rows += [e["vals"], e["control"]] if control else [e["vals"]]
        valids += [e["valid"]] * (2 if control else 1)
    return torch.from_numpy(np.stack(rows)).to(dtype), torch.from_numpy(np.stack(valids))


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
