"""Layer-wise probing at research scale: our probe matrix against the scikit-learn pipeline a researcher
would otherwise write, on features shaped like a real encoder's, in one run on the same threads.

Why a separate benchmark from `fvl bench probe`: that one uses small isotropic features, where neither
side is anyone's bottleneck. Here the defaults are one layer of a ViT-L-sized encoder over a COCO-sized
split: n = 20,000 rows (two per image, so folds are grouped), d = 1024, ten labels with 2 to 20 classes,
eight C values, five grouped folds with C chosen on an inner grouped split of each fold's training rows,
and a control task (Hewitt & Liang) scored at the chosen C.

The features are correlated the way real ones are: a power-law spectrum (variance of direction i
proportional to 1 / (i + 1)) with a few directions that dominate it, rotated by a random orthogonal
matrix, and each label's class means planted in its own random low-dimensional subspace.

scikit-learn side (the reference): for each label and outer fold,
``GridSearchCV(make_pipeline(StandardScaler(), LogisticRegression(max_iter, tol)), {C: grid}, cv=[the same
inner grouped split])``, scored on the outer test rows; then the control labels fitted at the chosen C.
Ours: ``probes.linear.probe_matrix`` with the same folds, inner split, C grid and control labels.

Reported: ``ours_s``, ``sklearn_s``, ``ratio`` (= sklearn_s / ours_s), ``max_acc_diff`` (the largest
difference of a label's mean test accuracy, task or control), ``peak_rss_mb`` (the process's peak resident
memory, both sides included), and the sizes.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time
import warnings

QUICK = {"n": 1200, "d": 64, "labels": 3, "cs": 3, "folds": 3}


def _positive(text: str) -> int:
    """An argparse type: a whole number >= 1 (argparse then refuses anything else by the option's name)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not positive; give 1 or more")
    return value


def _device(text: str) -> str:
    if text not in ("cpu", "cuda", "auto") and not (text.startswith("cuda:") and text[5:].isdigit()):
        raise argparse.ArgumentTypeError(f"{text!r}: use cpu, cuda, cuda:N or auto")
    return text


def add_arguments(parser) -> None:
    parser.add_argument("--n", type=_positive, default=20000, help="rows (default 20000)")
    parser.add_argument("--d", type=_positive, default=1024, help="feature dims (default 1024)")
    parser.add_argument("--labels", type=_positive, default=10, help="labels, with 2..20 classes (default 10)")
    parser.add_argument("--cs", type=_positive, default=8, help="C values, log-spaced 1e-4..1e2 (default 8)")
    parser.add_argument("--folds", type=_positive, default=5, help="grouped outer folds (default 5)")
    parser.add_argument("--quick", action="store_true",
                        help=f"a small run for tests: {', '.join(f'--{k} {v}' for k, v in QUICK.items())}")
    parser.add_argument("--threads", type=int, default=1,
                        help="threads for BOTH sides (default 1; 0 = every core). On a shared machine more threads "
                             "than idle cores make both sides many times slower, so 1 is the fair default")
    parser.add_argument("--device", type=_device, default="cpu",
                        help="where our solver runs: cpu (default), cuda, cuda:N or auto")
    parser.add_argument("--max-iter", type=_positive, default=100, help="our L-BFGS iterations per fit (default 100)")
    parser.add_argument("--sklearn-max-iter", type=_positive, default=1000,
                        help="scikit-learn's lbfgs iterations per fit (default 1000: on these features it needs "
                             "300-800 to converge at C >= 1, and a fit stopped at 100 is not the same optimum)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-sklearn", action="store_true", help="time ours only (no ratio)")


def class_counts(n_labels: int) -> list[int]:
    """``n_labels`` class counts spread from 2 to 20 (the spread of real probe labels: binary attributes
    up to fine-grained categories)."""
    import numpy as np

    if n_labels < 1:
        raise ValueError(f"--labels {n_labels}: give at least 1")
    return [int(round(k)) for k in np.geomspace(2, 20, n_labels)] if n_labels > 1 else [2]


def make_features(n: int, d: int, classes: list[int], seed: int = 0, rows_per_group: int = 2,
                  dominant: int = 4, signal: float = 0.35):
    """(X (n, d) float32, {label: (n,) int}, groups (n,)) with an encoder-like covariance (see the module
    docstring). Labels are per group (image), so a grouped split never leaks them."""
    import numpy as np

    rng = np.random.default_rng(seed)
    dominant = min(dominant, d // 2)          # tiny test sizes keep directions for the labels
    groups = np.arange(n) // rows_per_group
    n_groups = int(groups[-1]) + 1
    std = (1.0 + np.arange(d)) ** -0.5
    std[:dominant] *= 8.0                     # a few directions dominate the covariance
    Z = rng.standard_normal((n, d), dtype=np.float32) * std.astype(np.float32)
    labels = {}
    for j, k in enumerate(classes):
        y = rng.integers(0, k, n_groups)[groups]
        sub = rng.choice(np.arange(dominant, d), size=min(8, d - dominant), replace=False)
        means = np.zeros((k, d), dtype=np.float32)
        means[:, sub] = rng.standard_normal((k, sub.size)) * signal * std[sub].mean()
        Z += means[y]
        labels[f"y{j}_{k}cls"] = y
    Q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return (Z @ Q.astype(np.float32)).astype(np.float32), labels, groups


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run(args) -> dict:
    import contextlib

    import torch
    # load scikit-learn's OpenMP / BLAS before limiting thread pools: threadpoolctl limits loaded libraries
    import sklearn.linear_model  # noqa: F401
    from threadpoolctl import threadpool_limits

    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    threads = args.threads or os.cpu_count() or 1
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with threadpool_limits(limits=threads) if threads else contextlib.nullcontext():
            return _run(args, threads)
    except ValueError as exc:  # sizes the folds cannot split, an absent CUDA device: one line, status 2
        print(f"fvl bench probe-scale: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        torch.set_num_threads(old)


def sklearn_matrix(X, labels: dict, controls: dict, outer, inner, Cs, max_iter: int, tol: float) -> dict:
    """The reference pipeline: per label and outer fold a GridSearchCV over C on the given inner split,
    scored on the fold's test rows; the control labels fitted at the chosen C. -> {label: {"task": [acc per
    fold], "control": [...], "C": [...]}}."""
    import numpy as np
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def pipe(C: float = 1.0):
        return make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter, tol=tol))

    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for name, y in labels.items():
            res = {"task": [], "control": [], "C": []}
            for (tr, te), (itr, iva) in zip(outer, inner):
                search = GridSearchCV(pipe(), {"logisticregression__C": list(Cs)}, cv=[(itr, iva)], refit=True)
                search.fit(X[tr], y[tr])
                C = float(search.best_params_["logisticregression__C"])
                res["task"].append(float(search.score(X[te], y[te])))
                yc = controls[name]
                res["control"].append(float(pipe(C).fit(X[tr], yc[tr]).score(X[te], yc[te])))
                res["C"].append(C)
            out[name] = {k: np.asarray(v) for k, v in res.items()}
    return out


def _run(args, threads: int) -> dict:
    import numpy as np

    from probes.folds import control_labels, cv_splits
    from probes.linear import probe_matrix, resolve_device

    classes = class_counts(args.labels)
    Cs = [float(c) for c in np.logspace(-4, 2, args.cs)] if args.cs > 1 else [1.0]
    X, labels, groups = make_features(args.n, args.d, classes, args.seed)
    device = resolve_device(args.device)
    tol = 1e-4
    # what probe_matrix derives internally, rebuilt here so scikit-learn sees the very same rows
    names = list(labels)
    controls = {nm: control_labels(labels[nm], groups, args.seed + 101 * (i + 1)) for i, nm in enumerate(names)}
    train, evals, outer = cv_splits(groups, labels[names[0]], args.folds, "inner", args.seed)
    inner = []
    for f, (tr, _) in enumerate(outer):
        pos = np.full(args.n, -1)
        pos[tr] = np.arange(tr.size)
        inner.append((pos[np.flatnonzero(train[args.folds + f])], pos[np.flatnonzero(evals[args.folds + f])]))

    t0 = time.perf_counter()
    matrix = probe_matrix({"x": X}, labels, groups, Cs=Cs, n_folds=args.folds, select="inner", control=True,
                          pca=None, max_iter=args.max_iter, tol=tol, seed=args.seed, device=device,
                          threads=threads, progress=False)
    ours_s = time.perf_counter() - t0
    ours_rss = _peak_rss_mb()
    ours = {nm: {"task": np.asarray(matrix[("x", nm)].score_folds),
                 "control": np.asarray(matrix[("x", nm)].control_folds),
                 "C": np.asarray(matrix[("x", nm)].chosen_C)} for nm in names}
    result = {
        "n": args.n, "d": args.d, "labels": len(names), "classes": classes, "Cs": len(Cs), "folds": args.folds,
        "fits_sklearn": len(names) * args.folds * (len(Cs) + 2),
        "fits_ours": len(names) * 2 * len(Cs) * 2 * args.folds,
        "threads": threads, "device": str(device), "max_iter": args.max_iter,
        "sklearn_max_iter": args.sklearn_max_iter,
        "ours_s": round(ours_s, 3), "peak_rss_ours_mb": round(ours_rss, 1),
        "acc_ours": {nm: round(float(r["task"].mean()), 4) for nm, r in ours.items()},
        "selectivity_ours": {nm: round(float((r["task"] - r["control"]).mean()), 4) for nm, r in ours.items()},
    }
    if not args.no_sklearn:
        t0 = time.perf_counter()
        ref = sklearn_matrix(X, labels, controls, outer, inner, Cs, args.sklearn_max_iter, tol)
        sklearn_s = time.perf_counter() - t0
        diffs = {nm: max(abs(float(ours[nm][k].mean() - ref[nm][k].mean())) for k in ("task", "control"))
                 for nm in names}
        result.update({
            "sklearn_s": round(sklearn_s, 3), "ratio": round(sklearn_s / ours_s, 3),
            "max_acc_diff": round(max(diffs.values()), 4),
            "max_fold_acc_diff": round(max(float(np.abs(ours[nm]["task"] - ref[nm]["task"]).max()) for nm in names), 4),
            "same_C_fraction": round(float(np.mean([np.mean(ours[nm]["C"] == ref[nm]["C"]) for nm in names])), 3),
            "acc_sklearn": {nm: round(float(r["task"].mean()), 4) for nm, r in ref.items()},
        })
        result["goal"] = "ratio >= 5 (CPU) / >= 50 (GPU) at max_acc_diff <= 0.01"
        result["goal_met"] = bool(result["ratio"] >= (50 if device.type == "cuda" else 5)
                                  and result["max_acc_diff"] <= 0.01)
    result["peak_rss_mb"] = round(_peak_rss_mb(), 1)
    return result
