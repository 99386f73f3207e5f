"""Cross-validation of the influence model: folds, the Spearman interval, and the ridge head
chosen by k-fold cross-validated Spearman in closed form."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from mates.stats import pearson, spearman

log = logging.getLogger(__name__)


# Characters of a text's head tokenized per token of the limit: WordPiece averages ~4-5
# characters a token on English prose; a head that falls short is tokenized again whole.


# -- cross-validation ------------------------------------------------------------

# Ridge penalties, relative: lambda = alpha * trace(Xc'Xc) / d for the training rows Xc
# (centred), i.e. alpha times the mean eigenvalue of Xc'Xc (rows x the mean per-feature
# variance), so the same alpha means the same shrinkage whatever the encoder's scale or the
# number of rows. alpha = 1 halves the fit along a direction of average variance; the grid
# runs from almost least squares to a head that predicts (almost) the training mean.
RIDGE_ALPHAS = np.logspace(-3, 4, 15)
CONFIDENCE = 0.95


def min_probes(cv_folds: int) -> int:
    """Fewest probes a `cv_folds`-fold fit takes: two per fold (and at least six)."""
    return max(2 * cv_folds, 6)


def cv_folds_of(n: int, k: int, seed: int) -> list[np.ndarray]:
    """`k` near-equal folds of a seeded permutation of range(n)."""
    return np.array_split(np.random.default_rng(seed).permutation(n), k)


def spearman_interval(r: float, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Interval of a Spearman correlation from `n` pairs: Fisher z with the standard
    error of Bonett & Wright (2000), sqrt((1 + r^2/2) / (n - 3)); NaN if r is."""
    if not np.isfinite(r):
        return float("nan"), float("nan")
    if n <= 3:
        return -1.0, 1.0
    r = float(np.clip(r, -0.9999, 0.9999))
    half = NormalDist().inv_cdf((1 + confidence) / 2) * math.sqrt((1 + r * r / 2) / (n - 3))
    return math.tanh(math.atanh(r) - half), math.tanh(math.atanh(r) + half)


def _best(curve: np.ndarray, last: bool) -> int:
    """Index of the highest value (NaN counts as lowest); ties: the last or the first."""
    c = np.where(np.isnan(curve), -np.inf, curve)
    return int(len(c) - 1 - np.argmax(c[::-1])) if last else int(np.argmax(c))


