"""Cross-validated model selection of the influence model: the ridge head, the epoch count,
the interval of the cross-validated Spearman."""

from __future__ import annotations

import dataclasses
import json
import math
import time

import numpy as np
import pytest
import torch
from test_influence import CPU, _scorer, synthetic

from mates.config import InfluenceConfig
from mates.errors import DataError
from mates.influence import (
    RIDGE_ALPHAS,
    InfluenceScorer,
    _best,
    _head_trainer,
    cv_folds_of,
    fit_influence_model,
    min_probes,
    report_dict,
    ridge_cv,
    spearman_interval,
)
from mates.stats import spearman


def _brute_ridge(X: np.ndarray, y: np.ndarray, lam: float) -> tuple[np.ndarray, float]:
    """Ridge with an unpenalised intercept by the normal equations of the centred rows."""
    xm, ym = X.mean(0), y.mean()
    Xc = X - xm
    w = np.linalg.solve(Xc.T @ Xc + lam * np.eye(X.shape[1]), Xc.T @ (y - ym))
    return w, float(ym - xm @ w)


def _scale(X: np.ndarray) -> float:
    return float(((X - X.mean(0)) ** 2).sum()) / X.shape[1]


def _planted(n: int, d: int, seed: int, noise: float) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d)) + 2.0  # off-centre: the intercept must be fitted
    return X, X @ rng.normal(size=d) + noise * rng.normal(size=n)


# --------------------------------------------------------------------------- ridge_cv


def test_ridge_recovers_a_planted_linear_signal():
    X, y = _planted(300, 32, seed=0, noise=2.0)
    fit = ridge_cv(X, y, cv_folds_of(300, 5, seed=0))
    assert fit.cv_spearman > 0.8
    low, high = spearman_interval(fit.cv_spearman, 300)
    assert low < fit.cv_spearman < high and high - low < 0.1
    assert spearman(X @ fit.coef + fit.intercept, y) > fit.cv_spearman - 0.05


@pytest.mark.parametrize("seed", range(5))
def test_ridge_on_pure_noise_has_an_interval_around_zero(seed):
    rng = np.random.default_rng(seed)
    X, y = rng.normal(size=(200, 32)), rng.normal(size=200)
    fit = ridge_cv(X, y, cv_folds_of(200, 5, seed=seed))
    low, high = spearman_interval(fit.cv_spearman, 200)
    assert low < 0 < high


def test_nested_estimate_is_not_above_the_best_non_nested_one_on_noise():
    """Picking the penalty on the folds that measure it flatters the measurement; the
    nested estimate does not, so on noise it sits below the best of the grid on average."""
    nested, best = [], []
    for seed in range(12):
        rng = np.random.default_rng(100 + seed)
        X, y = rng.normal(size=(150, 24)), rng.normal(size=150)
        fit = ridge_cv(X, y, cv_folds_of(150, 5, seed=seed))
        nested.append(fit.cv_spearman)
        best.append(np.nanmax(fit.curve))
    assert np.mean(nested) <= np.mean(best)
    low, high = spearman_interval(float(np.mean(nested)), 150)
    assert low < 0 < high


@pytest.mark.parametrize("n,d", [(60, 8), (40, 90)], ids=["rows>features", "features>rows"])
def test_ridge_cv_is_exactly_ridge_refitted_on_every_split(n, d):
    """The leave-group-out shortcut gives what refitting on each training part would."""
    X, y = _planted(n, d, seed=1, noise=1.0)
    folds = cv_folds_of(n, 4, seed=2)
    fit = ridge_cv(X, y, folds)
    # the final head: all rows, the chosen penalty relative to their centred trace
    assert fit.lam == pytest.approx(fit.alpha * _scale(X))
    w, b = _brute_ridge(X, y, fit.lam)
    assert np.allclose(fit.coef, w, atol=1e-8) and fit.intercept == pytest.approx(b, abs=1e-8)
    # the nested out-of-fold predictions: each outer fold from a refit on the other folds
    for fold, alpha in zip(folds, fit.outer_alphas, strict=True):
        train = np.setdiff1d(np.arange(n), fold)
        w, b = _brute_ridge(X[train], y[train], alpha * _scale(X[train]))
        assert np.allclose(fit.oof[fold], X[fold] @ w + b, atol=1e-8)
    # the non-nested curve: the pooled out-of-fold Spearman of each penalty
    j = 3
    pooled = np.empty(n)
    for fold in folds:
        train = np.setdiff1d(np.arange(n), fold)
        w, b = _brute_ridge(X[train], y[train], RIDGE_ALPHAS[j] * _scale(X[train]))
        pooled[fold] = X[fold] @ w + b
    assert fit.curve[j] == pytest.approx(spearman(pooled, y), abs=1e-9)


