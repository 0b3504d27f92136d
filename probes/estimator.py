"""One linear probe as a scikit-learn estimator, solved by the same batched solver as the probe matrix.

Why it exists: a probe fitted here is an object that can be kept and reused (scored on new features,
put inside a scikit-learn pipeline or ``cross_val_score``, or handed to attribution as a differentiable
function of a tap), with the same objective, standardisation and solver as ``probes.linear.probe_matrix``,
so the probe that is attributed is the probe that was measured, not a refit by another library.

The features are standardised with their training statistics and the standardisation is folded into
``coef_`` and ``intercept_``, so ``decision_function(X) = X @ coef_.T + intercept_`` on raw features, as
scikit-learn's ``LogisticRegression`` exposes it (binary problems have one row of ``coef_``: the logit of
``classes_[1]``). The objective is scikit-learn's, ``C * sum_i CE_i + ||W||^2 / 2`` on the standardised
features, so at the same C both land on the same optimum.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_array, check_is_fitted, check_X_y

from probes.lbfgs import batched_lbfgs
from probes.solver import logistic_bucket, make_design


class LinearProbe(ClassifierMixin, BaseEstimator):
    """Multinomial (binary: one-logit) logistic regression on standardised features.

    C: inverse L2 strength (scikit-learn's meaning). max_iter, tol: the L-BFGS budget and its stopping
    test (max |gradient| <= tol, as scikit-learn's lbfgs). device: where the solver runs ('cpu', 'cuda',
    'auto'); the fitted arrays are numpy on the CPU. precondition: see ``probes.solver.logistic_bucket``.
    """

    def __init__(self, C: float = 1.0, max_iter: int = 100, tol: float = 1e-4, device: str = "cpu",
                 precondition: bool | str = "auto"):
        self.C = C
        self.max_iter = max_iter
        self.tol = tol
        self.device = device
        self.precondition = precondition

    def fit(self, X, y) -> "LinearProbe":
        from probes.linear import resolve_device

        X, y = check_X_y(X, y, dtype=np.float32)
        check_classification_targets(y)
        if not self.C > 0:
            raise ValueError(f"C={self.C!r}: give a positive regularisation value")
        self.classes_, codes = np.unique(y, return_inverse=True)
        if self.classes_.size < 2:
            raise ValueError(f"y has {self.classes_.size} class; a probe needs at least 2")
        dev = resolve_device(self.device)
        x = torch.from_numpy(X).to(dev)
        center = x.mean(0)
        design = make_design(x - center, torch.ones(1, x.shape[0], dtype=torch.bool, device=dev), None,
                             precondition=self.precondition)
        targets = torch.from_numpy(codes.reshape(1, -1).astype(np.int64)).to(dev)
        bucket = logistic_bucket(design, targets, torch.ones_like(targets, dtype=torch.bool), self.classes_.size,
                                 torch.tensor([float(self.C)], dtype=x.dtype, device=dev))
        theta, info = batched_lbfgs(bucket.fun, bucket.newton_start(), max_iter=self.max_iter, tol=self.tol)
        plain = bucket.to_plain(theta)[0]                                   # (K, d + 1), standardised space
        coef = plain[:, :-1] * design.inv_sd[0]
        intercept = plain[:, -1] - coef @ (design.mu[0] + center)
        self.coef_ = coef.double().cpu().numpy()
        self.intercept_ = intercept.double().cpu().numpy()
        self.n_features_in_ = X.shape[1]
        self.n_iter_ = np.array([info["n_iter"]])
        self.converged_ = bool(info["converged"] >= 1.0)
        return self

    def decision_function(self, X) -> np.ndarray:
        check_is_fitted(self)
        X = check_array(X, dtype=np.float64)
        if X.shape[1] != self.n_features_in_:
            raise ValueError(f"X has {X.shape[1]} features; the probe was fitted on {self.n_features_in_}")
        scores = X @ self.coef_.T + self.intercept_
        return scores.ravel() if scores.shape[1] == 1 else scores

    def predict(self, X) -> np.ndarray:
        scores = self.decision_function(X)
        idx = (scores > 0).astype(int) if scores.ndim == 1 else scores.argmax(1)
        return self.classes_[idx]

    def predict_proba(self, X) -> np.ndarray:
        scores = torch.from_numpy(np.asarray(self.decision_function(X)))
        if scores.dim() == 1:
            p1 = torch.sigmoid(scores)
            return torch.stack([1 - p1, p1], dim=1).numpy()
        return torch.softmax(scores, dim=1).numpy()

    def torch_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The decision function as a differentiable torch function of pooled features x (B, d) -> (B, K)
        (binary: (B, 1), the logit of ``classes_[1]``), in x's dtype and device."""
        check_is_fitted(self)
        w = torch.as_tensor(self.coef_).to(x)
        return x @ w.T + torch.as_tensor(self.intercept_).to(x)

    def save(self, path: str | Path, **about) -> Path:
        """Write the fitted probe to ``path`` (a directory): weights as safetensors, the rest as JSON, with
        ``about`` (e.g. the tap, label and store it was fitted on) kept as ``probe.about``."""
        from safetensors.numpy import save_file

        from workbench.data.files import atomic_path, atomic_write_json

        check_is_fitted(self)
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        with atomic_path(path / "probe.safetensors") as tmp:
            save_file({"coef": self.coef_, "intercept": self.intercept_}, str(tmp))
        atomic_write_json(path / "probe.json", {"params": self.get_params(), "classes": self.classes_.tolist(),
                                                "n_features_in": int(self.n_features_in_), "about": about})
        return path

    @classmethod
    def load(cls, path: str | Path) -> "LinearProbe":
        """A probe written by ``save`` (safetensors: no pickle is ever read); ``probe.about`` is what was
        saved with it. A directory without a probe is refused by name."""
        from safetensors.numpy import load_file

        path = Path(path)
        if not (path / "probe.json").is_file() or not (path / "probe.safetensors").is_file():
            raise ValueError(f"{path} holds no saved probe (probe.json + probe.safetensors); write one with "
                             "`fvl probe --save-probes` or LinearProbe.save")
        meta = json.loads((path / "probe.json").read_text())
        arrays = load_file(str(path / "probe.safetensors"))
        probe = cls(**meta["params"])
        probe.coef_, probe.intercept_ = arrays["coef"], arrays["intercept"]
        probe.classes_ = np.asarray(meta["classes"])
        probe.n_features_in_ = int(meta["n_features_in"])
        probe.about = dict(meta.get("about") or {})
        return probe
