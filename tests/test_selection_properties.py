"""Properties of selection that must hold for any pool, scores, ratio and seed (hypothesis)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from mates.errors import ConfigError, DataError
from mates.selection import gumbel_top_k, join_scores, num_selected, select_ids, select_indices

# for these tests only (a global profile would change the other hypothesis users' too)
props = settings(deadline=None, max_examples=150)

finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)
ratios = st.floats(min_value=1e-3, max_value=1.0, exclude_min=False)
seeds = st.integers(min_value=0, max_value=2**32 - 1)
temperatures = st.floats(min_value=1e-3, max_value=1e3)
methods = st.sampled_from(["gumbel", "topk", "random"])


@st.composite
def pools(draw, unique: bool = False):
    """Scores of a pool of 1 to 60 documents."""
    n = draw(st.integers(min_value=1, max_value=60))
    return np.array(draw(st.lists(finite, min_size=n, max_size=n, unique=unique)), dtype=np.float64)


def _select(scores, ratio, method, seed, temperature=0.5):
    return select_indices(
        scores, len(scores), ratio=ratio, method=method, temperature=temperature, seed=seed
    )


@props
@given(pools(), ratios, methods, seeds, temperatures)
def test_exactly_k_distinct_indices_from_the_pool(scores, ratio, method, seed, temperature):
    chosen = _select(scores, ratio, method, seed, temperature)
    k = num_selected(len(scores), ratio)
    assert k == max(1, min(len(scores), round(ratio * len(scores))))
    assert len(chosen) == k == len(set(chosen.tolist()))
    assert all(0 <= i < len(scores) for i in chosen.tolist())


@props
@given(pools(), ratios, methods, seeds)
def test_the_same_seed_selects_the_same(scores, ratio, method, seed):
    a = _select(scores, ratio, method, seed)
    b = _select(scores.copy(), ratio, method, seed)
    assert a.tolist() == b.tolist()


@props
@given(pools(), ratios, seeds)
def test_top_k_keeps_the_lowest_scores_and_ignores_the_seed(scores, ratio, seed):
    chosen = _select(scores, ratio, "topk", seed)
    rest = np.setdiff1d(np.arange(len(scores)), chosen)
    if len(rest):
        assert scores[chosen].max() <= scores[rest].min()
        ties = rest[scores[rest] == scores[chosen].max()]
        assert all(t > chosen[scores[chosen] == scores[chosen].max()].max() for t in ties)
    assert chosen.tolist() == _select(scores, ratio, "topk", seed + 1).tolist()


@props
@given(pools(unique=True), ratios, st.randoms(use_true_random=False))
def test_top_k_picks_the_same_documents_whatever_their_order(scores, ratio, rnd):
    perm = np.array(rnd.sample(range(len(scores)), len(scores)))  # position i holds scores[perm[i]]
    chosen = set(_select(scores, ratio, "topk", 0).tolist())
    chosen_permuted = {int(perm[i]) for i in _select(scores[perm], ratio, "topk", 0)}
    assert chosen_permuted == chosen


@props
@given(pools(), ratios, seeds, st.integers(min_value=-20, max_value=20))
def test_gumbel_depends_on_scores_only_through_score_over_temperature(scores, ratio, seed, e):
    scale = 2.0**e  # a power of two scales exactly, so no rounding can flip a near tie
    a = _select(scores, ratio, "gumbel", seed, temperature=0.5)
    b = _select(scores * scale, ratio, "gumbel", seed, temperature=0.5 * scale)
    assert a.tolist() == b.tolist()


@props
@given(st.integers(min_value=2, max_value=60), ratios, seeds, st.randoms(use_true_random=False))
def test_gumbel_at_a_tiny_temperature_is_top_k(n, ratio, seed, rnd):
    scores = np.array(rnd.sample(range(-1000, 1000), n), dtype=np.float64)  # gaps of at least 1
    gumbel = _select(scores, ratio, "gumbel", seed, temperature=1e-6)
    assert gumbel.tolist() == _select(scores, ratio, "topk", seed).tolist()  # also in draw order


@props
@given(st.integers(min_value=1, max_value=60), seeds)
def test_gumbel_draws_come_out_in_draw_order(n, seed):
    scores = np.random.default_rng(seed).normal(size=n)
    rng = np.random.default_rng(seed)
    keys = -scores / 0.5 + np.random.default_rng(seed).gumbel(size=n)
    order = gumbel_top_k(scores, n, 0.5, rng)
    assert np.all(np.diff(keys[order]) <= 0)


@props
@given(
    st.one_of(
        st.floats(max_value=0.0), st.floats(min_value=1.0, exclude_min=True), st.just(math.nan)
    ),
    methods,
)
def test_a_ratio_outside_the_unit_interval_is_refused(ratio, method):
    with pytest.raises(ConfigError, match=r"`selection.ratio` must be in \(0, 1\]"):
        _select(np.zeros(10), ratio, method, 0)


@props
@given(
    pools(),
    st.sampled_from([math.nan, math.inf, -math.inf]),
    st.data(),
    st.sampled_from(["gumbel", "topk"]),
)
def test_nan_or_infinite_scores_are_refused(scores, bad, data, method):
    i = data.draw(st.integers(min_value=0, max_value=len(scores) - 1))
    scores[i] = bad
    with pytest.raises(DataError, match="NaN or infinite"):
        _select(scores, 0.5, method, 0)


@props
@given(pools(), st.one_of(st.floats(max_value=0.0), st.just(math.nan)))
def test_a_temperature_not_above_zero_is_refused(scores, temperature):
    with pytest.raises(ConfigError, match="`selection.temperature` must be > 0"):
        _select(scores, 0.5, "gumbel", 0, temperature=temperature)


@props
@given(pools(), st.integers(min_value=-3, max_value=3).filter(bool))
def test_scores_of_the_wrong_length_are_refused(scores, off):
    assume(len(scores) + off > 0)
    with pytest.raises(DataError, match="one score per pool document"):
        select_indices(scores, len(scores) + off, ratio=0.5, method="topk", temperature=0.5, seed=0)


@props
@given(
    st.lists(finite, min_size=1, max_size=40, unique=True),
    st.randoms(use_true_random=False),
    ratios,
    seeds,
)
def test_scores_join_by_id_whatever_the_row_order(values, rnd, ratio, seed):
    ids = [f"doc-{i}" for i in range(len(values))]
    rows = [{"id": d, "score": v} for d, v in zip(ids, values, strict=True)]
    shuffled = rnd.sample(rows, len(rows))
    assert join_scores(ids, shuffled).tolist() == values
    picked = select_ids(rows, fraction=ratio, method="topk", temperature=0.5, seed=seed)
    assert sorted(picked) == sorted(
        select_ids(shuffled, fraction=ratio, method="topk", temperature=0.5, seed=seed)
    )
    gumbel = select_ids(rows, fraction=ratio, method="gumbel", temperature=0.5, seed=seed)
    assert len(gumbel) == len(set(gumbel)) == num_selected(len(rows), ratio)
    assert set(gumbel) <= set(ids)
