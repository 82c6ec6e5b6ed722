"""The benchmarks' paired-ratio statistics (benchmarks/_common.py): the median ratio and its confidence interval."""

import statistics

from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import binom

from benchmarks._common import ratio, ratio_ci

distinct_ratios = st.lists(st.floats(0.5, 2.0), min_size=6, max_size=60, unique=True)


@settings(max_examples=60, deadline=None)
@given(distinct_ratios)
def test_the_interval_is_the_tightest_with_95_percent_coverage(values):
    t = {"kron": values, "dense": [1.0] * len(values)}
    lo, hi = ratio_ci(t, "kron", "dense")
    ratios = sorted(values)
    assert lo <= ratio(t, "kron", "dense") <= hi
    # [r_(k), r_(n-k+1)] misses the true median only when ≤ k - 1 ratios fall on one side: at most 5 %,
    # and k is the largest such (k + 1 would not cover 95 %), symmetric about the middle.
    n, k = len(ratios), ratios.index(lo) + 1
    assert ratios.index(hi) == n - k
    assert 2 * binom.cdf(k - 1, n, 0.5) <= 0.05
    assert 2 * binom.cdf(k, n, 0.5) > 0.05


def test_the_interval_narrows_with_more_repeats():
    """Same spread of ratios, four times the repeats: a narrower interval around the same median."""
    spread = [1.0 + 0.01 * i for i in range(-5, 6)]
    few = {"kron": spread, "dense": [1.0] * len(spread)}
    many = {"kron": spread * 4, "dense": [1.0] * 4 * len(spread)}
    (lo1, hi1), (lo2, hi2) = ratio_ci(few, "kron", "dense"), ratio_ci(many, "kron", "dense")
    assert hi2 - lo2 < hi1 - lo1
    assert statistics.median(spread) == ratio(many, "kron", "dense") == 1.0
