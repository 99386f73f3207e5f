"""Selection: Gumbel-top-k against its closed form, top-k, random, seeding, ID joins."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from mates.errors import ConfigError, DataError
from mates.selection import (
    gumbel_top_k,
    join_scores,
    num_selected,
    select_ids,
    select_indices,
    top_k,
)

SCORES = np.array([0.0, 0.3, -0.2, 0.8, 0.1])
TAU = 0.5
N_DRAWS = 20_000
Z = 5.0  # tolerance in standard errors of a frequency over N_DRAWS draws


def softmax_neg(scores: np.ndarray, tau: float) -> np.ndarray:
    w = np.exp(-(scores - scores.min()) / tau)
    return w / w.sum()


def inclusion_closed_form(p: np.ndarray, k: int) -> np.ndarray:
    """P(i among k successive draws without replacement), summed over ordered k-tuples."""
    incl = np.zeros(len(p))
    for seq in itertools.permutations(range(len(p)), k):
        prob, left = 1.0, 1.0
        for i in seq:
            prob *= p[i] / left
            left -= p[i]
        for i in seq:
            incl[i] += prob
    return incl


def assert_frequencies(freq: np.ndarray, expected: np.ndarray, n: int) -> None:
    se = np.sqrt(expected * (1 - expected) / n)
    z = np.abs(freq - expected) / se
    assert np.all(z < Z), f"frequencies {freq} vs closed form {expected}: z = {z}"


@pytest.fixture(scope="module")
def gumbel_draws():
    """N seeded draws of k=2 from 5 items through the public entry point (draw order kept)."""
    return np.array(
        [
            select_indices(SCORES, len(SCORES), ratio=0.4, method="gumbel", temperature=TAU, seed=s)
            for s in range(N_DRAWS)
        ]
    )


def test_closed_form_helper_is_a_distribution():
    p = softmax_neg(SCORES, TAU)
    assert inclusion_closed_form(p, 1) == pytest.approx(p)
    assert inclusion_closed_form(p, 2).sum() == pytest.approx(2.0)
    assert inclusion_closed_form(p, len(p)) == pytest.approx(np.ones(len(p)))


def test_gumbel_first_pick_matches_softmax_of_negative_scores(gumbel_draws):
    assert gumbel_draws.shape == (N_DRAWS, 2)
    p = softmax_neg(SCORES, TAU)
    freq = np.bincount(gumbel_draws[:, 0], minlength=5) / N_DRAWS
    assert_frequencies(freq, p, N_DRAWS)


def test_gumbel_inclusion_matches_sampling_without_replacement(gumbel_draws):
    assert all(a != b for a, b in gumbel_draws)  # without replacement
    incl = inclusion_closed_form(softmax_neg(SCORES, TAU), 2)
    freq = np.bincount(gumbel_draws.ravel(), minlength=5) / N_DRAWS
    assert_frequencies(freq, incl, N_DRAWS)


def test_the_distribution_test_rejects_the_reference_codes_sampler():
    """Noise added to score/τ keeping the smallest (the public code's bug) must fail the check."""
    rng = np.random.default_rng(0)
    first = np.zeros(5)
    for _ in range(N_DRAWS):
        keys = SCORES / TAU + rng.gumbel(size=5)
        first[np.argmin(keys)] += 1
    p = softmax_neg(SCORES, TAU)
    with pytest.raises(AssertionError):
        assert_frequencies(first / N_DRAWS, p, N_DRAWS)


def test_gumbel_second_pick_conditional_on_first():
    """Given first pick j, the second is drawn from the renormalised rest: p_i / (1 - p_j)."""
    rng = np.random.default_rng(1)
    draws = np.array([gumbel_top_k(SCORES, 2, TAU, rng) for _ in range(N_DRAWS)])
    p = softmax_neg(SCORES, TAU)
    j = int(np.argmax(p))
    second = draws[draws[:, 0] == j, 1]
    expected = p / (1 - p[j])
    expected[j] = 0.0
    freq = np.bincount(second, minlength=5) / len(second)
    mask = expected > 0
    assert_frequencies(freq[mask], expected[mask], len(second))
    assert freq[j] == 0


def test_lower_score_is_preferred():
    scores = np.array([5.0, 5.0, -5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0])
    for seed in range(50):
        chosen = select_indices(scores, 10, ratio=0.1, method="gumbel", temperature=TAU, seed=seed)
        assert chosen.tolist() == [2]


def test_temperature_controls_sharpness():
    scores = np.linspace(0, 1, 20)
    low = [
        select_indices(scores, 20, ratio=0.25, method="gumbel", temperature=0.01, seed=s)
        for s in range(20)
    ]
    assert all(sorted(c.tolist()) == list(range(5)) for c in low)  # τ→0 is top-k
    high = {
        tuple(
            sorted(
                select_indices(
                    scores, 20, ratio=0.25, method="gumbel", temperature=100.0, seed=s
                ).tolist()
            )
        )
        for s in range(20)
    }
    assert len(high) > 10  # τ→∞ is close to uniform


def test_topk_picks_lowest_scores():
    rng = np.random.default_rng(3)
    scores = rng.normal(size=50)
    chosen = select_indices(scores, 50, ratio=0.2, method="topk", temperature=TAU, seed=0)
    assert len(chosen) == 10
    assert set(chosen.tolist()) == set(np.argsort(scores)[:10].tolist())
    assert scores[chosen].max() < np.sort(scores)[10]
    assert top_k(np.array([1.0, 0.0, 0.0, 2.0]), 2).tolist() == [1, 2]  # ties by position


def test_topk_ignores_seed():
    scores = np.random.default_rng(4).normal(size=30)
    a = select_indices(scores, 30, ratio=0.3, method="topk", temperature=TAU, seed=0)
    b = select_indices(scores, 30, ratio=0.3, method="topk", temperature=TAU, seed=99)
    assert a.tolist() == b.tolist()


def test_random_is_uniform_and_ignores_scores():
    n, ratio, draws = 10, 0.2, 5000
    counts = np.zeros(n)
    skewed = np.array([-100.0] + [100.0] * (n - 1))  # gumbel would always take item 0
    for seed in range(draws):
        a = select_indices(skewed, n, ratio=ratio, method="random", temperature=TAU, seed=seed)
        b = select_indices(None, n, ratio=ratio, method="random", temperature=TAU, seed=seed)
        assert a.tolist() == b.tolist()
        assert len(set(a.tolist())) == 2
        counts[a] += 1
    assert_frequencies(counts / draws, np.full(n, ratio), draws)


@pytest.mark.parametrize("method", ["gumbel", "random"])
def test_same_seed_same_selection_different_seed_different(method):
    scores = np.random.default_rng(5).normal(size=200)
    kw = dict(ratio=0.2, method=method, temperature=TAU)
    a = select_indices(scores, 200, seed=7, **kw)
    b = select_indices(scores, 200, seed=7, **kw)
    c = select_indices(scores, 200, seed=8, **kw)
    assert a.tolist() == b.tolist()
    assert set(a.tolist()) != set(c.tolist())


def test_seed_may_be_a_sequence():
    """The run seeds each stage's selection with [run seed, stage, tag]."""
    scores = np.random.default_rng(6).normal(size=100)
    kw = dict(ratio=0.2, method="gumbel", temperature=TAU)
    assert (
        select_indices(scores, 100, seed=[0, 1, 11], **kw).tolist()
        == select_indices(scores, 100, seed=[0, 1, 11], **kw).tolist()
    )
    assert set(select_indices(scores, 100, seed=[0, 1, 11], **kw).tolist()) != set(
        select_indices(scores, 100, seed=[0, 2, 11], **kw).tolist()
    )


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.5, float("nan")])
def test_ratio_outside_unit_interval_is_a_config_error(ratio):
    with pytest.raises(ConfigError, match=r"`selection.ratio` must be in \(0, 1\]"):
        select_indices(np.zeros(10), 10, ratio=ratio, method="gumbel", temperature=TAU, seed=0)


