"""The numerical core of the linear probes: the per-split feature designs, and the multinomial-logistic
and ridge fits that ``probes.linear`` calls for every tap (minimised by ``probes.lbfgs``).

Why it is shaped this way (``fvl bench probe --json`` measures it against scikit-learn):

* Problems (split x target x C) that share a class count K form one *bucket*, solved by one
  batched L-BFGS: every problem keeps its own curvature memory, Armijo step and stopping test,
  and problems that have converged drop out of the matrix products.
* Parameters are laid out class-major, (problem, class, feature): the logits of a bucket are
  one (problems * K, d) x (d, rows) product, and the softmax over K reduces along an outer
  axis, with the rows contiguous (a softmax over a tiny innermost axis is several times slower).
* The line search evaluates every problem at once, without gathers, while all are still searching
  (the common case: the unit step is accepted), and only the problems still moving afterwards.
* A fresh fit starts one Newton step from the class prior (``newton_start``), not from zero: for
  the strongly regularised end of a C sweep that is nearly the optimum already.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from probes.lbfgs import batched_lbfgs


# --------------------------------------------------------------------------- split preparation
@dataclass
class Design:
    """The features each split sees: standardised with that split's train statistics and
    (optionally) projected on its train PCA basis. The solver only asks for products of the
    features with a stack of per-problem weights, so the storage follows what is cheapest:

    * ``shared`` (no PCA): one centred copy of X (n, d) for every split; the standardisation is
      folded into the weights, so a bucket's logits are ONE matrix product (P*K, d) x (d, n);
      rows outside a problem's training set get weight 0.
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
    # Preconditioner (see logistic_bucket): the variances of the features along the eigenvectors of
    # their covariance, per split (S, p), and those eigenvectors (p, p) for the shared design (the
    # packed design's PCA basis is already one). None: no preconditioning.
    pre_eig: torch.Tensor | None = None
    pre_basis: torch.Tensor | None = None
    # The same spectrum whether or not it preconditions: the first Newton step (logistic_bucket's
    # newton_start) uses it. cov_basis None: the packed design, whose PCA scores are uncorrelated.
    cov_eig: torch.Tensor | None = None       # (S, p)
    cov_basis: torch.Tensor | None = None     # (p, p)
    xT: torch.Tensor | None = None   # x.T, contiguous (the forward product reads it row by row)

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
        """Per-row values v (T, n) -> the rows each problem trains on, (P, R)."""
        return v[t_of] if self.shared else v[t_of.unsqueeze(1), self.rows[s_of]]

    def train_rows(self, s_of: torch.Tensor) -> torch.Tensor:
        """(P, R) bool: which rows train each problem."""
        return self.train[s_of] if self.shared else self.row_ok[s_of]

    def apply(self, W: torch.Tensor, b: torch.Tensor, s_of: torch.Tensor) -> torch.Tensor:
        """W (P, K, p), b (P, K), problem splits s_of (P,) -> training-row logits (P, K, R)."""
        P, K, p = W.shape
        if self.shared:
            Ws = W * self.inv_sd[s_of].unsqueeze(1)
            b2 = b - torch.bmm(Ws, self.mu[s_of].unsqueeze(2)).squeeze(2)
            return torch.addmm(b2.reshape(-1, 1), Ws.reshape(-1, p), self.xT).view(P, K, -1)
        out = torch.empty(P, K, self.z.shape[1], dtype=W.dtype, device=W.device)
        for s, sel in _by_split(s_of):
            out[sel] = torch.addmm(b[sel].reshape(-1, 1), W[sel].reshape(-1, p), self.z[s].T).view(sel.numel(), K, -1)
        return out

    def apply_T(self, G: torch.Tensor, s_of: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Adjoint of ``apply``: G (P, K, R) = d f / d logits -> (d f / d W (P, K, p), d f / d b (P, K))."""
        P, K, R = G.shape
        gb = G.sum(2)
        if self.shared:
            xg = torch.mm(G.view(-1, R), self.x).view(P, K, -1)
            return (xg - self.mu[s_of].unsqueeze(1) * gb.unsqueeze(2)).mul_(self.inv_sd[s_of].unsqueeze(1)), gb
        gW = torch.empty(P, K, self.dim, dtype=G.dtype, device=G.device)
        for s, sel in _by_split(s_of):
            gW[sel] = torch.mm(G[sel].reshape(-1, R), self.z[s]).view(sel.numel(), K, -1)
        return gW, gb


def _by_split(s_of: torch.Tensor):
    for s in torch.unique(s_of).tolist():
        yield s, torch.nonzero(s_of == s).squeeze(1)


PRECONDITION_RATIO = 10.0  # "auto": precondition when the top covariance eigenvalue exceeds 10x the median


def wants_preconditioner(eig: torch.Tensor, precondition: bool | str) -> bool:
    if precondition not in (True, False, "auto"):
        raise ValueError(f"precondition={precondition!r}: use 'auto', True or False")
    if precondition != "auto":
        return bool(precondition)
    top, median = float(eig.amax()), float(eig.median())
    return top > PRECONDITION_RATIO * max(median, 1e-12 * max(top, 1e-30))


def make_design(X: torch.Tensor, train: torch.Tensor, pca: int | None,
                max_bytes: float = 2.0 * 2 ** 30, precondition: bool | str = "auto") -> Design:
    X = X - X.mean(0, keepdim=True)
    S = train.shape[0]
    w = train.to(X.dtype)
    cnt = w.sum(1, keepdim=True)
    mu = (w @ X) / cnt
    var = ((w @ (X * X)) / cnt - mu * mu).clamp_min(0)
    sd = var.sqrt()
    inv_sd = torch.where(sd > 1e-6 * sd.amax(1, keepdim=True).clamp_min(1e-12), 1.0 / sd, torch.zeros_like(sd))
    if not pca or pca >= X.shape[1]:
        design = Design(X, mu, inv_sd, train, None, None, None, None, xT=X.T.contiguous())
        # one eigenbasis of the standardised covariance of all rows serves every split: it only
        # steers the solver (start and preconditioner), the optimum of each split's objective does not depend on it
        sd_all = X.pow(2).mean(0).sqrt()
        Xs = X * torch.where(sd_all > 1e-6 * sd_all.amax().clamp_min(1e-12), 1.0 / sd_all, torch.zeros_like(sd_all))
        eig, basis = torch.linalg.eigh((Xs.T @ Xs) / X.shape[0])
        design.cov_eig, design.cov_basis = eig.clamp_min(0).expand(S, -1), basis.contiguous()
        if precondition is not False and wants_preconditioner(design.cov_eig[0], precondition):
            design.pre_eig, design.pre_basis = design.cov_eig, design.cov_basis
        return design
    m, p = int(train.sum(1).max()), int(pca)
    need = S * m * p * X.element_size()
    if need > max_bytes:
        raise ValueError(f"features: {S} splits x {m} train rows x {p} PCA dims need {need / 2 ** 30:.1f} GiB; "
                         "pass a smaller pca=<dims>, select='cv' (half the splits) or fewer rows")
    rows = torch.zeros(S, m, dtype=torch.long, device=X.device)
    row_ok = torch.zeros(S, m, dtype=torch.bool, device=X.device)
    z = torch.zeros(S, m, p, dtype=X.dtype, device=X.device)
    basis = torch.empty(S, X.shape[1], p, dtype=X.dtype, device=X.device)
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
    design = Design(X, mu, inv_sd, train, basis, rows, row_ok, z, float(np.mean(explained)))
    # PCA scores are uncorrelated on their split's training rows: the spectrum is diagonal
    design.cov_eig = z.pow(2).sum(1) / row_ok.sum(1, keepdim=True).clamp_min(1).to(z.dtype)   # (S, p)
    if precondition is not False and wants_preconditioner(design.cov_eig.mean(0), precondition):
        design.pre_eig = design.cov_eig
    return design


# --------------------------------------------------------------------------- logistic regression
def fit_logistic(design: Design, targets: torch.Tensor, valid: torch.Tensor, n_classes: Sequence[int],
                 Cs: torch.Tensor, *, max_iter: int, tol: float, warm: bool = True,
                 on_fits: Callable[[int], object] | None = None) -> tuple[torch.Tensor, dict]:
    """Batched multinomial logistic regression for targets (T, n) (int class codes, -1 missing),
    valid (T, n) and Cs (L,), on every split of ``design``. Returns predicted class codes
    (S, n, T, L) and solver info.

    Targets are grouped in buckets of equal class count (binary targets use one logit); each
    bucket is one batched L-BFGS. ``warm``: C ascending, each C warm-started from the previous
    solution; otherwise every C at once. A fresh start is one Newton step from the class prior
    (``newton_start``), not zero: the first, most regularised C then needs a few iterations.
    ``on_fits(k)`` is told after each batch that k more problems are solved (a progress bar)."""
    S, n = design.n_splits, design.x.shape[0]
    T, L = targets.shape[0], Cs.shape[0]
    pred = torch.zeros(S, n, T, L, dtype=torch.int64)
    blocks = [Cs[l:l + 1] for l in range(L)] if warm else [Cs]
    infos = []
    for k in sorted(set(n_classes)):
        members = [t for t, kk in enumerate(n_classes) if kk == k]
        theta, prev, col = None, None, 0
        for b, C in enumerate(blocks):
            pb = logistic_bucket(design, targets[members], valid[members], max(k, 2), C)
            if theta is None or not warm:
                theta = pb.newton_start()
            elif design.pre_eig is not None:  # the preconditioner depends on C: carry the weights, not V
                theta = pb.from_plain(prev.to_plain(theta))
            theta, info = batched_lbfgs(pb.fun, theta, max_iter=max_iter, tol=tol)
            if len(infos) <= b:
                infos.append([])
            infos[b].append((pb.P, info))
            pred[:, :, members, col:col + C.shape[0]] = pb.predict(theta).cpu()
            if on_fits is not None:
                on_fits(pb.P)
            col += C.shape[0]
            prev = pb
    merged = [{"n_iter": max(i["n_iter"] for _, i in block), "evals": sum(i["evals"] for _, i in block),
               "converged": sum(P * i["converged"] for P, i in block) / sum(P for P, _ in block)} for block in infos]
    info = {key: [m[key] for m in merged] for key in merged[0]} if warm else merged[0]
    # per class count: how many problems each batch held and the evaluations it needed (per C block)
    info["by_classes"] = {str(k): {"problems": infos[0][j][0], "evals": [block[j][1]["evals"] for block in infos]}
                          for j, k in enumerate(sorted(set(n_classes)))}
    return pred, info


@dataclass
class LogisticBucket:
    P: int
    K: int
    fun: Callable        # (theta, idx) -> (f, g, max |g| of the weights W and intercept)
    predict: Callable
    to_plain: Callable   # solver parameters (P, K, p + 1) -> weights and intercept in the same layout
    from_plain: Callable
    newton_start: Callable  # () -> solver parameters one Newton step from the class prior


def logistic_bucket(design: Design, targets: torch.Tensor, valid: torch.Tensor, n_cls: int,
                    C: torch.Tensor) -> LogisticBucket:
    """Targets (T, n) that all have ``n_cls`` classes, C values (Lb,): one problem per
    (split, target, C), flattened in that order, objective ``mean CE + ||W||^2 / (2 C n_train)``.
    Parameters (P, K, p + 1) with K = n_cls, or K = 1 for binary (logit of class 1 against
    class 0, as scikit-learn does); column p of each class row is the unpenalised intercept.

    Preconditioning (when ``design.pre_eig`` is set): the solver works on V with W = (D * V) U^T
    (each class row) and b = v_b / sqrt(c), where U are the eigenvectors of the feature
    covariance, e its eigenvalues, c = 1/4 (binary) or 1/K the logistic curvature at W = 0, and
    D = (c e + 1 / (C n))^-1/2. The objective's Hessian at the start is then close to the
    identity in every direction, which L-BFGS otherwise has to learn one iteration at a time: on
    correlated real features it needs 2-10x fewer iterations (and converges where it would stop at
    max_iter). The optimum and the stopping test (max |gradient| of W and b <= tol, scikit-learn's
    criterion) are unchanged.

    One function on purpose: ``fun``, ``predict``, ``newton_start`` and the preconditioner's two maps are
    closures over the same per-problem tensors (weights, one-hot targets, penalties, D), built once per
    bucket; apart, each would take a dozen of them as arguments."""
    S, p = design.n_splits, design.dim
    T, Lb = targets.shape[0], C.shape[0]
    dtype = C.dtype
    binary = n_cls == 2
    K = 1 if binary else n_cls
    dev = design.x.device
    grid = torch.cartesian_prod(*(torch.arange(k, device=dev) for k in (S, T, Lb))).view(-1, 3)
    s_of, t_of, l_of = grid[:, 0], grid[:, 1], grid[:, 2]
    P = s_of.numel()
    w_all = design.per_problem(valid, s_of, t_of).to(dtype) * design.train_rows(s_of).to(dtype)   # (P, R)
    count = w_all.sum(1).clamp_min(1.0)
    w_all = w_all / count.unsqueeze(1)
    y_all = design.per_problem(targets.clamp_min(0), s_of, t_of)                                # (P, R)
    if binary:
        yw_all = ((y_all == 1).to(dtype) * w_all).unsqueeze(1)                                 # (P, 1, R)
    else:
        yw_all = F.one_hot(y_all, K).to(dtype).transpose(1, 2) * w_all.unsqueeze(1)            # (P, K, R)
    pen = 1.0 / (2.0 * C[l_of] * count)                                                        # (P,)
    pre = design.pre_eig is not None
    if pre:
        curv = 0.25 if binary else 1.0 / n_cls
        D = (curv * design.pre_eig[s_of] + (2.0 * pen).unsqueeze(1)).rsqrt()                  # (P, p)
        b_scale = curv ** -0.5
        U = design.pre_basis

    def rotate(W: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
        return torch.mm(W.reshape(-1, p), basis).view(W.shape)

    def to_plain(theta: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        """Solver parameters -> [W, b] (same layout)."""
        if not pre:
            return theta
        W = theta[..., :p] * (D if idx is None else D[idx]).unsqueeze(1)
        if U is not None:
            W = rotate(W, U.T)
        return torch.cat([W, theta[..., p:] * b_scale], dim=2)

    def from_plain(plain: torch.Tensor) -> torch.Tensor:
        if not pre:
            return plain
        W = plain[..., :p]
        if U is not None:
            W = rotate(W, U)
        return torch.cat([W / D.unsqueeze(1), plain[..., p:] / b_scale], dim=2)

    def fun(theta: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # analytic gradient: d(mean CE)/d logits = w * (softmax - onehot)
        every = idx.numel() == P
        pick = (lambda v: v) if every else (lambda v: v[idx])
        plain = to_plain(theta, None if every else idx)
        W, b = plain[..., :p], plain[..., p]
        s_sub, w, yw, pn = pick(s_of), pick(w_all), pick(yw_all), pick(pen)
        z = design.apply(W, b, s_sub)                                          # (Pa, K, R)
        if binary:
            z1 = z.squeeze(1)
            f = (F.softplus(z1) * w).sum(1)
            G = torch.sigmoid(z1).mul_(w).unsqueeze(1).sub_(yw)
        else:
            mx = z.amax(1, keepdim=True)
            e = (z - mx).exp_()
            se = e.sum(1, keepdim=True)
            f = ((se.log() + mx).squeeze(1) * w).sum(1)
            G = e.mul_(w.unsqueeze(1) / se).sub_(yw)
        f = f - (z * yw).sum((1, 2)) + pn * W.pow(2).sum((1, 2))
        gW, gb = design.apply_T(G, s_sub)
        gW.add_(W * (2.0 * pn).view(-1, 1, 1))
        gmax = torch.maximum(gW.abs().amax((1, 2)), gb.abs().amax(1))
        if pre:  # chain rule back to the solver's parameters
            if U is not None:
                gW = rotate(gW, U)
            gW = gW * pick(D).unsqueeze(1)
            gb = gb * b_scale
        return f, torch.cat([gW, gb.unsqueeze(2)], dim=2), gmax

    def newton_start() -> torch.Tensor:
        """Solver parameters (P, K, p + 1) one Newton step from W = 0 with the intercepts at the class
        prior, under the Hessian there in Kronecker form: (feature covariance) x (softmax curvature
        at the prior) + the penalty. Problems that are nearly quadratic (weak signal or a strong
        penalty, the common case for probes) start next to their optimum, and L-BFGS polishes from
        there to the same stopping test; the optimum does not depend on the start."""
        prior = yw_all.sum(2)                                                  # (P, K) weighted class shares
        if binary:
            prior = prior.clamp(1e-3, 1 - 1e-3)
            curv = (prior * (1 - prior)).unsqueeze(2)                          # (P, 1, 1)
            b0 = torch.log(prior / (1 - prior))
        else:
            prior = prior.clamp_min(1e-3)
            prior = prior / prior.sum(1, keepdim=True)
            curv_k, V = torch.linalg.eigh(torch.diag_embed(prior) - prior.unsqueeze(2) * prior.unsqueeze(1))
            curv = curv_k.clamp_min(0).unsqueeze(2)                            # (P, K, 1), in V's basis
            b0 = prior.log()
        G = prior.unsqueeze(2) * w_all.unsqueeze(1) - yw_all                   # d(mean CE)/d logits at W = 0
        R = -design.apply_T(G, s_of)[0]                                        # (P, K, p): minus the gradient
        basis = design.cov_basis
        Q = R if basis is None else rotate(R, basis)                           # feature eigenbasis
        if not binary:
            Q = V.transpose(1, 2) @ Q                                          # class eigenbasis
        Q = Q / (curv * design.cov_eig[s_of].unsqueeze(1) + (2.0 * pen).view(-1, 1, 1))
        if not binary:
            Q = V @ Q
        W0 = Q if basis is None else rotate(Q, basis.T)
        return from_plain(torch.cat([W0, b0.unsqueeze(2)], dim=2))

    def predict(theta: torch.Tensor) -> torch.Tensor:
        """Predicted classes of all rows, (S, n, T, Lb)."""
        theta = to_plain(theta)
        W, b = theta[..., :p], theta[..., p]
        if design.shared:  # every row's logits in one product with the folded-in standardisation
            zl = design.apply(W, b, s_of)                                      # (P, K, n)
        else:
            zl = torch.empty(P, K, design.x.shape[0], dtype=W.dtype, device=W.device)
            for s, sel in _by_split(s_of):
                zl[sel] = torch.addmm(b[sel].reshape(-1, 1), W[sel].reshape(-1, p), design.full(s).T).view(sel.numel(), K, -1)
        # max(1).indices, not argmax(1): the same first-maximum index, ~9x faster over a short outer axis
        cls = (zl[:, 0] > 0).long() if binary else zl.max(1).indices        # (P, n)
        return cls.view(S, T, Lb, -1).permute(0, 3, 1, 2)

    return LogisticBucket(P=P, K=K, fun=fun, predict=predict, to_plain=to_plain, from_plain=from_plain,
                          newton_start=newton_start)


# --------------------------------------------------------------------------- ridge regression
def fit_ridge(design: Design, targets: torch.Tensor, valid: torch.Tensor, Cs: torch.Tensor) -> torch.Tensor:
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
            key = rows.cpu().numpy().tobytes()
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
            out[s, :, t] = ((Z - zm) @ coef + ym).cpu()
    return out
