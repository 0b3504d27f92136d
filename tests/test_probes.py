"""Linear probes, CKA, PCA-RGB / embeddings, Shapley values and plots (tiny sizes, fast)."""
from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest

from probes.contributions import shapley_from_table, shapley_values
from probes.folds import control_labels, cv_splits, detect_task, grouped_kfold
from probes.linear import probe, probe_matrix
from probes.projection import embed_2d, otsu_threshold, pca_rgb, pca_rgb_many
from probes.similarity import cka, cka_matrix, difference_maps, minibatch_cka, split_global, token_cosine_map

FAST = dict(Cs=(0.01, 0.1, 1.0), n_folds=4, progress=False)


def planted(n=240, d=16, k=3, strength=3.0, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    X = rng.normal(size=(n, d))
    X[np.arange(n), y] += strength
    return X, y


# --------------------------------------------------------------------------- linear probes
def test_planted_signal_is_found_and_shuffled_labels_stay_at_chance():
    X, y = planted()
    r = probe(X, y, **FAST)
    assert r.task == "classification" and r.metric == "accuracy"
    assert r.score_mean > 0.9
    assert r.selectivity_mean > 0.4          # control labels are random per row: the probe cannot fit them
    shuffled = np.random.default_rng(1).permutation(y)
    s = probe(X, shuffled, **FAST)
    assert abs(s.score_mean - 1 / 3) < 0.12
    assert abs(s.selectivity_mean) < 0.15


def test_memorising_identity_has_no_selectivity():
    # 24 types (e.g. object identities) seen in several images each; the feature is the type's one-hot,
    # the label a function of the type. The probe solves task AND control by memorising types.
    rng = np.random.default_rng(0)
    n_types, n = 24, 240
    types = rng.permutation(np.arange(n) % n_types)
    X = np.eye(n_types)[types] + 0.05 * rng.normal(size=(n, n_types))
    y = types % 3
    r = probe(X, y, groups=np.arange(n), types=types, Cs=(1.0, 10.0), n_folds=4, progress=False)
    assert r.score_mean > 0.95
    assert r.control_mean > 0.95
    assert abs(r.selectivity_mean) < 0.06
    # a feature that encodes the label itself, not the type, IS selective
    Xl = np.eye(3)[y] * 3 + rng.normal(size=(n, 3))
    r2 = probe(Xl, y, groups=np.arange(n), types=types, Cs=(1.0, 10.0), n_folds=4, progress=False)
    assert r2.selectivity_mean > 0.3


def test_control_labels_are_constant_per_type_and_keep_the_label_set():
    y = np.array(["a", "b", "c", "a", "b", "c", "a", None], dtype=object)
    types = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    c = control_labels(y, types, seed=3)
    for t in np.unique(types):
        vals = {v for v, tt in zip(c, types) if tt == t and v is not None}
        assert len(vals) <= 1
    assert set(v for v in c if v is not None) <= {"a", "b", "c"}
    assert c[-1] is None
    assert np.array_equal(c, control_labels(y, types, seed=3))


def test_grouped_folds_never_split_a_group():
    rng = np.random.default_rng(0)
    groups = rng.integers(0, 37, 400)
    strata = rng.integers(0, 3, 400)
    folds = grouped_kfold(groups, 5, seed=2, strata=strata)
    seen = np.zeros(400, int)
    for tr, te in folds:
        assert not set(groups[tr]) & set(groups[te])
        seen[te] += 1
    assert np.all(seen == 1)
    assert [list(te) for _, te in folds] == [list(te) for _, te in grouped_kfold(groups, 5, seed=2, strata=strata)]
    train, evals, _ = cv_splits(groups, strata, 5, "inner", 0)
    for s in range(train.shape[0]):
        assert not set(groups[train[s]]) & set(groups[evals[s]])
    for f in range(5):  # inner split f lies inside outer fold f's training rows
        assert np.all(train[f] | ~(train[5 + f] | evals[5 + f]))
    with pytest.raises(ValueError, match="groups"):
        grouped_kfold(np.array([0, 0, 1, 1]), 3)


def test_grouped_folds_put_each_group_in_the_least_loaded_fold():
    """The fold rule the docstring states, checked step by step: walking the groups in the order
    grouped_kfold visits them, each lands in the fold with the fewest rows so far (lowest index on
    ties), so fold sizes differ by at most the largest group."""
    rng = np.random.default_rng(3)
    groups = rng.integers(0, 90, 700)                 # uneven group sizes
    folds = grouped_kfold(groups, 4, seed=1)
    fold_of_row = np.empty(700, int)
    for f, (_, te) in enumerate(folds):
        fold_of_row[te] = f
    uniq, sizes = np.unique(groups, return_counts=True)
    fold_of_group = {g: fold_of_row[np.flatnonzero(groups == g)[0]] for g in uniq}
    # the visiting order: shuffled with the seed, then stably by size, largest first
    order = np.random.default_rng(1).permutation(uniq.size)
    order = order[np.argsort(-sizes[order], kind="stable")]
    load = np.zeros(4, int)
    for i in order:
        assert fold_of_group[uniq[i]] == int(np.argmin(load)), (i, load)
        load[fold_of_group[uniq[i]]] += sizes[i]
    assert load.max() - load.min() <= sizes.max()


def test_regression_recovers_planted_linear_target():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 12))
    y = X @ rng.normal(size=12) + 0.05 * rng.normal(size=200)
    r = probe(X, y, **FAST)
    assert r.task == "regression" and r.metric == "r2"
    assert r.score_mean > 0.97
    assert r.confusion is None and r.selectivity_mean > 0.8