def _spearmans(preds: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman of each column of `preds` (n, L) with y."""
    return np.array([spearman(preds[:, j], y) for j in range(preds.shape[1])])


def _centred_trace(X: np.ndarray) -> float:
    return float(((X - X.mean(0)) ** 2).sum())


class _Spectrum:
    """Ridge with an unpenalised intercept on rows X, y, for any penalty, from one
    eigendecomposition of the smaller Gram matrix of the centred rows Xc = X - mean.

    Q = Xc V (= U S of the thin SVD) and s2 (the squared singular values) give the hat
    matrix H(lam) = 11'/m + Q diag(1/(s2 + lam)) Q' of the fit with penalty lam.
    """

    def __init__(self, X: np.ndarray, y: np.ndarray):
        self.m, self.d = X.shape
        self.x_mean, self.y_mean = X.mean(0), float(y.mean())
        self.Xc, self.y, self.yc = X - self.x_mean, y, y - self.y_mean
        self.primal = self.m >= self.d
        if self.primal:
            s2, self.V = np.linalg.eigh(self.Xc.T @ self.Xc)
            self.Q = self.Xc @ self.V
        else:
            s2, self.U = np.linalg.eigh(self.Xc @ self.Xc.T)
            self.Q = self.U * np.sqrt(np.clip(s2, 0, None))
        self.s2 = np.clip(s2, 0, None)
        self.Qy = self.Q.T @ self.yc
        self.trace = float(self.s2.sum())

    def coef(self, lam: float) -> tuple[np.ndarray, float]:
        """(weights, intercept) of the fit with penalty lam."""
        inv = 1.0 / (self.s2 + lam)
        if self.primal:
            w = self.V @ (inv * self.Qy)
        else:
            w = self.Xc.T @ (self.U @ (inv * (self.U.T @ self.yc)))
        return w, self.y_mean - float(self.x_mean @ w)

    def left_out(self, fold: np.ndarray, lams: np.ndarray) -> np.ndarray:
        """Predictions (len(fold), L) for the rows `fold` of the fits on the other rows,
        one per penalty in `lams`: exact, by the leave-group-out identity of linear
        smoothers, y_F - (I - H_FF)^-1 (y_F - yhat_F). Ridge predictions do not depend
        on where the features are centred (the intercept is free), so the fits on the
        other rows need no decomposition of their own."""
        inv = 1.0 / (self.s2[None, :] + lams[:, None])  # (L, r)
        qf = self.Q[fold]  # (f, r)
        fitted = self.y_mean + (inv * self.Qy) @ qf.T  # (L, f)
        hat = 1.0 / self.m + (qf[None] * inv[:, None, :]) @ qf.T  # (L, f, f)
        resid = (self.y[fold][None] - fitted)[..., None]  # (L, f, 1)
        eye = np.eye(len(fold))[None]
        return self.y[fold][:, None] - np.linalg.solve(eye - hat, resid)[..., 0].T


def _ridge_oof(spec: _Spectrum, folds: list[np.ndarray], alphas: np.ndarray) -> np.ndarray:
    """Out-of-fold predictions (m, L) over `folds` (row indices of `spec`), one column per
    alpha; each fold's penalty is alpha * the centred trace of its training rows / d."""
    out = np.empty((spec.m, len(alphas)))
    for fold in folds:
        train = np.setdiff1d(np.arange(spec.m), fold, assume_unique=True)
        scale = _centred_trace(spec.Xc[train]) / spec.d or 1.0
        out[fold] = spec.left_out(fold, alphas * scale)
    return out


@dataclass
class RidgeCV:
    """A cross-validated ridge head (see `ridge_cv`)."""

    coef: np.ndarray  # (d,) final weights, fitted on all rows
    intercept: float
    alpha: float  # the chosen relative penalty
    lam: float  # the final fit's penalty: alpha * trace(Xc'Xc) / d of all rows
    oof: np.ndarray  # (n,) nested out-of-fold predictions
    cv_spearman: float  # of `oof`: the nested estimate
    cv_pearson: float
    curve: np.ndarray  # (L,) Spearman of the non-nested pooled out-of-fold predictions per alpha
    alphas: np.ndarray  # (L,) the grid
    outer_alphas: list[float]  # the alpha each outer fold's inner CV chose


def ridge_cv(
    X: np.ndarray, y: np.ndarray, folds: list[np.ndarray], alphas: np.ndarray = RIDGE_ALPHAS
) -> RidgeCV:
    """Ridge regression of y on X (intercept unpenalised), its penalty chosen by CV.

    The penalty (alpha on the grid, ties to the larger) maximises the Spearman of the
    pooled out-of-fold predictions over `folds`; the final fit uses it on all rows.
    The nested out-of-fold predictions `oof` predict each outer fold from a fit on the
    other folds whose penalty was chosen by CV over `len(folds)` inner folds of those
    folds alone. One eigendecomposition per outer training part and one of all rows.
    """
    X, y = np.asarray(X, dtype=np.float64), np.asarray(y, dtype=np.float64)
    alphas = np.asarray(alphas, dtype=np.float64)
    full = _Spectrum(X, y)
    outer = _ridge_oof(full, folds, alphas)  # column j: each fold predicted by its alpha_j fit
    curve = _spearmans(outer, y)
    j = _best(curve, last=True)
    oof, chosen = np.empty(len(y)), []
    for o, fold in enumerate(folds):
        train = np.concatenate([g for i, g in enumerate(folds) if i != o])  # random order
        inner = np.array_split(np.arange(len(train)), len(folds))
        spec = _Spectrum(X[train], y[train])
        j_in = _best(_spearmans(_ridge_oof(spec, inner, alphas), y[train]), last=True)
        chosen.append(float(alphas[j_in]))
        oof[fold] = outer[fold, j_in]
    lam = float(alphas[j]) * (full.trace / full.d or 1.0)
    coef, intercept = full.coef(lam)
    return RidgeCV(
        coef,
        intercept,
        float(alphas[j]),
        lam,
        oof,
        spearman(oof, y),
        pearson(oof, y),
        curve,
        alphas,
        chosen,
    )