def test_ratio_one_keeps_everything():
    chosen = select_indices(np.arange(7.0), 7, ratio=1.0, method="gumbel", temperature=TAU, seed=0)
    assert sorted(chosen.tolist()) == list(range(7))


@pytest.mark.parametrize(
    ("pool", "ratio", "k"), [(200, 0.2, 40), (10, 0.3, 3), (10, 0.01, 1), (3, 1.0, 3), (7, 0.5, 4)]
)
def test_num_selected(pool, ratio, k):
    assert num_selected(pool, ratio) == k


@pytest.mark.parametrize("method", ["gumbel", "topk", "random"])
def test_empty_pool_is_a_data_error(method):
    with pytest.raises(DataError, match="empty pool"):
        select_indices(np.array([]), 0, ratio=0.5, method=method, temperature=TAU, seed=0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("method", ["gumbel", "topk"])
def test_non_finite_scores_are_a_data_error(method, bad):
    scores = np.array([0.1, bad, 0.3, 0.4])
    with pytest.raises(DataError, match="NaN or infinite"):
        select_indices(scores, 4, ratio=0.5, method=method, temperature=TAU, seed=0)


def test_score_count_must_match_pool():
    with pytest.raises(DataError, match="one score per pool document"):
        select_indices(np.zeros(3), 4, ratio=0.5, method="gumbel", temperature=TAU, seed=0)
    with pytest.raises(DataError, match="one score per pool document"):
        select_indices(None, 4, ratio=0.5, method="topk", temperature=TAU, seed=0)


def test_unknown_method_and_bad_temperature_are_config_errors():
    with pytest.raises(ConfigError, match="`selection.method`"):
        select_indices(np.zeros(4), 4, ratio=0.5, method="best", temperature=TAU, seed=0)
    with pytest.raises(ConfigError, match="`selection.temperature`"):
        select_indices(np.zeros(4), 4, ratio=0.5, method="gumbel", temperature=0.0, seed=0)


# --------------------------------------------------------------------------- ID joins


POOL_IDS = [f"doc-{i:03d}" for i in range(20)]


def _rows(ids=POOL_IDS):
    return [{"id": d, "score": float(i) / 7} for i, d in enumerate(ids)]


def test_join_scores_aligns_by_id_not_row_order():
    rows = _rows()
    expected = np.array([r["score"] for r in rows])
    for seed in range(5):
        shuffled = rows[:]
        random.Random(seed).shuffle(shuffled)
        assert np.array_equal(join_scores(POOL_IDS, shuffled), expected)
    reversed_pool = POOL_IDS[::-1]
    assert np.array_equal(join_scores(reversed_pool, rows), expected[::-1])


def test_join_scores_missing_id():
    with pytest.raises(DataError, match=r"1 pool documents have no score.*doc-005"):
        join_scores(POOL_IDS, [r for r in _rows() if r["id"] != "doc-005"])


def test_join_scores_duplicate_id():
    rows = _rows() + [{"id": "doc-003", "score": 0.0}]
    with pytest.raises(DataError, match="duplicate score for id 'doc-003'"):
        join_scores(POOL_IDS, rows)


def test_join_scores_unknown_id():
    rows = _rows() + [{"id": "stranger", "score": 0.0}]
    with pytest.raises(DataError, match="outside the pool.*stranger"):
        join_scores(POOL_IDS, rows)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), None, "0.5", True])
