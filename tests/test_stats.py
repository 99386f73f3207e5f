"""The two correlation formulas the influence model is selected by."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mates.stats import pearson, rankdata, spearman


def test_rankdata_averages_ties():
    assert rankdata(np.array([10.0, 20.0, 20.0, 5.0])).tolist() == [2.0, 3.5, 3.5, 1.0]
    assert rankdata(np.array([3.0, 3.0, 3.0])).tolist() == [2.0, 2.0, 2.0]


def test_pearson_known_value():
    a = np.array([1.0, 2.0, 3.0, 4.0])
    b = np.array([1.0, 3.0, 2.0, 5.0])
    # sum of products of deviations 5.5, sums of squares 5 and 8.75: r = 5.5 / sqrt(43.75)
    assert pearson(a, b) == pytest.approx(5.5 / math.sqrt(43.75))
    assert pearson(a, -2 * a + 1) == pytest.approx(-1.0)


def test_spearman_is_invariant_to_monotone_transforms():
    rng = np.random.default_rng(0)
    x = rng.normal(size=50)
    assert spearman(x, np.exp(3 * x)) == pytest.approx(1.0)
    assert spearman(x, -(x**3)) == pytest.approx(-1.0)


def test_spearman_known_value_with_ties():
    # ranks a: 1, 2.5, 2.5, 4; b: 2, 1, 3, 4 -> Pearson of the ranks
    a = np.array([1.0, 2.0, 2.0, 3.0])
    b = np.array([20.0, 10.0, 30.0, 40.0])
    ra, rb = np.array([1, 2.5, 2.5, 4]), np.array([2, 1, 3, 4.0])
    assert spearman(a, b) == pytest.approx(float(np.corrcoef(ra, rb)[0, 1]))


@pytest.mark.parametrize(("a", "b"), [([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]), ([1.0], [2.0])])
def test_degenerate_inputs_give_nan(a, b):
    assert math.isnan(pearson(np.array(a), np.array(b)))
    assert math.isnan(spearman(np.array(a), np.array(b)))