def test_ties_go_to_the_larger_penalty_and_the_earlier_epoch():
    curve = np.array([np.nan, 0.2, 0.5, 0.5, 0.1])
    assert _best(curve, last=True) == 3 and _best(curve, last=False) == 2
    assert _best(np.full(4, np.nan), last=True) == 3


def test_ridge_512_by_384_is_fast():
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(512, 384)), rng.normal(size=512)
    folds = cv_folds_of(512, 5, seed=0)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        ridge_cv(X, y, folds)
        times.append(time.perf_counter() - start)
    assert min(times) < 2.0  # about 0.2 s on a 2-core CI box; generous for a loaded one


# --------------------------------------------------------------------------- the interval


def test_spearman_interval_is_fisher_z_with_the_bonett_wright_error():
    low, high = spearman_interval(0.5, 103)
    se = math.sqrt((1 + 0.125) / 100)
    assert low == pytest.approx(math.tanh(math.atanh(0.5) - 1.959964 * se), abs=1e-6)
    assert high == pytest.approx(math.tanh(math.atanh(0.5) + 1.959964 * se), abs=1e-6)
    assert spearman_interval(-0.5, 103) == pytest.approx((-high, -low))
    lo1, hi1 = spearman_interval(1.0, 50)  # clipped, still a finite interval below 1
    assert -1 < lo1 < hi1 < 1
    assert all(math.isnan(v) for v in spearman_interval(float("nan"), 50))


# --------------------------------------------------------------------------- fit_influence_model


def _cfg(**kw) -> InfluenceConfig:
    base = dict(
        encoder="tiny", max_tokens=32, train_encoder=False, epochs=12, head_lr=1e-2, batch_size=16
    )
    return InfluenceConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def ridge_fit():
    texts, y = synthetic(120, seed=5)
    scorer = _scorer()
    ticks: list[int] = []
    report = fit_influence_model(
        scorer, texts, y, _cfg(head_fit="ridge"), seed=4, progress=ticks.append
    )
    return {"scorer": scorer, "report": report, "texts": texts, "y": y, "ticks": ticks}


def test_ridge_fit_reports_a_nested_cross_validation(ridge_fit):
    report, n = ridge_fit["report"], 120
    d = report_dict(report)
    assert {
        "val_spearman",
        "val_pearson",
        "train_spearman",
        "best_epoch",
        "epochs",
        "train_size",
        "val_size",
        "target_mean",
        "target_std",
        "seconds",
        "cv_folds",
        "cv_low",
        "cv_high",
        "fit",
        "ridge_lambda",
        "nested",
    } <= set(d)
    json.dumps(d)  # a manifest entry
    assert report.fit == "ridge" and report.nested and report.cv_folds == 5
    assert report.val_size == report.train_size == report.num_probes == n
    assert report.cv_low <= report.val_spearman <= report.cv_high
    assert (report.cv_low, report.cv_high) == pytest.approx(
        spearman_interval(report.val_spearman, n)
    )
    assert report.ridge_lambda > 0 and report.best_epoch == -1
    assert ridge_fit["ticks"] == [12]  # progress: cfg.epochs units, at once


def test_ridge_head_is_the_closed_form_fit_on_all_probes(ridge_fit):
    scorer, y = ridge_fit["scorer"], ridge_fit["y"]
    feats = scorer.features(scorer.tokenize(ridge_fit["texts"]), 16)
    X = feats.double().numpy()
    z = (y - y.mean()) / y.std()
    fit = ridge_cv(X, z, cv_folds_of(len(y), 5, seed=4))
    assert fit.lam == pytest.approx(ridge_fit["report"].ridge_lambda)
    head = scorer.model.head
    assert head.weight.dtype == torch.float32 and head.weight.shape == (1, X.shape[1])
    assert np.allclose(head.weight.detach().numpy()[0], fit.coef, rtol=1e-5, atol=1e-6)
    assert head.bias.item() == pytest.approx(fit.intercept, rel=1e-5, abs=1e-6)
    preds = scorer.predict_features(feats)
    assert np.allclose(preds, X @ fit.coef + fit.intercept, atol=1e-4)
    assert spearman(preds, y) == pytest.approx(ridge_fit["report"].train_spearman, abs=1e-9)


