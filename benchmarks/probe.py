"""Linear-probe speed and agreement: our batched torch probes vs scikit-learn LogisticRegression().

Like for like (the headline): the same synthetic features (planted class signal, grouped rows),
the same grouped folds, the same per-fold standardisation and the same C = 1 (scikit-learn's
default); scikit-learn fits one ``LogisticRegression()`` (lbfgs, max_iter=100) per label and
fold, ours solves all labels x folds in one batched L-BFGS. Reported: ``ours_s``, ``sklearn_s``,
``speedup`` (goal >= 10) and ``max_acc_diff`` (largest per-fold accuracy difference, goal <= 0.01).

Also reported: ``ours_full_s``, the wall time of our complete probe matrix (8-value C sweep,
nested C selection, control tasks: many more fits than scikit-learn's single-C run), with
``full_fits`` counting its logistic fits and ``sklearn_full_est_s`` the time scikit-learn would
need for the same fits at its measured mean time per fit (an extrapolation, labelled as such).
"""
from __future__ import annotations

import time
import warnings


def add_arguments(parser) -> None:
    parser.add_argument("--n", type=int, default=2000, help="rows (default 2000)")
    parser.add_argument("--d", type=int, default=256, help="feature dims (default 256)")
    parser.add_argument("--classes", default="2,3,5,8", help="classes per label, comma-separated (default 2,3,5,8)")
    parser.add_argument("--rows-per-group", type=int, default=2, help="rows sharing one image id (default 2)")
    parser.add_argument("--folds", type=int, default=5, help="CV folds (default 5)")
    parser.add_argument("--signal", type=float, default=0.08, help="planted class-mean scale (default 0.08)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-full", action="store_true", help="skip timing the full probe matrix")


def make_data(n: int, d: int, classes: list[int], rows_per_group: int, signal: float, seed: int):
    """Features with a planted linear signal per label; labels are per image (group)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    groups = np.arange(n) // max(1, rows_per_group)
    n_groups = int(groups.max()) + 1
    X = rng.normal(size=(n, d))
    labels = {}
    for k in classes:
        y = rng.integers(0, k, n_groups)[groups]
        X += (rng.normal(size=(k, d)) * signal)[y]
        labels[f"y{k}"] = y
    return X.astype(np.float32), labels, groups


def run(args) -> dict:
    import numpy as np
    import torch
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from probes.linear import grouped_kfold, probe_matrix

    classes = [int(c) for c in str(args.classes).split(",") if c.strip()]
    X, labels, groups = make_data(args.n, args.d, classes, args.rows_per_group, args.signal, args.seed)
    strata = labels[next(iter(labels))]
    folds = grouped_kfold(groups, args.folds, args.seed, strata)  # the folds probe_matrix uses too

    # warm-up both code paths on a tiny problem (first-call costs are not what we compare)
    small = slice(0, 200)
    probe_matrix({"x": X[small]}, {"y": labels[next(iter(labels))][small]}, groups[small], Cs=[1.0],
                 select="cv", control=False, n_folds=2, progress=False, seed=args.seed)
    LogisticRegression().fit(X[:100], labels[next(iter(labels))][:100])

    t0 = time.perf_counter()
    ours = probe_matrix({"x": X}, labels, groups, Cs=[1.0], select="cv", control=False, n_folds=args.folds,
                        pca=None, progress=False, seed=args.seed)
    ours_s = time.perf_counter() - t0

    sk_acc: dict[str, list[float]] = {}
    n_fits = 0
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for name, y in labels.items():
            sk_acc[name] = []
            for tr, te in folds:
                scaler = StandardScaler().fit(X[tr])
                clf = LogisticRegression().fit(scaler.transform(X[tr]), y[tr])
                sk_acc[name].append(float((clf.predict(scaler.transform(X[te])) == y[te]).mean()))
                n_fits += 1
    sklearn_s = time.perf_counter() - t0

    diffs = [abs(a - b) for name in labels for a, b in zip(ours[("x", name)].score_folds, sk_acc[name])]
    result = {
        "comparison": ("same C=1, same grouped folds, same per-fold standardisation: ours = one batched "
                       "L-BFGS over all labels x folds; sklearn = LogisticRegression() (lbfgs, max_iter=100) "
                       "per label and fold"),
        "n": args.n, "d": args.d, "classes": classes, "folds": args.folds,
        "torch_threads": torch.get_num_threads(),
        "ours_s": round(ours_s, 4),
        "sklearn_s": round(sklearn_s, 4),
        "speedup": round(sklearn_s / ours_s, 2),
        "max_acc_diff": round(max(diffs), 4),
        "mean_acc_ours": {k: round(ours[("x", k)].score_mean, 4) for k in labels},
        "mean_acc_sklearn": {k: round(float(np.mean(v)), 4) for k, v in sk_acc.items()},
        "goal": "speedup >= 10 and max_acc_diff <= 0.01",
    }
    result["goal_met"] = bool(result["speedup"] >= 10 and result["max_acc_diff"] <= 0.01)
    if not args.no_full:
        t0 = time.perf_counter()
        full = probe_matrix({"x": X}, labels, groups, n_folds=args.folds, progress=False, seed=args.seed)
        ours_full_s = time.perf_counter() - t0
        n_cs = len(full.settings["Cs"])
        fits = n_cs * len(labels) * 2 * args.folds * 2  # C x labels x (task, control) x (outer, inner)
        result.update({
            "ours_full_s": round(ours_full_s, 3),
            "full_fits": fits,
            "full_desc": f"{n_cs} C values x {len(labels)} labels x (task + control) x {args.folds} outer "
                         f"+ {args.folds} inner splits",
            "sklearn_full_est_s": round(sklearn_s / n_fits * fits, 1),
            "sklearn_full_est_note": "extrapolated from sklearn's measured mean time per fit at C=1, not run",
            "full_acc": {k: round(full[("x", k)].score_mean, 4) for k in labels},
            "full_selectivity": {k: round(full[("x", k)].selectivity_mean, 4) for k in labels},
        })
    return result