def test_task_detection_and_override():
    assert detect_task(np.array(["red", "blue"])) == "classification"
    assert detect_task(np.array([True, False])) == "classification"
    assert detect_task(np.array([0, 1, 2, 1])) == "classification"
    assert detect_task(np.array([0.0, 1.0, 2.0])) == "classification"
    assert detect_task(np.linspace(0, 1, 50)) == "regression"
    assert detect_task(np.arange(100)) == "regression"
    X, y = planted(k=2)
    r = probe(X, y.astype(float), tasks={"y": "regression"}, **FAST)
    assert r.task == "regression"


def test_matrix_outputs_confusion_missing_labels_and_pca():
    X, y = planted(n=200, d=24)
    names = np.array(["cat", "dog", "emu"])[y].astype(object)
    names[:10] = None                       # missing labels are left out, not guessed
    rng = np.random.default_rng(0)
    feats = {"good": X, "noise": rng.normal(size=X.shape)}
    m = probe_matrix(feats, {"animal": names, "size": X[:, 0] * 2 + 0.1 * rng.normal(size=200)},
                     pca=8, select="inner", **FAST)
    good = m[("good", "animal")]
    assert good.n == 190 and good.dim == 8 and good.pca_explained is not None
    assert good.classes == ["cat", "dog", "emu"]
    conf = np.array(good.confusion)
    assert conf.shape == (3, 3) and conf.sum() == 190
    assert good.score_mean > m[("noise", "animal")].score_mean + 0.3
    assert len(good.curve_mean) == 3 and len(good.chosen_C) == 4
    d = json.loads(m.to_json())
    assert {(r["tap"], r["label"]) for r in d["results"]} == {(t, l) for t in feats for l in ("animal", "size")}
    again = type(m).from_dict(d)
    assert again[("good", "size")].score_mean == m[("good", "size")].score_mean
    md = m.to_markdown()
    assert "| good |" in md and "sel" in md
    assert m.table().shape == (2, 2)


def test_batched_solver_matches_sklearn_at_the_same_C():
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    for k in (2, 4):
        X, y = planted(n=300, d=10, k=k, strength=1.0, seed=k)
        groups = np.arange(300)
        r = probe(X, y, groups, Cs=(1.0,), select="cv", control=False, n_folds=3, progress=False)
        # one batch for the class count, holding the 3 folds' problems
        assert list(r.solver["by_classes"]) == [str(k)] and r.solver["by_classes"][str(k)]["problems"] == 3
        folds = grouped_kfold(groups, 3, 0, y)
        for f, (tr, te) in enumerate(folds):
            sc = StandardScaler().fit(X[tr])
            with threadpool_limits(1):  # tiny fits: thread pools only add contention
                clf = LogisticRegression().fit(sc.transform(X[tr]), y[tr])
            acc = (clf.predict(sc.transform(X[te])) == y[te]).mean()
            assert abs(acc - r.score_folds[f]) <= 0.01


