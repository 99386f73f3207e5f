"""The data influence model: learns a text -> influence signal, persists exactly."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from mates.config import InfluenceConfig
from mates.errors import ArtifactError, DataError
from mates.influence import (
    InfluenceModel,
    InfluenceScorer,
    cv_folds_of,
    fit_influence_model,
    length_batches,
    load_encoder,
    ridge_cv,
)
from mates.stats import spearman

CPU = torch.device("cpu")
FILLER = "the a report said market team film game city council year people week group plan".split()


def synthetic(n: int, seed: int) -> tuple[list[str], np.ndarray]:
    """Texts whose target is set by one keyword (plus a little noise)."""
    rng = np.random.default_rng(seed)
    texts, y = [], []
    for _ in range(n):
        words = list(rng.choice(FILLER, size=int(rng.integers(5, 12))))
        hit = int(rng.integers(0, 2))
        if hit:
            words.insert(int(rng.integers(0, len(words) + 1)), "football")
        texts.append(" ".join(words))
        y.append(hit + 0.1 * rng.normal())
    return texts, np.array(y)


def _scorer(seed: int = 0) -> InfluenceScorer:
    encoder, tok = load_encoder("tiny", seed=seed)
    return InfluenceScorer(InfluenceModel(encoder), tok, max_tokens=32, device=CPU)


def _cfg(kind: str) -> InfluenceConfig:
    """'encoder' (fine-tuned), 'sgd' (frozen, AdamW head) or 'ridge' (frozen, closed form)."""
    if kind == "encoder":
        return InfluenceConfig(
            encoder="tiny",
            max_tokens=32,
            train_encoder=True,
            epochs=8,
            lr=2e-3,
            head_lr=5e-3,
            batch_size=16,
        )
    return InfluenceConfig(
        encoder="tiny",
        max_tokens=32,
        train_encoder=False,
        epochs=60,
        head_lr=1e-2,
        batch_size=16,
        head_fit=kind,
    )


@pytest.fixture(
    scope="module",
    params=["ridge", "sgd", "encoder"],
    ids=["frozen-ridge", "frozen-sgd", "fine-tuned"],
)
def fitted(request):
    texts, y = synthetic(160, seed=0)
    scorer = _scorer()
    cfg = _cfg(request.param)
    report = fit_influence_model(scorer, texts, y, cfg, seed=3)
    return {
        "scorer": scorer,
        "report": report,
        "texts": texts,
        "y": y,
        "cfg": cfg,
        "kind": request.param,
    }


def test_fit_learns_the_keyword(fitted):
    report = fitted["report"]
    assert report.fit == fitted["kind"]
    assert report.val_spearman > 0.5
    assert report.cv_low <= report.val_spearman <= report.cv_high and report.cv_low > 0.3
    # cross-validated: the final model trains on every probe, every probe is predicted out of fold
    assert report.train_size == report.val_size == report.num_probes == 160
    assert report.cv_folds == 5
    if fitted["kind"] == "ridge":
        assert report.best_epoch == -1 and report.epochs == 0 and report.nested
        assert report.ridge_lambda > 0
    else:
        assert 0 <= report.best_epoch < fitted["cfg"].epochs == report.epochs
        assert not report.nested and report.ridge_lambda is None


def test_fitted_model_generalises_to_unseen_texts(fitted):
    texts, y = synthetic(100, seed=99)
    assert spearman(fitted["scorer"].score_texts(texts), y) > 0.5


def test_reported_spearmans_are_those_of_the_kept_model_and_its_cross_validation(fitted):
    scorer, texts, y, report = fitted["scorer"], fitted["texts"], fitted["y"], fitted["report"]
    preds = scorer.score_texts(texts, batch_size=fitted["cfg"].batch_size)
    assert spearman(preds, y) == pytest.approx(report.train_spearman, abs=1e-9)
    if fitted["kind"] == "ridge":  # the nested estimate, recomputed from the frozen features
        feats = scorer.features(scorer.tokenize(texts), 16).double().numpy()
        z = (y - y.mean()) / y.std()
        rf = ridge_cv(feats, z, cv_folds_of(160, 5, seed=3))
        assert rf.cv_spearman == pytest.approx(report.val_spearman, abs=1e-9)


def test_z_scoring_constants_are_those_of_all_probes(fitted):
    y = fitted["y"]
    meta = fitted["scorer"].meta
    assert meta["target_mean"] == pytest.approx(float(y.mean()))
    assert meta["target_std"] == pytest.approx(float(y.std()))
    assert fitted["report"].target_mean == meta["target_mean"]
    assert fitted["report"].target_std == meta["target_std"]
    # predictions are in z-units of the targets: their mean sits near 0
    preds = fitted["scorer"].score_texts(fitted["texts"])
    assert abs(preds.mean()) < 0.5


def test_save_load_gives_identical_predictions(fitted, tmp_path):
    scorer, cfg = fitted["scorer"], fitted["cfg"]
    scorer.save(tmp_path / "im", "tiny", cfg.train_encoder)
    loaded = InfluenceScorer.load(tmp_path / "im", CPU)
    texts = synthetic(30, seed=7)[0]
    assert np.array_equal(loaded.score_texts(texts), scorer.score_texts(texts))
    assert loaded.meta["target_mean"] == scorer.meta["target_mean"]
    assert loaded.meta["target_std"] == scorer.meta["target_std"]
    assert loaded.max_tokens == 32
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_loading_a_fitted_or_pretrained_encoder_reports_nothing_missing(fitted, tmp_path):
    """A fitted encoder is saved without its pooler; loading it (every scorer and worker
    does) logged transformers' "LOAD REPORT ... pooler MISSING" before it was built
    without one. MiniLM, whose checkpoint has a pooler, loads quietly too."""
    scorer, cfg = fitted["scorer"], fitted["cfg"]
    scorer.save(tmp_path / "im", "tiny", cfg.train_encoder)
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        loaded = InfluenceScorer.load(tmp_path / "im", CPU)
        load_encoder("minilm")
    finally:
        logger.removeHandler(handler)
    reports = [r.getMessage() for r in records if "LOAD REPORT" in r.getMessage()]
    assert not reports, reports
    assert getattr(loaded.model.encoder, "pooler", None) is None


def test_predictions_keep_input_order_despite_length_bucketing(fitted):
    texts = synthetic(40, seed=11)[0]
    scorer = fitted["scorer"]
    base = scorer.score_texts(texts, batch_size=8)
    perm = np.random.default_rng(0).permutation(len(texts))
    shuffled = scorer.score_texts([texts[i] for i in perm], batch_size=8)
    assert np.allclose(shuffled, base[perm], atol=1e-5)
    one_by_one = np.array([scorer.score_texts([t], batch_size=1)[0] for t in texts[:5]])
    assert np.allclose(one_by_one, base[:5], atol=1e-5)  # padding does not leak into the mean


def test_frozen_pretrained_encoder_is_referenced_not_copied(tmp_path):
    scorer = _scorer()
    scorer.save(tmp_path / "im", "minilm", train_encoder=False)
    assert not (tmp_path / "im" / "encoder").exists()
    meta = json.loads((tmp_path / "im" / "meta.json").read_text())
    assert meta["encoder"] == "minilm"
    scorer.save(tmp_path / "im2", "minilm", train_encoder=True)
    assert (tmp_path / "im2" / "encoder" / "config.json").is_file()


def test_non_finite_influences_are_rejected():
    texts, y = synthetic(20, seed=0)
    y[3] = np.nan
    with pytest.raises(DataError, match="NaN or infinite"):
        fit_influence_model(_scorer(), texts, y, _cfg("ridge"), seed=0)


def test_too_few_probes_are_rejected():
    texts, y = synthetic(9, seed=0)
    with pytest.raises(DataError, match=r"need at least 10 probes .*influence.cv_folds=5, got 9"):
        fit_influence_model(_scorer(), texts, y, _cfg("ridge"), seed=0)


def test_loading_a_non_model_dir_is_an_artifact_error(tmp_path):
    with pytest.raises(ArtifactError, match="no meta.json"):
        InfluenceScorer.load(tmp_path, CPU)


def test_corrupt_head_is_an_artifact_error(tmp_path):
    _scorer().save(tmp_path / "im", "tiny", train_encoder=False)
    (tmp_path / "im" / "head.safetensors").write_bytes(b"garbage")
    with pytest.raises(ArtifactError):
        InfluenceScorer.load(tmp_path / "im", CPU)


def test_length_batches_cover_every_index_once():
    lengths = [5, 1, 9, 3, 3, 7, 2]
    batches = length_batches(lengths, 3)
    flat = np.concatenate(batches).tolist()
    assert sorted(flat) == list(range(len(lengths)))
    assert [lengths[i] for i in flat] == sorted(lengths)
    assert all(len(b) <= 3 for b in batches)
