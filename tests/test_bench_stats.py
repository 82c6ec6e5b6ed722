"""The benchmarks' paired-ratio statistics (benchmarks/_common.py): the median ratio and its confidence interval, and
the geometric mean over processes and its t-interval."""

import math
import statistics

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats
from scipy.stats import binom

from benchmarks._common import ratio, ratio_ci, replicate_ci

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


positive_ratios = st.lists(st.floats(0.5, 2.0), min_size=2, max_size=12)


@settings(max_examples=60, deadline=None)
@given(positive_ratios, st.floats(0.5, 2.0))
def test_replicate_interval_is_the_t_interval_of_the_logs_and_scales_with_the_ratios(values, scale):
    gm, lo, hi = replicate_ci(values)
    logs = np.log(values)
    want = stats.t.interval(0.95, len(values) - 1, loc=logs.mean(), scale=stats.sem(logs)) if logs.std() > 0 else None
    assert lo <= gm <= hi
    assert math.isclose(math.log(gm), logs.mean(), abs_tol=1e-9)
    if want is not None:
        assert np.allclose(np.log([lo, hi]), want, atol=1e-9)
    assert np.allclose(replicate_ci([v * scale for v in values]), [gm * scale, lo * scale, hi * scale], rtol=1e-9)


def test_replicate_interval_covers_the_true_ratio_95_percent_of_the_time():
    """Six log-normal per-process ratios around 1.03 (spread as measured, 2 %), 2,000 times."""
    rng = np.random.default_rng(0)
    hits = sum(lo <= 1.03 <= hi for _, lo, hi in (replicate_ci(list(1.03 * np.exp(rng.normal(0, 0.02, 6))))
                                                    for _ in range(2000)))
    assert 0.93 <= hits / 2000 <= 0.97


def test_one_process_has_no_interval():
    gm, lo, hi = replicate_ci([1.04])
    assert math.isclose(gm, 1.04) and math.isnan(lo) and math.isnan(hi)