def _two_loop_direction(pairs, g, gamma):
    """Textbook L-BFGS two-loop recursion (Nocedal and Wright, Algorithm 7.4), H0 = gamma I,
    for one problem; ``pairs`` oldest first."""
    q, alphas = g.clone(), []
    for s, y in reversed(pairs):
        a = (s @ q) / (s @ y)
        q -= a * y
        alphas.append(a)
    r = gamma * q
    for (s, y), a in zip(pairs, reversed(alphas)):
        r += (a - (y @ r) / (s @ y)) * s
    return -r


def test_batched_lbfgs_memory_gives_each_problem_its_own_direction():
    """The solver's batched memory (a ring buffer where each problem may reject a pair) gives, per
    problem, the textbook two-loop direction over the pairs that problem kept among the last m."""
    import torch

    from probes.lbfgs import _Memory

    torch.manual_seed(0)
    P, N, m = 3, 7, 4
    mem = _Memory(P, N, m, torch.float64)
    hess = []
    for _ in range(P):
        a = torch.randn(N, N, dtype=torch.float64)
        hess.append(a @ a.T + N * torch.eye(N, dtype=torch.float64))   # y = H s, so s.y > 0
    pushes: list[list] = [[] for _ in range(P)]
    for step in range(9):                                                # wraps the ring of 4 twice
        s = torch.randn(P, N, dtype=torch.float64)
        y = torch.stack([hess[i] @ s[i] for i in range(P)])
        keep = torch.tensor([True, step % 3 != 1, step == 0])           # problem 2: one early pair only
        mem.push(s, y, keep)
        g = torch.randn(P, N, dtype=torch.float64)
        d = mem.direction(g)
        for i in range(P):
            pushes[i].append((s[i], y[i], bool(keep[i])))
            window = [(si, yi) for si, yi, k in pushes[i][-m:] if k]
            ever = [(si, yi) for si, yi, k in pushes[i] if k]
            gamma = (ever[-1][0] @ ever[-1][1]) / (ever[-1][1] @ ever[-1][1]) if ever else 1.0
            assert torch.allclose(d[i], _two_loop_direction(window, g[i], gamma), atol=1e-10), (step, i)


