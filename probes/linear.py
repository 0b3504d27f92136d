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

Speed: all splits x targets (labels and their controls) of one tap are solved as ONE batched
problem per C, walking the C grid upwards with warm starts (``path="warm"``; ``"joint"`` solves
every C at once). Multinomial logistic regression, objective per problem
``mean_i CE_i + ||W||^2 / (2 C n_train)`` (the same optimum as scikit-learn's
``C * sum_i CE_i + ||W||^2 / 2``), is minimised by a batched L-BFGS in torch in which every
problem keeps its own curvature history, step size and stopping test, and converged problems
drop out of the batch. Without PCA the per-split standardisation is folded into the weights,
so one centred copy of X serves every split and the data term is a single wide matrix product
per iteration. Binary targets use one logit (like scikit-learn); targets with different class
counts share the optimiser but not padded logits. On features whose covariance is far from
isotropic (real features: a few directions dominate) the solver is preconditioned with that
covariance (``precondition="auto"``), which changes the path to the optimum, not the optimum.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

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
    fold_of_group = np.empty(uniq.size, dtype=np.int64)
    load = np.zeros(n_splits, dtype=np.int64)
    for g in order:
        f = int(np.argmin(load))
        fold_of_group[g] = f
        load[f] += sizes[g]
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


# --------------------------------------------------------------------------- batched L-BFGS
def batched_lbfgs(fun: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                  theta: torch.Tensor, *, max_iter: int = 100, tol: float = 1e-4, memory: int = 10,
                  max_ls: int = 25) -> tuple[torch.Tensor, dict]:
    """Minimise P independent smooth problems stacked along dim 0 of ``theta`` (P, ...).

    ``fun(theta_sub, idx) -> (f, g)`` evaluates only the problems ``idx`` (a LongTensor; ``theta_sub``
    is ``theta[idx]``) and returns their values (len(idx),) and gradients shaped like theta_sub.
    Every problem has its own L-BFGS history, Armijo backtracking step and stopping test
    (max |g| <= tol, or no measurable decrease at this precision); converged problems drop out
    of the batch, so each iteration only pays for the problems still moving. ``fun`` may return a
    third value, the per-problem max |gradient| the stopping test should use instead of max |g|
    (a preconditioned problem reports the gradient of the original parameters).
    """
    P = theta.shape[0]
    shape = theta.shape
    x = theta.reshape(P, -1).clone()
    ftol = 10 * torch.finfo(x.dtype).eps
    everyone = torch.arange(P)

    def evaluate(th: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = fun(th, idx)
        gr = out[1].reshape(len(idx), -1)
        return out[0], gr, (out[2] if len(out) > 2 else gr.abs().amax(1))

    f, g, gnorm = evaluate(theta, everyone)
    g = g.clone()
    m = x.shape[1]
    S_h = torch.zeros(memory, P, m, dtype=x.dtype)
    Y_h = torch.zeros(memory, P, m, dtype=x.dtype)
    R_h = torch.zeros(memory, P, dtype=x.dtype)   # rho = 1 / s.y; 0 marks an empty or skipped slot
    gamma = torch.ones(P, dtype=x.dtype)
    first = torch.ones(P, dtype=torch.bool)
    active = gnorm > tol
    n_iter = evals = 0
    for n_iter in range(1, max_iter + 1):
        A = torch.nonzero(active).squeeze(1)
        if A.numel() == 0:
            n_iter -= 1
            break
        gA, xA, fA = g[A], x[A], f[A]
        used = min(n_iter - 1, memory)
        slots = [(n_iter - 2 - j) % memory for j in range(used)]  # newest first
        everyone_active = A.numel() == P   # then plain views, no gathers

        def hist(j: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            if everyone_active:
                return S_h[j], Y_h[j], R_h[j]
            return S_h[j, A], Y_h[j, A], R_h[j, A]

        q = gA.clone()
        alphas = []
        pairs = [hist(j) for j in slots]
        for s_j, y_j, r_j in pairs:
            a = r_j * (s_j * q).sum(1)
            q -= a.unsqueeze(1) * y_j
            alphas.append(a)
        q *= gamma[A].unsqueeze(1)
        for (s_j, y_j, r_j), a in zip(reversed(pairs), reversed(alphas)):
            b = r_j * (y_j * q).sum(1)
            q += (a - b).unsqueeze(1) * s_j
        d = -q
        gd = (gA * d).sum(1)
        bad = gd >= 0  # not a descent direction (numerical trouble): steepest descent instead
        if bool(bad.any()):
            d[bad] = -gA[bad]
            gd = (gA * d).sum(1)
        # a problem's first step has unit max-norm (as scipy's L-BFGS-B does)
        t = torch.where(first[A], 1.0 / gA.abs().amax(1).clamp_min(1e-12), torch.ones_like(fA)).clamp(max=1.0)
        x_new, f_new, g_new, n_new = xA.clone(), fA.clone(), gA.clone(), gnorm[A].clone()
        todo = torch.arange(A.numel())
        for _ in range(max_ls):
            xt = xA[todo] + t[todo].unsqueeze(1) * d[todo]
            ft, gt, nt = evaluate(xt.view(-1, *shape[1:]), A[todo])
            evals += 1
            ok = ft <= fA[todo] + 1e-4 * t[todo] * gd[todo]
            x_new[todo[ok]], f_new[todo[ok]], g_new[todo[ok]], n_new[todo[ok]] = xt[ok], ft[ok], gt[ok], nt[ok]
            todo = todo[~ok]
            if todo.numel() == 0:
                break
            t[todo] *= 0.5
        stuck = torch.zeros(A.numel(), dtype=torch.bool)
        stuck[todo] = True          # no decrease found: the problem stays where it is and stops
        s = x_new - xA
        y = g_new - gA
        sy = (s * y).sum(1)
        good = (sy > 1e-10) & ~stuck
        slot = (n_iter - 1) % memory
        S_h[slot, A] = s
        Y_h[slot, A] = y
        R_h[slot] = 0.0
        R_h[slot, A] = torch.where(good, 1.0 / sy.clamp_min(1e-10), torch.zeros_like(sy))
        gamma[A] = torch.where(good, sy / (y * y).sum(1).clamp_min(1e-20), gamma[A])
        flat = (fA - f_new).abs() <= ftol * fA.abs().clamp_min(1.0)
        first[A] = False
        x[A], f[A], g[A], gnorm[A] = x_new, f_new, g_new, n_new
        active[A] = ~stuck & ~flat & (n_new > tol)
    info = {"n_iter": int(n_iter), "evals": int(evals),
            "converged": float((gnorm <= tol).float().mean())}
    return x.view(shape), info


# --------------------------------------------------------------------------- split preparation
@dataclass
class _Design:
    """The features each split sees: standardised with that split's train statistics and
    (optionally) projected on its train PCA basis. The solver works on flattened problems
    (one per split x target x C) and only asks for products of the features with a stack of
    per-problem weights, so the storage follows what is cheapest:

    * ``shared`` (no PCA): one centred copy of X (n, d) for every split; the standardisation is
      folded into the weights, so a solver step is ONE wide matrix product X @ (d, P*K) that
      stays in cache; rows outside a problem's training set get weight 0.
    * ``packed`` (PCA): each split's projected training rows (S, m, p), padded to the largest
      split; one matrix product per split.
    """
    x: torch.Tensor              # (n, d) globally centred features
    mu: torch.Tensor             # (S, d) train means
    inv_sd: torch.Tensor         # (S, d) 1 / train std (0 for constant features)
    train: torch.Tensor          # (S, n) bool
    basis: torch.Tensor | None   # (S, d, p) PCA basis (packed), or None (shared)
    rows: torch.Tensor | None    # (S, m) row index of each packed train row (0 for padding)
    row_ok: torch.Tensor | None  # (S, m) False on padding
    z: torch.Tensor | None       # (S, m, p) packed train features
    explained: float | None = None
    # Preconditioner (see _bucket_problem): the variances of the features along the eigenvectors of
    # their covariance, per split (S, p), and those eigenvectors (p, p) for the shared design (the
    # packed design's PCA basis is already one). None: no preconditioning.
    pre_eig: torch.Tensor | None = None
    pre_basis: torch.Tensor | None = None

    @property
    def shared(self) -> bool:
        return self.basis is None

    @property
    def dim(self) -> int:
        return self.x.shape[1] if self.shared else self.basis.shape[-1]

    @property
    def n_splits(self) -> int:
        return self.mu.shape[0]

    def full(self, s: int) -> torch.Tensor:
        """(n, p) features of every row as split s sees them."""
        out = (self.x - self.mu[s]) * self.inv_sd[s]
        return out if self.basis is None else out @ self.basis[s]

    def per_problem(self, v: torch.Tensor, s_of: torch.Tensor, t_of: torch.Tensor) -> torch.Tensor:
        """Per-row values v (T, n) -> the rows each problem trains on, (R, P)."""
        return (v[t_of] if self.shared else v[t_of.unsqueeze(1), self.rows[s_of]]).T

    def train_rows(self, s_of: torch.Tensor) -> torch.Tensor:
        """(R, P) bool: which rows train each problem."""
        return (self.train[s_of] if self.shared else self.row_ok[s_of]).T

    def apply(self, W: torch.Tensor, b: torch.Tensor, s_of: torch.Tensor) -> torch.Tensor:
        """W (P, p, K), b (P, K), problem splits s_of (P,) -> training-row logits (R, P, K)."""
        P, p, K = W.shape
        if self.shared:
            inv = self.inv_sd[s_of].unsqueeze(-1)
            Ws = W * inv
            b2 = b - torch.einsum("pd,pdk->pk", self.mu[s_of], Ws)
            out = torch.addmm(b2.reshape(1, P * K), self.x, Ws.permute(1, 0, 2).reshape(p, P * K))
            return out.view(-1, P, K)
        out = torch.empty(self.z.shape[1], P, K, dtype=W.dtype)
        for s in torch.unique(s_of).tolist():
            sel = torch.nonzero(s_of == s).squeeze(1)
            Wsel = W[sel].permute(1, 0, 2).reshape(p, -1)
            out[:, sel] = torch.addmm(b[sel].reshape(1, -1), self.z[s], Wsel).view(-1, sel.numel(), K)
        return out

    def apply_T(self, G: torch.Tensor, s_of: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Adjoint of ``apply``: G (R, P, K) = d f / d logits -> (d f / d W (P, p, K), d f / d b (P, K))."""
        R, P, K = G.shape
        gb = G.sum(0)
        if self.shared:
            xg = (self.x.T @ G.view(R, P * K)).view(-1, P, K).permute(1, 0, 2)
            return (xg - self.mu[s_of].unsqueeze(-1) * gb.unsqueeze(1)) * self.inv_sd[s_of].unsqueeze(-1), gb
        gW = torch.empty(P, self.dim, K, dtype=G.dtype)
        for s in torch.unique(s_of).tolist():
            sel = torch.nonzero(s_of == s).squeeze(1)
            gW[sel] = (self.z[s].T @ G[:, sel].reshape(R, -1)).view(-1, sel.numel(), K).permute(1, 0, 2)
        return gW, gb


PRECONDITION_RATIO = 10.0  # "auto": precondition when the top covariance eigenvalue exceeds 10x the median


def _wants_preconditioner(eig: torch.Tensor, precondition: bool | str) -> bool:
    if precondition not in (True, False, "auto"):
        raise ValueError(f"precondition={precondition!r}: use 'auto', True or False")
    if precondition != "auto":
        return bool(precondition)
    top, median = float(eig.amax()), float(eig.median())
    return top > PRECONDITION_RATIO * max(median, 1e-12 * max(top, 1e-30))


def _make_design(X: torch.Tensor, train: torch.Tensor, pca: int | None,
                 max_bytes: float = 2.0 * 2 ** 30, precondition: bool | str = "auto") -> _Design:
    X = X - X.mean(0, keepdim=True)
    S = train.shape[0]
    w = train.to(X.dtype)
    cnt = w.sum(1, keepdim=True)
    mu = (w @ X) / cnt
    var = ((w @ (X * X)) / cnt - mu * mu).clamp_min(0)
    sd = var.sqrt()
    inv_sd = torch.where(sd > 1e-6 * sd.amax(1, keepdim=True).clamp_min(1e-12), 1.0 / sd, torch.zeros_like(sd))
    if not pca or pca >= X.shape[1]:
        design = _Design(X, mu, inv_sd, train, None, None, None, None)
        if precondition is not False:
            # one eigenbasis of the standardised covariance of all rows serves every split: it only
            # steers the solver, the optimum of each split's objective does not depend on it
            sd_all = X.pow(2).mean(0).sqrt()
            Xs = X * torch.where(sd_all > 1e-6 * sd_all.amax().clamp_min(1e-12), 1.0 / sd_all, torch.zeros_like(sd_all))
            eig, basis = torch.linalg.eigh((Xs.T @ Xs) / X.shape[0])
            eig = eig.clamp_min(0)
            if _wants_preconditioner(eig, precondition):
                design.pre_eig = eig.expand(S, -1)
                design.pre_basis = basis.contiguous()
        return design
    m, p = int(train.sum(1).max()), int(pca)
    need = S * m * p * X.element_size()
    if need > max_bytes:
        raise ValueError(f"features: {S} splits x {m} train rows x {p} PCA dims need {need / 2 ** 30:.1f} GiB; "
                         "pass a smaller pca=<dims>, select='cv' (half the splits) or fewer rows")
    rows = torch.zeros(S, m, dtype=torch.long)
    row_ok = torch.zeros(S, m, dtype=torch.bool)
    z = torch.zeros(S, m, p, dtype=X.dtype)
    basis = torch.empty(S, X.shape[1], p, dtype=X.dtype)
    explained = []
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(0)  # svd_lowrank draws a random test matrix; keep results reproducible
    try:
        for s in range(S):
            idx = torch.nonzero(train[s]).squeeze(1)
            rows[s, :idx.numel()] = idx
            row_ok[s, :idx.numel()] = True
            tr = (X[idx] - mu[s]) * inv_sd[s]
            _, sv, V = torch.svd_lowrank(tr, q=min(p + 10, *tr.shape), niter=3)
            basis[s] = V[:, :p]
            explained.append(float((sv[:p] ** 2).sum() / (tr * tr).sum().clamp_min(1e-12)))
            z[s, :idx.numel()] = tr @ basis[s]
    finally:
        torch.random.set_rng_state(gen_state)
    design = _Design(X, mu, inv_sd, train, basis, rows, row_ok, z, float(np.mean(explained)))
    if precondition is not False:
        # PCA scores are uncorrelated on their split's training rows: the preconditioner is diagonal
        eig = z.pow(2).sum(1) / row_ok.sum(1, keepdim=True).clamp_min(1).to(z.dtype)   # (S, p)
        if _wants_preconditioner(eig.mean(0), precondition):
            design.pre_eig = eig
    return design


# --------------------------------------------------------------------------- solvers
def _fit_logistic(design: _Design, targets: torch.Tensor, valid: torch.Tensor, n_classes: Sequence[int],
                  Cs: torch.Tensor, *, max_iter: int, tol: float, warm: bool = True
                  ) -> tuple[torch.Tensor, dict]:
    """Batched multinomial logistic regression for targets (T, n) (int class codes, -1 missing),
    valid (T, n) and Cs (L,), on every split of ``design``. Returns predicted class codes
    (S, n, T, L) and solver info.

    Targets are grouped in buckets of equal class count (no padded classes; binary targets use
    one logit), but all buckets run in ONE batched L-BFGS: every problem's parameters are padded
    to the widest bucket for the optimiser's vector algebra, while each bucket's objective is
    evaluated with its own matrix products. ``warm``: C ascending, each C warm-started from the
    previous solution; otherwise every C at once from zero."""
    S, n = design.n_splits, design.x.shape[0]
    T, L = targets.shape[0], Cs.shape[0]
    p = design.dim
    ks = sorted(set(n_classes))
    members = {k: [t for t, kk in enumerate(n_classes) if kk == k] for k in ks}
    width = (p + 1) * max(1 if k == 2 else k for k in ks)
    pred = torch.zeros(S, n, T, L, dtype=torch.int64)
    blocks = [Cs[l:l + 1] for l in range(L)] if warm else [Cs]
    x = None
    infos = []
    col = 0
    prev_parts = None
    for C in blocks:
        parts = [_bucket_problem(design, targets[members[k]], valid[members[k]], max(k, 2), C) for k in ks]
        sizes = [pb.P for pb in parts]
        offsets = np.concatenate([[0], np.cumsum(sizes)])

        def fun(xs: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            f = torch.empty(idx.numel(), dtype=xs.dtype)
            g = torch.zeros_like(xs)
            gmax = torch.empty(idx.numel(), dtype=xs.dtype)
            for b, pb in enumerate(parts):
                sel = torch.nonzero((idx >= offsets[b]) & (idx < offsets[b + 1])).squeeze(1)
                if sel.numel() == 0:
                    continue
                fb, gb, mb = pb.fun(xs[sel, :pb.width].view(-1, p + 1, pb.K), idx[sel] - int(offsets[b]))
                f[sel] = fb
                g[sel, :pb.width] = gb.reshape(sel.numel(), -1)
                gmax[sel] = mb
            return f, g, gmax

        if x is None or not warm:
            x = torch.zeros(int(offsets[-1]), width, dtype=Cs.dtype)
        elif design.pre_eig is not None:  # the preconditioner depends on C: carry the weights, not V
            for b, (old_pb, pb) in enumerate(zip(prev_parts, parts)):
                rows = slice(int(offsets[b]), int(offsets[b + 1]))
                theta = x[rows, :pb.width].reshape(-1, p + 1, pb.K)
                x[rows, :pb.width] = pb.from_plain(old_pb.to_plain(theta)).reshape(pb.P, -1)
        prev_parts = parts
        x, info = batched_lbfgs(fun, x, max_iter=max_iter, tol=tol)
        infos.append(info)
        for b, (k, pb) in enumerate(zip(ks, parts)):
            theta = x[int(offsets[b]):int(offsets[b + 1]), :pb.width].reshape(-1, p + 1, pb.K)
            pred[:, :, members[k], col:col + C.shape[0]] = pb.predict(theta)
        col += C.shape[0]
    info = {key: [i[key] for i in infos] for key in infos[0]} if warm else infos[0]
    return pred, info


@dataclass
class _BucketProblem:
    P: int
    K: int
    width: int
    fun: Callable        # (theta, idx) -> (f, g, max |g| of the weights W and intercept)
    predict: Callable
    to_plain: Callable   # solver parameters (P, p + 1, K) -> weights and intercept in the same layout
    from_plain: Callable


def _rotate(basis: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """basis (p, p) @ W[i] for every problem i of W (P, p, K), as one matrix product."""
    P, p, K = W.shape
    return (basis @ W.permute(1, 0, 2).reshape(p, P * K)).view(p, P, K).permute(1, 0, 2)


def _bucket_problem(design: _Design, targets: torch.Tensor, valid: torch.Tensor, n_cls: int,
                    C: torch.Tensor) -> _BucketProblem:
    """Targets (T, n) that all have ``n_cls`` classes, C values (Lb,): one problem per
    (split, target, C), flattened in that order, objective ``mean CE + ||W||^2 / (2 C n_train)``.
    Parameters (P, p + 1, K) with K = n_cls, or K = 1 for binary (logit of class 1 against
    class 0, as scikit-learn does); row p of each problem is the unpenalised intercept.

    Preconditioning (when ``design.pre_eig`` is set): the solver works on V with W = U (D * V) and
    b = v_b / sqrt(c), where U are the eigenvectors of the feature covariance, e its eigenvalues,
    c = 1/4 (binary) or 1/K the logistic curvature at W = 0, and D = (c e + 1 / (C n))^-1/2. The
    objective's Hessian at the start is then close to the identity in every direction, which L-BFGS
    otherwise has to learn one iteration at a time: on correlated real features it needs 2-10x
    fewer iterations (and converges where it would stop at max_iter). The optimum and the stopping
    test (max |gradient| of W and b <= tol, scikit-learn's criterion) are unchanged."""
    S, p = design.n_splits, design.dim
    T, Lb = targets.shape[0], C.shape[0]
    dtype = C.dtype
    binary = n_cls == 2
    K = 1 if binary else n_cls
    grid = torch.cartesian_prod(torch.arange(S), torch.arange(T), torch.arange(Lb)).view(-1, 3)
    s_of, t_of, l_of = grid[:, 0], grid[:, 1], grid[:, 2]
    w_all = design.per_problem(valid, s_of, t_of).to(dtype) * design.train_rows(s_of).to(dtype)
    count = w_all.sum(0).clamp_min(1.0)                                       # (P,)
    w_all = w_all / count
    y_all = design.per_problem(targets.clamp_min(0), s_of, t_of)              # (R, P)
    pen = 1.0 / (2.0 * C[l_of] * count)                                       # (P,)
    pre = design.pre_eig is not None
    if pre:
        curv = 0.25 if binary else 1.0 / n_cls
        D = (curv * design.pre_eig[s_of] + (2.0 * pen).unsqueeze(1)).rsqrt()   # (P, p)
        b_scale = curv ** -0.5

    def to_plain(theta: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        """Solver parameters -> [W; b] (same layout)."""
        if not pre:
            return theta
        d = D if idx is None else D[idx]
        W = theta[:, :p] * d.unsqueeze(-1)
        if design.pre_basis is not None:
            W = _rotate(design.pre_basis, W)
        return torch.cat([W, theta[:, p:] * b_scale], dim=1)

    def from_plain(plain: torch.Tensor) -> torch.Tensor:
        if not pre:
            return plain
        W = plain[:, :p]
        if design.pre_basis is not None:
            W = _rotate(design.pre_basis.T, W)
        return torch.cat([W / D.unsqueeze(-1), plain[:, p:] / b_scale], dim=1)

    def fun(theta: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # analytic gradient: d(mean CE)/d logits = w * (softmax - onehot)
        plain = to_plain(theta, idx)
        W, b = plain[:, :p], plain[:, p]
        z = design.apply(W, b, s_of[idx])                                     # (R, Pa, K)
        w = w_all[:, idx]
        y = y_all[:, idx]
        if binary:
            z = z.squeeze(-1)
            y1 = (y == 1).to(dtype)
            nll = torch.nn.functional.softplus(z) - z * y1
            G = torch.sigmoid(z).sub_(y1).mul_(w).unsqueeze(-1)
        else:
            mx = z.amax(-1, keepdim=True)
            e = (z - mx).exp_()
            se = e.sum(-1, keepdim=True)
            yi = y.unsqueeze(-1)
            nll = (mx + se.log() - z.gather(-1, yi)).squeeze(-1)
            G = e.mul_(w.unsqueeze(-1) / se)
            G.scatter_add_(-1, yi, -w.unsqueeze(-1))
        f = (nll * w).sum(0) + pen[idx] * W.pow(2).sum((1, 2))
        gW, gb = design.apply_T(G, s_of[idx])
        gW = gW + (2.0 * pen[idx]).view(-1, 1, 1) * W
        gmax = torch.maximum(gW.abs().amax((1, 2)), gb.abs().amax(1))
        if pre:  # chain rule back to the solver's parameters
            if design.pre_basis is not None:
                gW = _rotate(design.pre_basis.T, gW)
            gW = gW * D[idx].unsqueeze(-1)
            gb = gb * b_scale
        return f, torch.cat([gW, gb.unsqueeze(1)], dim=1), gmax

    def predict(theta: torch.Tensor) -> torch.Tensor:
        """Predicted classes of all rows, (S, n, T, Lb)."""
        theta = to_plain(theta)
        if design.shared:  # every row's logits in one product with the folded-in standardisation
            th = theta.reshape(S * T * Lb, p + 1, K)
            zl = design.apply(th[:, :p], th[:, p], s_of)                      # (n, P, K)
            cls = (zl[..., 0] > 0).long() if binary else zl.argmax(-1)       # (n, P)
            return cls.T.reshape(S, T, Lb, -1).permute(0, 3, 1, 2)
        th = theta.reshape(S, T * Lb, p + 1, K)
        out = []
        for s in range(S):
            W = th[s, :, :p].permute(1, 0, 2).reshape(p, -1)
            zl = torch.addmm(th[s, :, p].reshape(1, -1), design.full(s), W).view(-1, T, Lb, K)
            out.append((zl[..., 0] > 0).long() if binary else zl.argmax(-1))
        return torch.stack(out)

    return _BucketProblem(P=S * T * Lb, K=K, width=(p + 1) * K, fun=fun, predict=predict, to_plain=to_plain,
                          from_plain=from_plain)


def _fit_ridge(design: _Design, targets: torch.Tensor, valid: torch.Tensor, Cs: torch.Tensor) -> torch.Tensor:
    """Closed-form ridge for every split, target and alpha = 1/C (objective
    ``sum_i (y_i - x_i w - b)^2 + alpha ||w||^2``) via one SVD per split and missing-value pattern.
    Returns predictions (S, n, T, L)."""
    S, n = design.n_splits, design.x.shape[0]
    T, L = targets.shape[0], Cs.shape[0]
    alphas = 1.0 / Cs
    out = torch.zeros(S, n, T, L, dtype=targets.dtype)
    for s in range(S):
        Z = design.full(s)
        rows_s = torch.nonzero(design.train[s]).squeeze(1)
        cache: dict[bytes, tuple] = {}
        for t in range(T):
            rows = rows_s[valid[t, rows_s]]
            key = rows.numpy().tobytes()
            if key not in cache:
                Zr = Z[rows]
                zm = Zr.mean(0)
                U, sv, Vh = torch.linalg.svd(Zr - zm, full_matrices=False)
                cache[key] = (zm, U, sv, Vh)
            zm, U, sv, Vh = cache[key]
            y = targets[t, rows]
            ym = y.mean()
            uty = U.T @ (y - ym)                                                      # (r,)
            shrink = sv.unsqueeze(1) / (sv.unsqueeze(1) ** 2 + alphas.unsqueeze(0))  # (r, L)
            coef = Vh.T @ (shrink * uty.unsqueeze(1))                                # (p, L)
            out[s, :, t] = (Z - zm) @ coef + ym
    return out


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
              solver gets there, not the solution (see ``_bucket_problem``).
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
        design = _make_design(X, train, pdim, precondition=precondition)
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
                pred, info = _fit_logistic(design, targets, valid, ncls, Cs_t, max_iter=max_iter, tol=tol,
                                              warm=path == "warm")
            else:
                pred = _fit_ridge(design, targets, valid, Cs_t)
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
