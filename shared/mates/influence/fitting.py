"""`fit_influence_model`: the ridge head on frozen features, or the encoder fine-tuned by
epochs, chosen by cross-validation; and its report."""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict

import numpy as np
import torch

from mates.config import InfluenceConfig
from mates.errors import DataError
from mates.influence.crossval import _best, cv_folds_of, min_probes, ridge_cv, spearman_interval
from mates.influence.scorer import FitReport, InfluenceScorer, _collate
from mates.lm import autocast
from mates.stats import pearson, spearman

log = logging.getLogger(__name__)


# Characters of a text's head tokenized per token of the limit: WordPiece averages ~4-5
# characters a token on English prose; a head that falls short is tokenized again whole.


def _none_if_nan(x: float) -> float | None:
    return None if x is None or not np.isfinite(x) else float(x)


def fit_influence_model(
    scorer: InfluenceScorer,
    texts: Sequence[str],
    influences: np.ndarray,
    cfg: InfluenceConfig,
    seed: int,
    progress: Callable[[int], None] | None = None,
) -> FitReport:
    """Fit `scorer` in place on (text, influence) pairs, model selection by k-fold CV.

    See the module docstring for the three fits. `progress` is told of `cfg.epochs` units
    in all: 'ridge' reports them at once at the end; 'sgd' and 'encoder' one per epoch of
    the final training on all probes, the rest once it ends (the `cv_folds` trainings
    before it report nothing).
    """
    t0 = time.perf_counter()
    y = np.asarray(influences, dtype=np.float64)
    if not np.all(np.isfinite(y)):
        raise DataError("oracle influences contain NaN or infinite values")
    n, k = len(y), cfg.cv_folds
    if n < min_probes(k):
        raise DataError(
            f"need at least {min_probes(k)} probes to fit the influence model with "
            f"influence.cv_folds={k}, got {n}"
        )
    # constant influences: std 1 (y.std() of equal values can be ~1e-17, not 0)
    mean, std = float(y.mean()), (float(y.std()) if np.ptp(y) > 0 else 1.0)
    z = (y - mean) / std
    scorer.meta.update(target_mean=mean, target_std=std)
    folds = cv_folds_of(n, k, seed)
    tokens = scorer.tokenize(texts)
    if not cfg.train_encoder and cfg.head_fit == "ridge":
        feats = scorer.features(tokens, cfg.batch_size)
        rf = ridge_cv(feats.double().numpy(), z, folds)
        head = scorer.model.head
        with torch.no_grad():
            head.weight.copy_(torch.as_tensor(rf.coef, dtype=torch.float32).view(1, -1))
            head.bias.fill_(rf.intercept)
        rho, r_p, best_epoch, epochs = rf.cv_spearman, rf.cv_pearson, -1, 0
        train_rho = spearman(scorer.predict_features(feats), y)
        if progress:
            progress(cfg.epochs)
    else:
        rho, r_p, best_epoch, train_rho = _fit_by_epochs(
            scorer, tokens, z, folds, cfg, seed, progress
        )
        epochs = cfg.epochs
        rf = None
    low, high = spearman_interval(rho, n)
    return FitReport(
        val_spearman=_none_if_nan(rho),
        val_pearson=_none_if_nan(r_p),
        train_spearman=_none_if_nan(train_rho),
        best_epoch=best_epoch,
        epochs=epochs,
        train_size=n,
        val_size=n,
        target_mean=mean,
        target_std=std,
        seconds=time.perf_counter() - t0,
        cv_folds=k,
        cv_low=_none_if_nan(low),
        cv_high=_none_if_nan(high),
        fit="ridge" if rf is not None else ("encoder" if cfg.train_encoder else "sgd"),
        ridge_lambda=rf.lam if rf is not None else None,
        nested=rf is not None,
        num_probes=n,
    )


