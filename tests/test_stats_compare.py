"""Statistics for the multi-seed comparison of data-selection arms.

The coverage checks are what the intervals promise: a 95% interval must contain the truth about
95% of the time on data where the truth is known. All generators are seeded, so the measured
coverages are fixed numbers; the bounds leave room for the Monte-Carlo error of the draw count.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from mates import stats
from mates.stats import (
    Interval,
    bootstrap_paired_difference,
    censored_summary,
    t_interval,
    tokens_to_match,
)

# --- Interval -----------------------------------------------------------------------------------


def test_interval_as_dict_rounds_and_maps_nan_to_none():
    iv = Interval(estimate=1.23456789, low=float("nan"), high=2.0000004, n=np.int64(7))
    assert iv.as_dict() == {"estimate": 1.234568, "low": None, "high": 2.0, "n": 7}
    assert type(iv.as_dict()["n"]) is int


# --- t_interval ---------------------------------------------------------------------------------


def test_t_interval_known_value():
    # values 1, 2, 3: mean 2, sd 1, t_{0.975, 2} = 4.302653 (table value), half = t / sqrt(3)
    iv = t_interval([1.0, 2.0, 3.0])
    half = 4.302652729911275 / math.sqrt(3)
    assert iv.n == 3
    assert iv.estimate == pytest.approx(2.0)
    assert (iv.low, iv.high) == pytest.approx((2.0 - half, 2.0 + half))
    # 90%: t_{0.95, 2} = 2.919986
    iv90 = t_interval(np.array([1.0, 2.0, 3.0]), confidence=0.90)
    assert iv90.high - iv90.estimate == pytest.approx(2.919985580353726 / math.sqrt(3))


def test_t_interval_of_constant_values_is_a_point():
    assert t_interval([4.0, 4.0, 4.0]) == Interval(4.0, 4.0, 4.0, 3)


@pytest.mark.parametrize("n", [3, 5])
def test_t_interval_covers_the_true_mean_95_percent(n):
    rng = np.random.default_rng(100 + n)
    true_mean = 2.0
    samples = rng.normal(true_mean, 1.5, size=(4000, n))
    hits = [(iv := t_interval(row)).low <= true_mean <= iv.high for row in samples]
    coverage = float(np.mean(hits))  # measured: 0.9503 (n=3), 0.9493 (n=5)
    assert 0.93 <= coverage <= 0.97, coverage


@pytest.mark.parametrize("values", [[], [1.0]])
def test_t_interval_needs_two_values(values):
    with pytest.raises(ValueError, match=f"at least 2 values, got {len(values)}"):
        t_interval(values)


def test_t_interval_rejects_nan_and_bad_confidence():
    with pytest.raises(ValueError, match="NaN"):
        t_interval([1.0, float("nan"), 3.0])
    for confidence in (0.0, 1.0, 95.0):
        with pytest.raises(ValueError, match="confidence"):
            t_interval([1.0, 2.0], confidence=confidence)


# --- bootstrap_paired_difference ----------------------------------------------------------------


def _arms(rng: np.random.Generator, *, seeds: int = 3, docs: int = 200, delta: float = 0.05):
    """Held-out documents with heterogeneous length and difficulty, two arms whose per-token
    loss differs by delta on average; the arm effect itself varies from document to document
    and every (seed, document) has its own noise. The true corpus-level difference is delta."""
    counts = rng.integers(20, 400, size=docs).astype(np.float64)
    difficulty = rng.gamma(4.0, 0.75, size=docs)  # per-token loss of a document, mean 3
    effect = delta + rng.normal(0.0, 0.3, size=docs)
    loss_b = difficulty + rng.normal(0.0, 0.2, size=(seeds, docs))
    loss_a = difficulty + effect + rng.normal(0.0, 0.2, size=(seeds, docs))
    return counts * loss_a, counts * loss_b, counts


def test_bootstrap_estimate_is_the_seed_mean_difference():
    a, b, counts = _arms(np.random.default_rng(1))
    iv = bootstrap_paired_difference(a, b, counts, n_boot=200)
    per_seed = a.sum(axis=1) / counts.sum() - b.sum(axis=1) / counts.sum()
    assert iv.estimate == pytest.approx(float(per_seed.mean()))
    assert iv.n == 200
    assert iv.low < iv.estimate < iv.high


def test_bootstrap_counts_per_seed_match_shared_counts():
    a, b, counts = _arms(np.random.default_rng(2))
    shared = bootstrap_paired_difference(a, b, counts, n_boot=300, seed=5)
    tiled = bootstrap_paired_difference(a, b, np.tile(counts, (3, 1)), n_boot=300, seed=5)
    for got, want in zip(tiled.as_dict().values(), shared.as_dict().values(), strict=True):
        assert got == pytest.approx(want)
    # counts that differ by seed enter each seed's denominator
    per_seed_counts = np.tile(counts, (3, 1))
    per_seed_counts[1] *= 2.0
    iv = bootstrap_paired_difference(a, b, per_seed_counts, n_boot=10)
    expected = np.mean((a.sum(axis=1) - b.sum(axis=1)) / per_seed_counts.sum(axis=1))
    assert iv.estimate == pytest.approx(float(expected))


def test_bootstrap_is_paired_across_arms_and_seeds():
    # A is B plus exactly delta per token on every document: document difficulty is wildly
    # heterogeneous, yet a paired resample sees the same difference in every replicate.
    rng = np.random.default_rng(3)
    counts = rng.integers(1, 500, size=150).astype(np.float64)
    b = counts * rng.gamma(2.0, 2.0, size=(4, 150))
    iv = bootstrap_paired_difference(b + 0.125 * counts, b, counts, n_boot=500)
    assert (iv.estimate, iv.low, iv.high) == pytest.approx((0.125, 0.125, 0.125))


def test_bootstrap_matches_an_index_resampling_reference():
    # Independent reference: draw D indices with replacement per replicate, vectorized.
    rng = np.random.default_rng(4)
    a, b, counts = _arms(rng, seeds=2, docs=60)
    idx = rng.integers(0, 60, size=(8000, 60))
    tokens = counts[idx].sum(axis=1)  # (B,)
    ref = ((a[:, idx].sum(axis=2) - b[:, idx].sum(axis=2)) / tokens).mean(axis=0)
    ref_low, ref_high = np.quantile(ref, [0.025, 0.975])
    iv = bootstrap_paired_difference(a, b, counts, n_boot=8000, seed=9)
    width = ref_high - ref_low
    assert abs(iv.low - ref_low) < 0.05 * width
    assert abs(iv.high - ref_high) < 0.05 * width


def test_bootstrap_is_seeded_and_chunking_does_not_change_it(monkeypatch):
    a, b, counts = _arms(np.random.default_rng(5), docs=40)
    first = bootstrap_paired_difference(a, b, counts, n_boot=1000, seed=3)
    assert bootstrap_paired_difference(a, b, counts, n_boot=1000, seed=3) == first
    assert bootstrap_paired_difference(a, b, counts, n_boot=1000, seed=4) != first
    monkeypatch.setattr(stats, "_BOOT_CHUNK_ELEMENTS", 40 * 7)  # 7 replicates per chunk
    chunked = bootstrap_paired_difference(a, b, counts, n_boot=1000, seed=3)
    assert (chunked.low, chunked.high) == pytest.approx((first.low, first.high))


def test_bootstrap_covers_a_known_difference():
    delta = 0.05
    rng = np.random.default_rng(6)
    hits = []
    for _ in range(200):
        a, b, counts = _arms(rng, delta=delta)
        iv = bootstrap_paired_difference(a, b, counts, n_boot=500, seed=int(rng.integers(2**31)))
        hits.append(iv.low <= delta <= iv.high)
    coverage = float(np.mean(hits))  # measured: 0.935; 0.9465 over 2000 draws at n_boot 2000
    assert 0.90 <= coverage <= 0.99, coverage


@pytest.mark.parametrize(
    ("a", "b", "counts", "message"),
    [
        (np.ones(5), np.ones(5), np.ones(5), r"sums_a must have shape \(seeds, documents\)"),
        (np.ones((2, 5)), np.ones((2, 4)), np.ones(5), r"sums_b has shape \(2, 4\)"),
        (np.ones((2, 5)), np.ones((2, 5)), np.ones(4), r"counts must have shape \(5,\)"),
        (np.ones((2, 5)), np.ones((2, 5)), np.ones((3, 5)), r"counts must have shape"),
        (np.ones((2, 0)), np.ones((2, 0)), np.ones(0), "at least one seed and one document"),
        (np.full((1, 2), np.nan), np.ones((1, 2)), np.ones(2), "sums_a contains NaN"),
        (np.ones((1, 2)), np.ones((1, 2)), np.array([1.0, -1.0]), "non-negative"),
        (np.ones((1, 2)), np.ones((1, 2)), np.zeros(2), "positive number of tokens"),
    ],
)
def test_bootstrap_rejects_bad_inputs(a, b, counts, message):
    with pytest.raises(ValueError, match=message):
        bootstrap_paired_difference(a, b, counts, n_boot=10)


def test_bootstrap_rejects_bad_settings():
    a = np.ones((1, 3))
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap_paired_difference(a, a, np.ones(3), n_boot=0)
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_paired_difference(a, a, np.ones(3), confidence=1.5)


# --- tokens_to_match ----------------------------------------------------------------------------


def test_tokens_to_match_interpolates_linearly():
    curve = [(100.0, 3.0), (200.0, 2.0), (300.0, 1.5)]
    assert tokens_to_match(curve, 2.5) == pytest.approx(150.0)
    assert tokens_to_match(curve, 1.75) == pytest.approx(250.0)


def test_tokens_to_match_exact_hit_returns_the_point():
    curve = [(100.0, 3.0), (200.0, 2.5), (300.0, 2.0)]
    assert tokens_to_match(curve, 2.5) == 200.0
    assert tokens_to_match(curve, 3.0) == 100.0
    assert tokens_to_match(curve, 5.0) == 100.0  # already below target at the first point


def test_tokens_to_match_censored_is_none():
    assert tokens_to_match([(100.0, 3.0), (200.0, 2.6)], 2.5) is None
    assert tokens_to_match([], 2.5) is None
    # the curve dips below target and comes back: the first crossing counts
    assert tokens_to_match([(1.0, 3.0), (2.0, 2.0), (3.0, 3.0)], 2.5) == pytest.approx(1.5)


def test_tokens_to_match_ignores_a_crossing_inside_the_shared_first_stage():
    # stage 1 ends at 100 tokens; the only crossing happens inside it (between 50 and 100)
    curve = [(50.0, 3.0), (100.0, 2.4), (200.0, 2.6), (400.0, 2.7)]
    assert tokens_to_match(curve, 2.5) == pytest.approx(50.0 + 0.5 / 0.6 * 50.0)
    assert tokens_to_match(curve, 2.5, start_tokens=200.0) is None
    assert tokens_to_match(curve, 2.5, start_tokens=101.0) is None


def test_tokens_to_match_never_interpolates_from_before_start():
    curve = [(100.0, 3.0), (200.0, 2.0)]
    assert tokens_to_match(curve, 2.5) == pytest.approx(150.0)
    # the first searched point already meets the target: its tokens, not an interpolation
    assert tokens_to_match(curve, 2.5, start_tokens=200.0) == 200.0
    assert tokens_to_match(curve, 2.5, start_tokens=150.0) == 200.0
    # start between points: search begins at 200 and interpolates from there on
    curve = [(100.0, 3.0), (200.0, 2.8), (300.0, 2.0)]
    assert tokens_to_match(curve, 2.4, start_tokens=150.0) == pytest.approx(250.0)
    assert tokens_to_match(curve, 2.4, start_tokens=100.0) == pytest.approx(250.0)
    assert tokens_to_match(curve, 2.4, start_tokens=301.0) is None


def test_tokens_to_match_handles_infinite_loss_and_rejects_bad_curves():
    assert tokens_to_match([(100.0, math.inf), (200.0, 2.0)], 2.5) == 200.0
    with pytest.raises(ValueError, match="sorted"):
        tokens_to_match([(200.0, 3.0), (100.0, 2.0)], 2.5)
    with pytest.raises(ValueError, match="NaN"):
        tokens_to_match([(100.0, float("nan")), (200.0, 2.0)], 2.5)


# --- censored_summary ---------------------------------------------------------------------------


def _summary(median, low, high, censored, n):
    return {"median": median, "min": low, "max": high, "censored": censored, "n": n}


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([3.0, 1.0, 2.0], _summary(2.0, 1.0, 3.0, 0, 3)),
        ([4.0, 1.0, 3.0, 2.0], _summary(2.5, 1.0, 4.0, 0, 4)),
        ([1.0, None, 2.0], _summary(2.0, 1.0, None, 1, 3)),
        ([None, 1.0, None], _summary(None, 1.0, None, 2, 3)),
        ([1.0, 3.0, 2.0, None], _summary(2.5, 1.0, None, 1, 4)),
        ([1.0, 2.0, None, None], _summary(None, 1.0, None, 2, 4)),
        ([None, None, None], _summary(None, None, None, 3, 3)),
        ([None, None], _summary(None, None, None, 2, 2)),
        ([5.0], _summary(5.0, 5.0, 5.0, 0, 1)),
        ([], _summary(None, None, None, 0, 0)),
    ],
)
def test_censored_summary(values, expected):
    assert censored_summary(values) == expected


def test_censored_summary_returns_plain_floats_and_rejects_nan():
    out = censored_summary([1, 2, 3])
    assert all(type(out[k]) is float for k in ("median", "min", "max"))
    with pytest.raises(ValueError, match="NaN"):
        censored_summary([1.0, float("nan")])
