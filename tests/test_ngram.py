"""The bag-of-hashed-n-grams encoder (`influence.encoder: ngram`): its features against a
count by hand, its reference feature against DSIR, the ridge fit, save and load, the FLOPs
it is charged, and a whole run that uses it."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from test_influence import CPU, synthetic

from mates.config import InfluenceConfig
from mates.dsir import DsirModel, feature_bucket, feature_buckets, ngram_counts
from mates.errors import ArtifactError, ConfigError
from mates.flops import encoder_cost
from mates.influence import InfluenceModel, InfluenceScorer, fit_influence_model, load_encoder
from mates.ngram import NgramEncoder, NgramTokenizer, is_ngram_dir

REFERENCE = [
    "the striker scored a late goal",
    "the goal keeper saved a penalty",
    "fans cheered the winning goal",
]
CORPUS = [
    "the minister said the budget will rise",
    "a late goal won the match",
    "the report on the market was late",
    "the cat sat on the mat",
    "",
]


def _features(enc: NgramEncoder, texts: list[str], max_words: int = 64) -> np.ndarray:
    scorer = InfluenceScorer(
        InfluenceModel(enc),
        NgramTokenizer(enc.config.num_buckets),
        max_words,
        CPU,
        precision="fp32",
    )
    return scorer.features(scorer.tokenize(texts), batch_size=2).numpy()


def test_feature_buckets_are_the_counted_features_in_order():
    texts = ["The goal is here", "", "a b a", "x"]
    buckets = feature_buckets(texts, 97)
    counts = ngram_counts(texts, 97).toarray()
    for row, ids in zip(counts, buckets, strict=True):
        assert np.array_equal(np.bincount(ids, minlength=97), row)
    assert buckets[0][:4] == [feature_bucket(w, 97) for w in ("the", "goal", "is", "here")]
    assert buckets[0][4] == feature_bucket("the goal", 97)
    assert buckets[1] == [] and feature_buckets([], 97) == []
    # max_words keeps the first words and only the bigrams among them
    assert feature_buckets(texts, 97, max_words=2)[0] == [*buckets[0][:2], buckets[0][4]]
    with pytest.raises(TypeError, match="sequence of texts"):
        feature_buckets("a text", 97)


def test_bag_is_log_counts_with_unit_norm_and_the_last_feature_is_standardized_dsir():
    enc = NgramEncoder.fit(REFERENCE, CORPUS, num_buckets=512)
    feats = _features(enc, CORPUS[:4])
    assert feats.shape == (4, 513)
    counts = ngram_counts(CORPUS[:4], 512).toarray()
    bag = np.log1p(counts) / np.linalg.norm(np.log1p(counts), axis=1, keepdims=True)
    assert np.allclose(feats[:, :512], bag, atol=1e-6)
    dsir = DsirModel.fit(REFERENCE, CORPUS, 512)
    per_ngram = dsir.log_importance(CORPUS) / np.maximum(ngram_counts(CORPUS, 512).sum(1).A1, 1)
    mean, std = per_ngram.mean(), per_ngram.std()
    assert np.allclose(feats[:, 512], (per_ngram[:4] - mean) / std, atol=1e-5)
    # the football text is the most reference-like; an empty text has no bag and sits at 0
    assert int(np.argmax(feats[:, 512])) == 1
    empty = _features(enc, [""])
    assert np.all(empty[0, :512] == 0) and empty[0, 512] == pytest.approx(-mean / std, abs=1e-5)


def test_fitted_ridge_head_finds_a_keyword_and_survives_save_and_load(tmp_path):
    texts, y = synthetic(120, seed=3)
    enc = NgramEncoder.fit(REFERENCE, texts, num_buckets=1024)
    scorer = InfluenceScorer(InfluenceModel(enc), NgramTokenizer(1024), 32, CPU)
    cfg = InfluenceConfig(
        encoder="ngram", max_tokens=32, train_encoder=False, head_fit="ridge", cv_folds=5
    )
    report = fit_influence_model(scorer, texts, y, cfg, seed=0)
    assert report.fit == "ridge" and report.val_spearman > 0.7  # one keyword sets the target
    scorer.save(tmp_path / "im", "ngram", train_encoder=False)
    assert is_ngram_dir(tmp_path / "im" / "encoder")
    assert json.loads((tmp_path / "im" / "meta.json").read_text())["encoder"] == "encoder"
    loaded = InfluenceScorer.load(tmp_path / "im", CPU)
    probe = synthetic(20, seed=4)[0]
    assert np.array_equal(loaded.score_texts(probe), scorer.score_texts(probe))
    assert torch.equal(loaded.model.encoder.log_ratio, enc.log_ratio)


def test_bf16_and_compile_settings_leave_the_bag_in_fp32():
    enc = NgramEncoder.fit(REFERENCE, CORPUS, num_buckets=256)
    fp32 = InfluenceScorer(InfluenceModel(enc), NgramTokenizer(256), 32, CPU, precision="fp32")
    bf16 = InfluenceScorer(
        InfluenceModel(enc), NgramTokenizer(256), 32, CPU, precision="bf16", compile=True
    )
    a = fp32.features(fp32.tokenize(CORPUS), 2)
    b = bf16.features(bf16.tokenize(CORPUS), 2)
    assert b.dtype == torch.float32 and torch.equal(a, b)


def test_unreadable_or_inconsistent_saved_encoders_are_artifact_errors(tmp_path):
    enc = NgramEncoder.fit(REFERENCE, CORPUS, num_buckets=64)
    enc.save_pretrained(tmp_path / "enc")
    assert is_ngram_dir(tmp_path / "enc") and not is_ngram_dir(tmp_path)
    loaded, tok = load_encoder(str(tmp_path / "enc"))
    assert isinstance(loaded, NgramEncoder) and tok.pad_token_id == 64
    cfg = json.loads((tmp_path / "enc" / "config.json").read_text())
    (tmp_path / "enc" / "config.json").write_text(json.dumps({**cfg, "num_buckets": 65}))
    with pytest.raises(ArtifactError, match="65 buckets"):
        load_encoder(str(tmp_path / "enc"))
    (tmp_path / "enc" / "ngram.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ArtifactError, match="unreadable"):
        load_encoder(str(tmp_path / "enc"))


def test_ngram_by_name_and_fine_tuning_it_are_config_errors():
    with pytest.raises(ConfigError, match="fitted on the run's reference"):
        load_encoder("ngram")
    with pytest.raises(ValueError, match="no weights to fine-tune"):
        InfluenceConfig(encoder="ngram", train_encoder=True)
    InfluenceConfig(encoder="ngram", train_encoder=False)


def test_flops_are_four_per_word():
    enc = NgramEncoder.fit(REFERENCE, CORPUS, num_buckets=64)
    assert encoder_cost(enc, 128).forward(128) == 4 * 128


def test_a_run_with_the_ngram_encoder_selects_and_charges_next_to_nothing(
    tiny_config_factory, tmp_path
):
    from mates.artifacts import RunPaths
    from mates.run import Run

    cfg = tiny_config_factory(
        "influence.encoder=ngram", "influence.train_encoder=false", "influence.head_fit=ridge"
    )
    manifest = Run(cfg, tmp_path / "run", progress=False).execute().data
    assert [s["state"] for s in manifest["stages"]] == ["done"] * cfg.stages.num_stages
    for k in range(cfg.stages.num_stages - 1):
        metrics = manifest["stages"][k]["metrics"]
        assert metrics["influence_model"]["fit"] == "ridge"
        assert metrics["encoder_flops_per_doc"] == 4 * cfg.influence.max_tokens
        assert is_ngram_dir(RunPaths(tmp_path / "run").influence_model(k) / "encoder")
        flops = metrics["flops"]
        assert flops["score"] < 1e-3 * flops["train"] and math.isfinite(flops["fit"])
