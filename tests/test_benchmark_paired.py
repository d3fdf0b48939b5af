"""The interval benchmarks/paired.py states for a median of per-round ratios: the properties it claims."""

import math
import sys
from pathlib import Path

from hypothesis import given, strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from paired import median_interval  # noqa: E402

ratios = st.lists(st.floats(0.5, 2.0, allow_nan=False), min_size=1, max_size=40)
distinct = st.lists(st.floats(0.5, 2.0, allow_nan=False), min_size=1, max_size=40, unique=True)  # ranks readable


@given(ratios, st.sampled_from([0.8, 0.9, 0.95, 0.99]))
def test_interval_holds_the_sample_median_and_is_made_of_samples(values, confidence):
    low, high, _ = median_interval(values, confidence)
    ordered = sorted(values)
    assert low in values and high in values
    assert low <= ordered[(len(values) - 1) // 2] <= ordered[len(values) // 2] <= high


@given(distinct, st.sampled_from([0.8, 0.9, 0.95, 0.99]))
def test_stated_confidence_is_the_binomial_coverage_and_the_narrowest_that_reaches_it(values, confidence):
    n = len(values)
    low, high, achieved = median_interval(values, confidence)
    ordered = sorted(values)
    j = ordered.index(low) + 1  # 1-based rank of the lower bound
    assert ordered[n - j] == high  # symmetric ranks
    exact = 1 - 2 * sum(math.comb(n, i) for i in range(j)) / 2**n
    assert math.isclose(achieved, max(0.0, exact), abs_tol=1e-12)
    whole_range = j == 1
    assert achieved >= confidence or whole_range
    if j + 1 <= (n + 1) // 2:  # one step narrower would not reach the confidence
        narrower = 1 - 2 * sum(math.comb(n, i) for i in range(j + 1)) / 2**n
        assert narrower < confidence


def test_known_values():
    # n = 15: [x_(4), x_(12)] covers 1 - 2 * P(B <= 3) = 0.9648 >= 0.95, [x_(5), x_(11)] only 0.8815.
    low, high, achieved = median_interval(list(range(1, 16)), 0.95)
    assert (low, high) == (4, 12) and math.isclose(achieved, 1 - 2 * (1 + 15 + 105 + 455) / 2**15)
    # n = 5 cannot reach 95 %: the whole range, at 1 - 2 / 32.
    assert median_interval([3, 1, 2, 5, 4], 0.95) == (1, 5, 1 - 2 / 32)