def test_join_scores_non_finite_or_non_numeric_score(bad):
    rows = _rows()
    rows[4] = {"id": "doc-004", "score": bad}
    with pytest.raises(DataError, match="score for id 'doc-004' is not a finite number"):
        join_scores(POOL_IDS, rows)


@pytest.mark.parametrize("bad_id", [None, 7])
def test_join_scores_row_without_string_id(bad_id):
    rows = _rows()
    rows[2] = {"id": bad_id, "score": 0.0}
    with pytest.raises(DataError, match="without a string `id`"):
        join_scores(POOL_IDS, rows)


def test_select_ids_returns_ids_of_the_lowest_scores_under_topk():
    rows = _rows()
    random.Random(0).shuffle(rows)
    ids = select_ids(rows, fraction=0.25, method="topk", temperature=TAU, seed=0)
    assert ids == [f"doc-{i:03d}" for i in range(5)]


def test_select_ids_is_seeded_and_returns_pool_ids():
    rows = _rows()
    a = select_ids(rows, fraction=0.3, method="gumbel", temperature=TAU, seed=1)
    assert a == select_ids(rows, fraction=0.3, method="gumbel", temperature=TAU, seed=1)
    assert len(a) == 6 and len(set(a)) == 6 and set(a) <= set(POOL_IDS)


@pytest.mark.parametrize("bad_row", [["doc-001", 0.5], "doc-001", None])
def test_join_scores_row_that_is_not_an_object(bad_row):
    rows = _rows()
    rows[1] = bad_row
    with pytest.raises(DataError):
        join_scores(POOL_IDS, rows)
