"""DSIR baseline: stable hashed n-gram features, importance weights, and ranking."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mates.dsir import NUM_BUCKETS, DsirModel, dsir_scores, feature_bucket, ngram_counts, tokenize
from mates.errors import DataError

SHARED = Path(__file__).resolve().parents[1] / "shared"


# ---------------------------------------------------------------- features


def test_bucket_values_are_frozen():
    # Hard-coded: changing the hash silently changes every DSIR score, so it must be deliberate.
    assert NUM_BUCKETS == 10_000
    assert feature_bucket("football") == 6556
    assert feature_bucket("the goal") == 5079
    assert feature_bucket("goal the") == 4091  # bigrams are order-sensitive
    assert [feature_bucket(w, 2) for w in "abxy"] == [0, 0, 0, 1]
    assert feature_bucket("a b", 2) == 1


def test_hash_is_stable_across_processes_with_different_hash_seeds():
    code = (
        "from mates.dsir import ngram_counts;"
        "m = ngram_counts(['The referee blew the whistle', 'goal!']);"
        "print(m.indices.tolist(), m.data.tolist(), m.indptr.tolist())"
    )
    outputs = set()
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(SHARED)}
        result = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        outputs.add(result.stdout)
    m = ngram_counts(["The referee blew the whistle", "goal!"])
    assert outputs == {f"{m.indices.tolist()} {m.data.tolist()} {m.indptr.tolist()}\n"}


def test_tokenize_lowercases_and_splits_on_non_word_characters():
    assert tokenize("Kick-off at 3pm, GOAL!") == ["kick", "off", "at", "3pm", "goal"]
    assert tokenize("  ...  ") == []


def test_ngram_counts_counts_unigrams_and_bigrams():
    # "a b a": unigrams a, b, a; bigrams "a b", "b a". Bigrams never cross texts.
    m = ngram_counts(["A b, a", "", "c", "a b"], num_buckets=NUM_BUCKETS)
    assert m.shape == (4, NUM_BUCKETS)
    dense = m.toarray()
    expected0 = np.zeros(NUM_BUCKETS)
    for feature in ["a", "b", "a", "a b", "b a"]:
        expected0[feature_bucket(feature)] += 1
    np.testing.assert_array_equal(dense[0], expected0)
    assert dense[1].sum() == 0
    expected2 = np.zeros(NUM_BUCKETS)
    expected2[feature_bucket("c")] = 1
    np.testing.assert_array_equal(dense[2], expected2)  # no "a c" / "c a" bigram across texts
    assert dense.sum(axis=1).tolist() == [5, 0, 1, 3]
    assert ngram_counts([]).shape == (0, NUM_BUCKETS)


def test_ngram_counts_in_two_buckets_by_hand():
    # a -> 0, b -> 0, "a b" -> 1 (pinned above)
    assert ngram_counts(["a b"], num_buckets=2).toarray().tolist() == [[2.0, 1.0]]


# ---------------------------------------------------------------- the model


def test_log_importance_matches_hand_computation():
    model = DsirModel(log_p_ref=np.log([0.75, 0.25]), log_p_raw=np.log([0.5, 0.5]))
    # "a b" has counts [2, 1]: 2 log(0.75/0.5) + 1 log(0.25/0.5)
    got = model.log_importance(["a b", "", "?!"])
    assert got.dtype == np.float64
    assert got[0] == pytest.approx(2 * math.log(1.5) + math.log(0.5))
    assert got[1:].tolist() == [0.0, 0.0]


def test_fit_uses_additive_smoothing_and_keeps_unseen_buckets_finite():
    # Two buckets: reference "y" counts [0, 1], raw "x" counts [1, 0]. With smoothing 1:
    # p_ref = [1/3, 2/3], p_raw = [2/3, 1/3], though each set leaves a bucket empty.
    model = DsirModel.fit(["y"], ["x"], num_buckets=2, smoothing=1.0)
    np.testing.assert_allclose(np.exp(model.log_p_ref), [1 / 3, 2 / 3])
    np.testing.assert_allclose(np.exp(model.log_p_raw), [2 / 3, 1 / 3])
    np.testing.assert_allclose(model.log_importance(["y", "x"]), [math.log(2), -math.log(2)])

    half = DsirModel.fit(["y"], ["x"], num_buckets=2, smoothing=0.5)
    np.testing.assert_allclose(np.exp(half.log_p_ref), [0.25, 0.75])

    big = DsirModel.fit(["football match"], ["pasta sauce"], smoothing=1.0)
    assert np.isfinite(big.log_p_ref).all() and np.isfinite(big.log_p_raw).all()
    assert np.exp(big.log_p_ref).sum() == pytest.approx(1.0)
    assert np.isfinite(big.log_importance(["never seen words whatsoever"])).all()


def test_fit_rejects_bad_smoothing():
    with pytest.raises(ValueError, match="smoothing"):
        DsirModel.fit(["a"], ["b"], smoothing=0.0)


@pytest.mark.parametrize(
    ("reference", "raw", "message"),
    [
        ([], ["some words"], "reference texts, got an empty list"),
        (["some words"], [], "raw \\(pool\\) texts, got an empty list"),
        (["", "!!!"], ["some words"], "reference texts contain no words"),
        (["some words"], ["   "], "raw \\(pool\\) texts contain no words"),
    ],
)
def test_empty_inputs_raise_data_error(reference, raw, message):
    with pytest.raises(DataError, match=message):
        DsirModel.fit(reference, raw)
    with pytest.raises(DataError, match=message):
        dsir_scores(reference, raw)


# ---------------------------------------------------------------- ranking

REFERENCE = [
    "The striker scored a late goal and the football match ended two to one.",
    "Fans cheered as the midfielder passed the ball and the team won the match.",
    "The referee showed a red card to the defender in the second half of the match.",
    "The goalkeeper saved a penalty and the football club stayed top of the league.",
    "After the final whistle the coach praised the team for the goal in extra time.",
    "The league match was tied until the striker headed the ball into the goal.",
]

FOOTBALL_POOL = [
    "The team won the football match after a goal from the striker in the second half.",
    "A penalty was saved by the goalkeeper and the referee blew the final whistle.",
    "The coach said the league match was hard but the team scored a late goal.",
    "The defender passed the ball to the midfielder and the striker scored the goal.",
    "Fans of the football club watched the match as the team climbed the league.",
]

COOKING_POOL = [
    "Chop the onions and garlic, then fry them gently in olive oil until soft.",
    "Whisk the eggs with sugar and flour, pour the batter into a tin and bake it.",
    "Simmer the tomato sauce for twenty minutes and season it with salt and basil.",
    "Knead the dough, let it rise for an hour, then shape the loaves for the oven.",
    "Stir the rice into the stock slowly and add butter and cheese before serving.",
]


def test_dsir_ranks_reference_like_documents_first():
    pool = [doc for pair in zip(FOOTBALL_POOL, COOKING_POOL, strict=True) for doc in pair]
    is_football = np.array([i % 2 == 0 for i in range(len(pool))])
    scores = dsir_scores(REFERENCE, pool)
    assert scores.shape == (len(pool),) and scores.dtype == np.float64
    assert scores[is_football].max() < scores[~is_football].min()

    keep = np.argsort(scores, kind="stable")[: len(pool) // 2]
    assert sorted(pool[i] for i in keep) == sorted(FOOTBALL_POOL)


def test_dsir_scores_are_negated_log_importance():
    pool = FOOTBALL_POOL + COOKING_POOL
    model = DsirModel.fit(REFERENCE, pool)
    np.testing.assert_allclose(dsir_scores(REFERENCE, pool), -model.log_importance(pool))


def test_scoring_speed_sanity():
    # Not a timed assertion: 2,000 documents of ~400 words should take a few seconds at most.
    rng = np.random.default_rng(0)
    vocab = np.array([f"w{i}" for i in range(20_000)])
    pool = [" ".join(vocab[rng.zipf(1.3, size=400) % len(vocab)]) for _ in range(2_000)]
    reference = pool[:200]
    start = time.perf_counter()
    scores = dsir_scores(reference, pool)
    elapsed = time.perf_counter() - start
    assert scores.shape == (2_000,) and np.isfinite(scores).all()
    print(f"DSIR: 2,000 docs x 400 words in {elapsed:.2f} s ({2_000 / elapsed:,.0f} docs/s)")