def test_ridge_head_survives_save_and_load(ridge_fit, tmp_path):
    scorer = ridge_fit["scorer"]
    scorer.save(tmp_path / "im", "tiny", train_encoder=False)
    loaded = InfluenceScorer.load(tmp_path / "im", CPU)
    texts = synthetic(25, seed=8)[0]
    assert np.array_equal(loaded.score_texts(texts), scorer.score_texts(texts))


def _strip_seconds(report) -> dict:
    return {k: v for k, v in dataclasses.asdict(report).items() if k != "seconds"}


def test_sgd_head_picks_an_epoch_count_and_is_deterministic():
    texts, y = synthetic(60, seed=6)
    cfg = _cfg(head_fit="sgd", epochs=6)
    runs = []
    for _ in range(2):
        scorer, ticks = _scorer(seed=1), []
        report = fit_influence_model(scorer, texts, y, cfg, seed=2, progress=ticks.append)
        runs.append((report, scorer.model.head.state_dict(), ticks))
    (a, head_a, ticks), (b, head_b, _) = runs
    assert _strip_seconds(a) == _strip_seconds(b)
    assert all(torch.equal(head_a[k], head_b[k]) for k in head_a)
    assert a.fit == "sgd" and not a.nested and a.ridge_lambda is None
    assert 1 <= a.best_epoch + 1 <= cfg.epochs == a.epochs
    assert a.val_size == a.train_size == 60
    # one tick per epoch of the final training, the rest at its end: cfg.epochs in all
    assert sum(ticks) == cfg.epochs and ticks[: a.best_epoch + 1] == [1] * (a.best_epoch + 1)


def test_sgd_final_model_is_trained_from_the_initial_state():
    """The folds' trainings leave no trace: a one-epoch fit equals one epoch from the start."""
    texts, y = synthetic(30, seed=9)
    cfg = _cfg(head_fit="sgd", epochs=1)
    scorer = _scorer(seed=3)
    initial = {k: v.clone() for k, v in scorer.model.state_dict().items()}
    report = fit_influence_model(scorer, texts, y, cfg, seed=5)
    assert report.best_epoch == 0
    # the encoder is frozen: untouched
    enc = {k: v for k, v in scorer.model.state_dict().items() if not k.startswith("head.")}
    assert all(torch.equal(v, initial[k]) for k, v in enc.items())
    again = _scorer(seed=3)
    z = torch.tensor((y - y.mean()) / y.std(), dtype=torch.float32)
    feats = again.features(again.tokenize(texts), cfg.batch_size)
    torch.manual_seed(5)
    _head_trainer(again, feats, z, cfg)(np.random.default_rng(5).permutation(30))
    for k, v in again.model.head.state_dict().items():
        assert torch.equal(v, scorer.model.head.state_dict()[k])


@pytest.mark.parametrize("folds", [2, 5, 8])
def test_too_few_probes_for_the_folds_are_a_data_error(folds):
    need = min_probes(folds)
    assert need == max(2 * folds, 6)
    texts, y = synthetic(need - 1, seed=0)
    with pytest.raises(DataError, match=rf"influence\.cv_folds={folds}, got {need - 1}"):
        fit_influence_model(_scorer(), texts, y, _cfg(cv_folds=folds), seed=0)
    texts, y = synthetic(need, seed=0)
    report = fit_influence_model(_scorer(), texts, y, _cfg(cv_folds=folds), seed=0)
    assert report.cv_folds == folds and report.val_size == need


def test_constant_influences_leave_the_spearman_and_its_interval_missing():
    texts, _ = synthetic(20, seed=0)
    report = fit_influence_model(_scorer(), texts, np.full(20, 0.3), _cfg(), seed=0)
    d = report_dict(report)
    assert d["val_spearman"] is None and d["cv_low"] is None and d["cv_high"] is None
    assert report.val_spearman is None and report.target_std == 1.0