def test_preconditioning_changes_the_path_not_the_solution():
    """On correlated features (a wide covariance spectrum, as real features have) the preconditioned
    solver reaches the same fits - the same predictions as scikit-learn - in fewer iterations;
    on isotropic features 'auto' leaves it off."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(0)
    n, d = 400, 24
    y = rng.integers(0, 3, n)
    shared = rng.normal(size=(n, 3)) @ rng.normal(size=(3, d)) * 3  # a few dominant directions ...
    X = shared + 0.3 * rng.normal(size=(n, d)) + 0.3 * rng.normal(size=(3, d))[y]  # ... a small class signal
    groups = np.arange(n)
    runs = {pre: probe(X, y, groups, Cs=(1.0,), select="cv", control=False, n_folds=3, progress=False,
                       precondition=pre) for pre in (False, True, "auto")}
    assert runs[True].solver["preconditioned"] and runs["auto"].solver["preconditioned"]
    assert not runs[False].solver["preconditioned"]
    assert 2 * runs[True].solver["n_iter"][0] < runs[False].solver["n_iter"][0]
    assert runs[True].solver["converged"][0] == 1.0
    assert runs["auto"].score_folds == runs[True].score_folds
    for f, (tr, te) in enumerate(grouped_kfold(groups, 3, 0, y)):
        sc = StandardScaler().fit(X[tr])
        with threadpool_limits(1):
            clf = LogisticRegression(max_iter=5000).fit(sc.transform(X[tr]), y[tr])
        acc = (clf.predict(sc.transform(X[te])) == y[te]).mean()
        assert abs(acc - runs[True].score_folds[f]) <= 0.01
    iso, iso_y = planted(n=300, d=10, k=3, strength=1.0, seed=3)
    assert not probe(iso, iso_y, np.arange(300), Cs=(1.0,), select="cv", control=False, n_folds=3,
                     progress=False).solver["preconditioned"]
    with pytest.raises(ValueError, match="precondition"):
        probe(iso, iso_y, np.arange(300), precondition="yes", progress=False)


def test_bad_inputs_name_the_problem():
    X, y = planted(n=50)
    with pytest.raises(ValueError, match=r"labels\['y'\]"):
        probe_matrix({"x": X}, {"y": y[:40]}, progress=False)
    with pytest.raises(ValueError, match="NaN"):
        probe_matrix({"x": np.full((50, 3), np.nan)}, {"y": y}, progress=False)
    with pytest.raises(ValueError, match="select"):
        probe_matrix({"x": X}, {"y": y}, select="best", progress=False)


# --------------------------------------------------------------------------- similarity
def test_cka_invariances():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(80, 12))
    Q, _ = np.linalg.qr(rng.normal(size=(12, 12)))
    for debiased in (False, True):
        assert cka(X, X, debiased) == pytest.approx(1.0, abs=1e-9)
        assert cka(X, 3.7 * X @ Q, debiased) == pytest.approx(1.0, abs=1e-9)
        assert cka(X, X * np.linspace(0.1, 4.0, 12), debiased) < 0.95
    Y = rng.normal(size=(80, 7))
    assert cka(X, Y) == pytest.approx(cka(Y, X))
    wide = rng.normal(size=(30, 100))      # n < d takes the Gram-matrix route
    assert cka(wide, wide @ np.linalg.qr(rng.normal(size=(100, 100)))[0]) == pytest.approx(1.0, abs=1e-9)
    names, M = cka_matrix({"a": X, "b": X @ Q, "c": Y})
    assert names == ["a", "b", "c"] and np.allclose(M, M.T) and np.allclose(np.diag(M), 1.0)
    assert M[0, 1] == pytest.approx(1.0) and M[0, 2] == pytest.approx(cka(X, Y))
    _, Md = cka_matrix({"a": X, "c": Y}, debiased=True)
    assert Md[0, 1] == pytest.approx(cka(X, Y, debiased=True))
    big = rng.normal(size=(600, 8))
    assert minibatch_cka(big, big @ np.linalg.qr(rng.normal(size=(8, 8)))[0], 100) == pytest.approx(1.0, abs=1e-9)
    assert abs(minibatch_cka(big, rng.normal(size=(600, 8)), 100)) < 0.05
    with pytest.raises(ValueError, match="rows"):
        cka(X, Y[:10])


def test_token_maps_and_difference_maps():
    rng = np.random.default_rng(0)
    t = rng.normal(size=(17, 6))                 # 4x4 patches + global token first
    g, p = split_global(t)
    assert g.shape == (6,) and p.shape == (4, 4, 6) and np.array_equal(p[0, 0], t[1])
    assert split_global(t[1:])[0] is None
    assert split_global(rng.normal(size=(2 * 3 + 1, 6)), grid=(2, 3))[1].shape == (2, 3, 6)
    cos = token_cosine_map(t, -t)
    assert cos.shape == (4, 4) and np.allclose(cos, -1)
    other = t.copy()
    other[1 + 5] = rng.normal(size=6)            # change one patch (row 1, col 1)
    maps = difference_maps({"depth": t, "caption": other, "ocr": 2 * t}, metric="distance")
    assert set(maps) == {"caption", "ocr"}
    assert np.allclose(maps["ocr"], 0) and maps["caption"][1, 1] > 0.01
    assert np.count_nonzero(maps["caption"] > 1e-9) == 1
    with pytest.raises(ValueError, match="grid"):
        split_global(rng.normal(size=(7, 3)))


# --------------------------------------------------------------------------- projections
def _planted_map(seed=0, h=10, w=12, D=16):
    rng = np.random.default_rng(seed)
    fg = np.zeros((h, w), bool)
    fg[2:6, 3:8] = True
    t = 0.3 * rng.normal(size=(h * w, D))
    t[fg.ravel()] += 4 * rng.normal(size=D)
    t[fg.ravel(), :3] += rng.normal(size=(fg.sum(), 3))
    return np.concatenate([rng.normal(size=(1, D)), t]), fg


def test_pca_rgb_finds_planted_foreground():
    tokens, fg = _planted_map()
    r = pca_rgb(tokens, grid=(10, 12))
    assert r.rgb.shape == (10, 12, 3) and r.rgb.dtype == np.uint8
    assert (r.mask == fg).mean() > 0.97
    assert np.all(r.rgb[~r.mask] == 0) and r.rgb[r.mask].max() == 255
    assert "minority" in r.rule and r.threshold is not None
    flipped = pca_rgb(-tokens, grid=(10, 12))    # PC1 sign flips; the minority rule keeps the same mask
    assert np.array_equal(flipped.mask, r.mask)
    none = pca_rgb(tokens, grid=(10, 12), background="none")
    assert none.mask.all()
    t2, fg2 = _planted_map(seed=1)
    both = pca_rgb_many({"a": tokens, "b": t2}, grid=(10, 12))
    assert set(both) == {"a", "b"} and both["a"].threshold == both["b"].threshold
    assert (both["a"].mask == fg).mean() > 0.9
    assert otsu_threshold(np.r_[np.zeros(50), np.ones(50)]) == pytest.approx(0.5, abs=0.01)


def test_embedding_fallback_and_seeded_umap(monkeypatch):
    rng = np.random.default_rng(0)
    small = embed_2d(rng.normal(size=(8, 5)))
    assert small.method == "pca" and "fallback" in small.reason and small.coords.shape == (8, 2)
    calls = {}

    class FakeUMAP:  # real UMAP needs ~1 min of numba compilation; check the wiring only
        def __init__(self, **kw):
            calls.update(kw)

        def fit_transform(self, Z):
            calls["dims"] = Z.shape[1]
            return Z[:, :2]

    monkeypatch.setitem(sys.modules, "umap", types.SimpleNamespace(UMAP=FakeUMAP))
    e = embed_2d(rng.normal(size=(40, 80)), seed=7, pre_pca=10)
    assert e.method == "umap" and e.coords.shape == (40, 2)
    assert calls["random_state"] == 7 and calls["n_components"] == 2 and calls["dims"] == 10


# --------------------------------------------------------------------------- Shapley
def test_shapley_two_players_by_hand_and_efficiency():
    v = {frozenset(): 1.0, frozenset({"depth"}): 3.0, frozenset({"ocr"}): 2.0, frozenset({"depth", "ocr"}): 6.0}
    r = shapley_values(["depth", "ocr"], v.__getitem__)
    # phi_depth = 1/2 (3 - 1) + 1/2 (6 - 2) = 3; phi_ocr = 1/2 (2 - 1) + 1/2 (6 - 3) = 2
    assert r["depth"] == pytest.approx(3.0) and r["ocr"] == pytest.approx(2.0)
    assert r.full == 6.0 and r.empty == 1.0 and r.efficiency_gap == pytest.approx(0.0)
    rng = np.random.default_rng(0)
    players = ["depth", "caption", "ocr", "grounding"]
    table = {}
    calls = []

    def metric(s):
        calls.append(s)
        return table.setdefault(s, float(rng.normal()))

    res = shapley_values(players, metric)
    assert len(calls) == 16 == len(set(calls)) == res.evaluations
    assert sum(res.values()) == pytest.approx(res.full - res.empty)
    again = shapley_from_table({"+".join(sorted(s)): val for s, val in table.items()}, players)
    assert dict(again) == pytest.approx(dict(res))
    with pytest.raises(ValueError, match="missing"):
        shapley_from_table({frozenset(): 0.0, frozenset({"a"}): 1.0, frozenset({"a", "b"}): 2.0})


# --------------------------------------------------------------------------- plots
def test_plots_render(tmp_path):
    from probes import plots
    from probes.contributions import shapley_values

    X, y = planted(n=120, d=6)
    m = probe_matrix({"a": X, "b": X[:, ::-1] * 0.1}, {"y": y, "r": X[:, 0]}, Cs=(0.1, 1.0), n_folds=3,
                     select="cv", progress=False)
    tokens, _ = _planted_map()
    rgb = pca_rgb_many([tokens, tokens * 1.1], grid=(10, 12))
    img = np.random.default_rng(0).integers(0, 255, (40, 48, 3)).astype(np.uint8)
    figs = {
        "matrix": plots.plot_probe_matrix(m),
        "curve": plots.plot_regularisation_curve([m[("a", "y")], m[("b", "r")]]),
        "confusion": plots.plot_confusion(m[("a", "y")]),
        "cka": plots.plot_cka_matrix(*cka_matrix({"a": X, "b": X[:, :3]})),
        "pca_grid": plots.plot_pca_rgb_grid([rgb, rgb], ["img0", "img1"], ["depth", "caption"], images=[img, img]),
        "diff": plots.plot_difference_maps({"caption": np.random.rand(4, 4), "ocr": np.random.rand(4, 4)}, image=img),
        "umap_cat": plots.plot_embedding(embed_2d(X, method="pca"), labels=np.array(["x", "y", "z"])[y]),
        "umap_cont": plots.plot_embedding(X[:, :2], labels=X[:, 3]),
        "shapley": plots.plot_shapley(shapley_values(["a", "b"], lambda s: float(len(s)))),
        "losses": plots.plot_loss_curves({"depth": [3, 2, 1.5], "caption": [3, 2.5, 1]}, log_y=True),
        "overlay": plots.plot_attribution_overlay(img, np.random.rand(5, 6)),
        "pck": plots.plot_pck_bars({"stage2": {"pck": 0.8, "pck_flip": 0.85, "untrained": {"pck": 0.01}}, "depth": 0.5}),
    }
    for name, fig in figs.items():
        path = plots.save(fig, tmp_path / "sub" / f"{name}.png", dpi=50)
        assert path.stat().st_size > 500, name
    with pytest.raises(ValueError, match="regression"):
        plots.plot_confusion(m[("a", "r")])


def test_newton_start_lands_near_the_optimum_of_a_nearly_quadratic_problem():
    """The solver's fresh start (one Newton step from the class prior, Kronecker-factored Hessian)
    reaches the optimum a start from zero reaches, in at most half the iterations when the problem is
    nearly quadratic (strong penalty), for binary and multinomial targets."""
    import torch

    from probes.lbfgs import batched_lbfgs
    from probes.solver import logistic_bucket, make_design

    for k in (2, 4):
        X, y = planted(n=400, d=12, k=k, strength=1.0, seed=k)
        train = torch.zeros(2, 400, dtype=torch.bool)
        train[0, :300], train[1, 100:] = True, True
        design = make_design(torch.tensor(X, dtype=torch.float64), train, None, precondition=False)
        targets = torch.tensor(y).unsqueeze(0)
        pb = logistic_bucket(design, targets, torch.ones_like(targets, dtype=torch.bool), k,
                             torch.tensor([1e-3], dtype=torch.float64))
        zero = torch.zeros(pb.P, pb.K, 13, dtype=torch.float64)
        optimum, _ = batched_lbfgs(pb.fun, zero, tol=1e-7)                  # the reference, tightly converged
        from_zero, info0 = batched_lbfgs(pb.fun, zero)                       # the default tolerance, 1e-4
        from_newton, info1 = batched_lbfgs(pb.fun, pb.newton_start())
        assert info0["converged"] == info1["converged"] == 1.0
        def identified(theta):  # multinomial intercepts are defined up to a common shift (unpenalised)
            b = theta[..., -1]
            return torch.cat([theta[..., :-1].flatten(1), b - b.mean(1, keepdim=True) if b.shape[1] > 1 else b], 1)

        assert torch.allclose(identified(from_newton), identified(optimum), atol=1e-3)
        assert torch.allclose(identified(from_zero), identified(optimum), atol=1e-3)
        assert torch.equal(pb.predict(from_newton), pb.predict(optimum))
        assert 2 * info1["n_iter"] <= info0["n_iter"], (k, info1, info0)


def test_lbfgs_keeps_learning_curvature_near_the_optimum():
    """Curvature pairs are accepted by a test relative to their scale: near an optimum, where steps are
    tiny, an absolute floor on s.y would reject them all and the solver would crawl (it took 72
    iterations, unconverged, for this 4-class problem at tol 1e-8 before; L-BFGS needs under 30)."""
    import torch

    from probes.lbfgs import batched_lbfgs
    from probes.solver import logistic_bucket, make_design

    X, y = planted(n=400, d=12, k=4, strength=1.0, seed=4)
    train = torch.ones(1, 400, dtype=torch.bool)
    design = make_design(torch.tensor(X, dtype=torch.float64), train, None, precondition=False)
    targets = torch.tensor(y).unsqueeze(0)
    pb = logistic_bucket(design, targets, torch.ones_like(targets, dtype=torch.bool), 4,
                         torch.tensor([1e-3], dtype=torch.float64))
    _, info = batched_lbfgs(pb.fun, torch.zeros(pb.P, pb.K, 13, dtype=torch.float64), tol=1e-8)
    assert info["converged"] == 1.0 and info["n_iter"] < 30, info


# --------------------------------------------------------------------------- the estimator
def test_linear_probe_estimator_matches_sklearn_and_is_reusable(tmp_path):
    from sklearn.base import clone
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from probes.estimator import LinearProbe

    rng = np.random.default_rng(0)
    for k in (2, 4):
        X, y = planted(n=300, d=12, k=k, strength=1.5, seed=k)
        X = X * np.arange(1, 13) + 5.0                      # unequal scales and an offset: standardisation matters
        ours = LinearProbe(C=0.5, max_iter=500, tol=1e-6).fit(X, np.array(["lo", "mid", "hi", "top"])[y])
        ref = make_pipeline(StandardScaler(), LogisticRegression(C=0.5, max_iter=5000, tol=1e-8)).fit(
            X, np.array(["lo", "mid", "hi", "top"])[y])
        assert list(ours.classes_) == list(ref.classes_) and ours.coef_.shape == (1 if k == 2 else k, 12)
        np.testing.assert_allclose(ours.predict_proba(X), ref.predict_proba(X), atol=2e-3)
        assert (ours.predict(X) == ref.predict(X)).mean() >= 0.99
        assert ours.score(X, ref.predict(X)) >= 0.99
    # scikit-learn's machinery works on it, and a saved probe predicts the same after loading
    assert clone(ours).get_params()["C"] == 0.5
    assert cross_val_score(LinearProbe(C=1.0), X, y, cv=3).mean() > 0.5
    loaded = LinearProbe.load(ours.save(tmp_path / "probe"))
    np.testing.assert_array_equal(loaded.predict(X), ours.predict(X))
    with pytest.raises(ValueError, match="1 class"):
        LinearProbe().fit(X, np.zeros(len(X)))
    with pytest.raises(ValueError, match="features"):
        ours.decision_function(X[:, :5])


def test_probe_matrix_device_choice_and_progress(capsys):
    import torch

    from probes.linear import resolve_device

    X, y = planted(n=120, d=8)
    r = probe(X, y, device="auto", **FAST)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert r.solver["device"].startswith(expected)
    assert resolve_device("cpu").type == "cpu"
    if torch.cuda.is_available():   # float32 on the GPU: the same accuracy as the CPU
        cpu = probe(X, y, device="cpu", **FAST)
        assert abs(cpu.score_mean - r.score_mean) <= 0.01
    else:
        with pytest.raises(ValueError, match="CUDA device"):
            resolve_device("cuda")
    with pytest.raises(ValueError, match="device 'tpu'"):
        resolve_device("tpu")


def test_token_maps_are_pooled_as_at_capture_time():
    """probe_matrix pools stored token maps with model.tokens.to_vectors: the global token is left out of
    the mean exactly when the tap has one."""
    from model.tokens import to_vectors

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 80)
    tokens = rng.normal(size=(80, 5, 6)).astype(np.float32)
    tokens[:, 0, 0] += 12.0 * y                 # the label lives in the global token only
    kw = dict(Cs=(1.0,), n_folds=4, progress=False, control=False)
    with_global = probe_matrix({"t": tokens}, {"y": y}, has_global=False, **kw)[("t", "y")]
    without = probe_matrix({"t": tokens}, {"y": y}, has_global={"t": True}, **kw)[("t", "y")]
    assert with_global.score_mean > 0.9 and without.score_mean < 0.75
    np.testing.assert_allclose(to_vectors(tokens, has_global=True), tokens[:, 1:].mean(1), rtol=1e-6)