def _fit_by_epochs(
    scorer: InfluenceScorer,
    tokens: list[list[int]],
    z: np.ndarray,
    folds: list[np.ndarray],
    cfg: InfluenceConfig,
    seed: int,
    progress: Callable[[int], None] | None,
) -> tuple[float, float, int, float]:
    """'sgd' and 'encoder': each fold trains a fresh copy of the model (the state it came
    in) for `cfg.epochs` epochs, predicting its held-out fold after every epoch; the epoch
    count e* with the best Spearman of the pooled out-of-fold predictions (ties: fewer) is
    kept, and the model is trained on all probes for e* epochs.

    Returns (CV Spearman, CV Pearson, e* - 1, Spearman of the final model on all probes).
    The CV figures are those at e*, chosen on the same folds: slightly optimistic.
    """
    model = scorer.model
    initial = copy.deepcopy(model.state_dict())
    zt = torch.tensor(z, dtype=torch.float32)
    if cfg.train_encoder:

        def trainer():
            return _encoder_trainer(scorer, tokens, zt, cfg)

        def predict(idx: np.ndarray) -> np.ndarray:
            return scorer.predict([tokens[i] for i in idx], cfg.batch_size)
    else:
        feats = scorer.features(tokens, cfg.batch_size)

        def trainer():
            return _head_trainer(scorer, feats, zt, cfg)

        def predict(idx: np.ndarray) -> np.ndarray:
            return scorer.predict_features(feats[torch.from_numpy(idx)])

    def train(rows: np.ndarray, epochs: int, after: Callable[[int], None]) -> None:
        model.load_state_dict(initial)
        torch.manual_seed(seed)
        step, rng = trainer(), np.random.default_rng(seed)
        for epoch in range(epochs):
            step(rng.permutation(rows))
            after(epoch)

    oof = np.empty((cfg.epochs, len(z)))
    for f, fold in enumerate(folds):
        rows = np.concatenate([g for i, g in enumerate(folds) if i != f])

        def record(epoch: int, fold: np.ndarray = fold) -> None:
            oof[epoch, fold] = predict(fold)

        train(rows, cfg.epochs, record)
    curve = np.array([spearman(oof[e], z) for e in range(cfg.epochs)])
    best = _best(curve, last=False)
    tick = (lambda _: progress(1)) if progress else (lambda _: None)
    train(np.arange(len(z)), best + 1, tick)
    if progress and cfg.epochs > best + 1:
        progress(cfg.epochs - best - 1)
    return curve[best], pearson(oof[best], z), best, spearman(predict(np.arange(len(z))), z)


def _head_trainer(
    scorer: InfluenceScorer, feats: torch.Tensor, z: torch.Tensor, cfg: InfluenceConfig
) -> Callable[[np.ndarray], None]:
    head = scorer.model.head
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.head_lr, weight_decay=0.01)
    feats, z = feats.to(scorer.device), z.to(scorer.device)

    def epoch(order: np.ndarray) -> None:
        head.train()
        for start in range(0, len(order), cfg.batch_size):
            idx = torch.from_numpy(order[start : start + cfg.batch_size])
            loss = torch.nn.functional.mse_loss(head(feats[idx]).squeeze(-1), z[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    return epoch


def _encoder_trainer(
    scorer: InfluenceScorer, tokens: list[list[int]], z: torch.Tensor, cfg: InfluenceConfig
) -> Callable[[np.ndarray], None]:
    model = scorer.model
    opt = torch.optim.AdamW(
        [
            {"params": model.encoder.parameters(), "lr": cfg.lr},
            {"params": model.head.parameters(), "lr": cfg.head_lr},
        ],
        weight_decay=0.01,
    )
    # bf16 on CPU is a scoring-throughput choice; fine-tuning there stays fp32 as it always was.
    precision = scorer.resolved_precision() if scorer.device.type == "cuda" else "fp32"

    def epoch(order: np.ndarray) -> None:
        model.train()
        for start in range(0, len(order), cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            ids, mask = _collate(
                [tokens[i] for i in idx], scorer.tokenizer.pad_token_id, scorer.device
            )
            with autocast(scorer.device, precision):
                pred = model(ids, mask)
            loss = torch.nn.functional.mse_loss(pred.float(), z[idx].to(scorer.device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    return epoch


def report_dict(report: FitReport) -> dict:
    return {
        k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in asdict(report).items()
    }
