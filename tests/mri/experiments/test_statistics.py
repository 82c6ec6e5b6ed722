"""kronify.mri.experiments.statistics against hand-computed values, textbook t-table entries and an exact enumeration."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kronify.mri.experiments.statistics import average_over_seeds, paired_comparison, summarize_seeds

# two-sided 95 % / 90 % critical values from a printed t-table (e.g. any statistics textbook's appendix)
T_TABLE_975 = {4: 2.776, 9: 2.262}
T_TABLE_950 = {4: 2.132}


def pairs(differences: list[float]) -> tuple[dict[str, float], dict[str, float]]:
    """Kronecker and dense rows whose per-volume differences are ``differences`` (dense is a varying baseline)."""
    dense = {f"vol{i:02d}": 30.0 + 0.5 * i for i in range(len(differences))}
    kron = {name: dense[name] + d for name, d in zip(sorted(dense), differences)}
    return kron, dense


def exact_wilcoxon_p(differences: list[float]) -> float:
    """Two-sided exact signed-rank p-value by enumerating all 2**n sign patterns (no ties, no zeros)."""
    magnitudes = sorted(abs(d) for d in differences)
    ranks = {m: r + 1 for r, m in enumerate(magnitudes)}
    observed = sum(ranks[abs(d)] for d in differences if d > 0)
    totals = [sum(r for r, s in zip(range(1, len(differences) + 1), signs) if s)
              for signs in itertools.product((0, 1), repeat=len(differences))]
    low = sum(t <= observed for t in totals) / len(totals)
    high = sum(t >= observed for t in totals) / len(totals)
    return min(1.0, 2 * min(low, high))


# ------------------------------------------------------------------------------------------- over seeds


def test_mean_and_sample_std_by_hand() -> None:
    s = summarize_seeds([1.0, 2.0, 3.0, 4.0])
    assert s.n == 4 and s.mean == pytest.approx(2.5)
    assert s.std == pytest.approx(math.sqrt((1.5**2 + 0.5**2 + 0.5**2 + 1.5**2) / 3))  # ddof = 1: 1.2910
    assert s.format(2) == "2.50 ± 1.29"
    one = summarize_seeds([31.234])
    assert one.std is None and one.format(1) == "31.2 (1 seed)"


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-100, 100, allow_nan=False), min_size=2, max_size=12), st.floats(-50, 50))
def test_seed_std_matches_the_sum_of_squares_formula_and_ignores_shifts(values: list[float], shift: float) -> None:
    n, total = len(values), sum(values)
    var = max(0.0, (sum(v * v for v in values) - total * total / n) / (n - 1))
    s = summarize_seeds(values)
    assert s.mean == pytest.approx(total / n, abs=1e-9)
    assert s.std == pytest.approx(math.sqrt(var), abs=1e-5)
    shifted = summarize_seeds([v + shift for v in values])
    assert shifted.mean == pytest.approx(s.mean + shift, abs=1e-9)
    assert shifted.std == pytest.approx(s.std, abs=1e-6)


def test_bad_seed_values_are_rejected() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        summarize_seeds([])
    with pytest.raises(ValueError, match="non-finite"):
        summarize_seeds([1.0, float("nan")])


def test_volumes_are_averaged_over_seeds_before_pairing() -> None:
    kron_seeds = [{"a": 1.0, "b": 3.0, "c": 0.0}, {"a": 3.0, "b": 5.0, "c": 2.0}]  # means a 2, b 4, c 1
    dense_seeds = [{"a": 1.0, "b": 2.0, "c": 1.0}, {"a": 1.0, "b": 2.0, "c": 1.0}]
    assert average_over_seeds(kron_seeds) == {"a": 2.0, "b": 4.0, "c": 1.0}
    result = paired_comparison(kron_seeds, dense_seeds)
    assert result.n == 3  # volumes, not volumes x seeds
    assert result.mean_difference == pytest.approx((1.0 + 2.0 + 0.0) / 3)
    # a single mapping for one side is taken as already per volume
    assert paired_comparison(kron_seeds, dense_seeds[0]).mean_difference == pytest.approx(1.0)


def test_differing_volumes_are_an_error_naming_them() -> None:
    with pytest.raises(ValueError, match=r"only in kron: \['c'\].*only in dense: \['d'\]"):
        paired_comparison({"a": 1.0, "b": 2.0, "c": 3.0}, {"a": 1.0, "b": 2.0, "d": 3.0})
    with pytest.raises(ValueError, match=r"seed 1 scored other volumes.*only in seed 1: \['x'\]"):
        paired_comparison([{"a": 1.0}, {"a": 1.0, "x": 2.0}], {"a": 0.0})
    with pytest.raises(ValueError, match="'b' has a non-finite value"):
        paired_comparison({"a": 1.0, "b": float("inf")}, {"a": 1.0, "b": 2.0})
    with pytest.raises(ValueError, match="no volumes"):
        paired_comparison({}, {})
    with pytest.raises(ValueError, match="alpha"):
        paired_comparison({"a": 1.0}, {"a": 0.0}, alpha=5)


# ------------------------------------------------------------------------------------------- paired test


def test_t_interval_matches_the_textbook_table() -> None:
    kron, dense = pairs([1.0, 2.0, 3.0, 4.0, 5.0])
    result = paired_comparison(kron, dense)
    assert result.n == 5 and result.mean_difference == pytest.approx(3.0)
    half = T_TABLE_975[4] * math.sqrt(2.5) / math.sqrt(5)  # s = sqrt(2.5) by hand: 1.9632
    assert result.t_ci == pytest.approx((3.0 - half, 3.0 + half), abs=1e-3)
    ninety = paired_comparison(kron, dense, alpha=0.10)
    half90 = T_TABLE_950[4] * math.sqrt(2.5) / math.sqrt(5)
    assert ninety.t_ci == pytest.approx((3.0 - half90, 3.0 + half90), abs=1e-3)

    ten = [0.3, -0.1, 0.4, 0.2, 0.0, 0.5, 0.1, 0.3, -0.2, 0.5]  # mean 0.2, sum of squares about the mean 0.54
    result = paired_comparison(*pairs(ten))
    half = T_TABLE_975[9] * math.sqrt(0.54 / 9) / math.sqrt(10)
    assert result.mean_difference == pytest.approx(0.2)
    assert result.t_ci == pytest.approx((0.2 - half, 0.2 + half), abs=1e-3)


def test_sign_is_kronecker_minus_dense() -> None:
    kron, dense = pairs([0.5, 0.7, 0.6, 0.8, 0.9, 0.4, 0.65])
    assert paired_comparison(kron, dense).mean_difference > 0
    assert paired_comparison(dense, kron).mean_difference < 0


def test_bootstrap_percentile_interval_of_tiny_samples_by_hand() -> None:
    # two volumes: resampled means are a, (a+b)/2, b with probabilities 1/4, 1/2, 1/4 -> percentiles 2.5/97.5 = a, b
    result = paired_comparison(*pairs([0.2, 1.0]))
    assert result.bootstrap_ci == pytest.approx((0.2, 1.0))
    # [0, 0, 3]: P(mean = 3) = 1/27 > 2.5 %, P(mean = 0) = 8/27 -> the interval is exactly [0, 3]
    assert paired_comparison(*pairs([0.0, 0.0, 3.0])).bootstrap_ci == pytest.approx((0.0, 3.0), abs=1e-9)


def test_bootstrap_is_fixed_by_its_seed_and_agrees_with_the_normal_interval_for_many_volumes() -> None:
    rng = np.random.default_rng(7)
    differences = list(rng.normal(0.3, 0.5, size=200))
    kron, dense = pairs(differences)
    a, b = paired_comparison(kron, dense, seed=3), paired_comparison(kron, dense, seed=3)
    assert a.bootstrap_ci == b.bootstrap_ci
    other = paired_comparison(kron, dense, seed=4).bootstrap_ci
    assert other != a.bootstrap_ci and other == pytest.approx(a.bootstrap_ci, abs=0.02)
    se = np.std(differences, ddof=1) / math.sqrt(200)
    mean = float(np.mean(differences))
    assert a.bootstrap_ci == pytest.approx((mean - 1.96 * se, mean + 1.96 * se), abs=0.25 * se)


def test_wilcoxon_hand_examples() -> None:
    assert paired_comparison(*pairs([1.0, 2.0, 3.0, 4.0, 5.0])).wilcoxon_p == pytest.approx(2 / 32)
    assert paired_comparison(*pairs([-1.0, 2.0, 3.0, 4.0, 5.0])).wilcoxon_p == pytest.approx(4 / 32)
    assert paired_comparison(*pairs([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])).wilcoxon_p == pytest.approx(2 / 64)


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 10).flatmap(lambda n: st.tuples(st.permutations(range(1, n + 1)),
                                                      st.lists(st.booleans(), min_size=n, max_size=n))))
def test_wilcoxon_matches_exact_enumeration(case: tuple[list[int], list[bool]]) -> None:
    magnitudes, negative = case
    differences = [(-0.1 if neg else 0.1) * m for m, neg in zip(magnitudes, negative)]
    assert paired_comparison(*pairs(differences)).wilcoxon_p == pytest.approx(exact_wilcoxon_p(differences))


def test_verdicts() -> None:
    clear = paired_comparison(*pairs([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]))
    assert clear.distinguishable and clear.verdict == "distinguishable from zero at alpha 0.05"
    assert clear.format(2, "dB").startswith("+0.40 dB (95 % t-CI +0.")

    noise = paired_comparison(*pairs([-1.0, 1.0, -2.0, 2.0, 0.5, -0.4]))
    assert not noise.distinguishable and noise.verdict == "not distinguishable from zero at alpha 0.05"

    # five volumes, all better: the t-interval excludes 0 but no Wilcoxon p can be below 2/32 = 0.0625
    five = paired_comparison(*pairs([1.0, 2.0, 3.0, 4.0, 5.0]))
    assert not five.distinguishable
    assert five.verdict.startswith("not clearly distinguishable") and "t-interval excludes 0" in five.verdict
    assert any("cannot reach p < 0.05" in note and "0.0625" in note for note in five.notes)


def test_all_zero_differences_and_a_single_volume() -> None:
    same = paired_comparison({"a": 30.0, "b": 31.0, "c": 29.0}, {"a": 30.0, "b": 31.0, "c": 29.0})
    assert same.mean_difference == 0 and same.wilcoxon_p == 1.0 and same.t_ci == (0.0, 0.0)
    assert same.bootstrap_ci == (0.0, 0.0) and not same.distinguishable
    assert "every difference is exactly zero" in same.notes

    one = paired_comparison({"a": 31.0}, {"a": 30.0})
    assert one.n == 1 and one.t_ci is None and one.bootstrap_ci is None and not one.distinguishable
    assert "one volume: no confidence interval" in one.notes

    with_zero = paired_comparison(*pairs([0.0, 0.1, 0.2, 0.3]))
    assert any("drops the 1 zero" in note for note in with_zero.notes)
    assert with_zero.wilcoxon_p == pytest.approx(exact_wilcoxon_p([0.1, 0.2, 0.3]))


def test_as_dict_is_json_numbers() -> None:
    out = paired_comparison(*pairs([0.1, 0.3, 0.2])).as_dict()
    again = json.loads(json.dumps(out))
    assert again["n"] == 3 and isinstance(again["mean_difference"], float) and len(again["t_ci"]) == 2
