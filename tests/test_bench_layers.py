"""The layer benchmark's combination over processes (benchmarks/layers.py): geometric means with intervals over
processes, and whether the worst-shape target is shown met, shown missed or undecided."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks._common import replicate_ci
from benchmarks.layers import TARGETS, combine, summarize

LIMIT = TARGETS["max_train_ratio"]


def process_row(train: float, merged: float = 1.0, kind: str = "linear", channels: int = 512) -> dict:
    """One process's row of one shape, as bench_shape returns it (only what combine and summarize read)."""
    return {"kind": kind, "channels": channels, "batch": 1, "train_ratio": train, "train_ratio_ci95": (0.5, 2.0),
            "train_ratio_torch_ops": 1.2 * train,
            "merged_inference_ratio": merged, "merged_inference_ratio_ci95": (0.9, 1.1), "kron_eval_ratio": 1.0,
            "naive_over_kron_weight": 3.0, "weight_build_share_of_train": 0.1,
            "train_min_ms": {"dense": 2.0, "kron": 2.0 * train}, "train_ms": {"dense": 3.0, "kron": 3.0 * train},
            "infer_ms": {"dense": 1.0, "merged": 1.0, "kron_eval": 1.0}, "weight_build_ms": {"kron_weight": 0.5}}


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(0.7, 1.5), min_size=2, max_size=8))
def test_a_shape_is_the_geometric_mean_over_processes_with_their_t_interval(values):
    row = combine([process_row(v) for v in values])
    mean, lo, hi = replicate_ci(values)
    assert row["train_ratio"] == pytest.approx(math.exp(sum(map(math.log, values)) / len(values)))
    assert row["train_ratio"] == pytest.approx(mean)
    assert row["train_ratio_ci95"] == (lo, hi)
    assert row["train_ratio_per_process"] == values and row["processes"] == len(values)
    assert row["train_ratio_of_minima"] == pytest.approx(min(values))  # fastest kron 2·min(values), dense 2


def test_one_process_keeps_its_own_order_statistic_interval():
    row = combine([process_row(1.1)])
    assert row["train_ratio"] == pytest.approx(1.1)
    assert row["train_ratio_ci95"] == (0.5, 2.0)


def test_fastest_runs_come_from_any_process():
    rows = [process_row(1.2), process_row(1.1)]
    rows[0]["train_min_ms"] = {"dense": 1.8, "kron": 2.5}
    rows[1]["train_min_ms"] = {"dense": 2.0, "kron": 2.1}
    assert combine(rows)["train_ratio_of_minima"] == pytest.approx(2.1 / 1.8)


def test_times_are_the_median_over_processes():
    row = combine([process_row(v) for v in (1.1, 1.3, 1.2)])
    assert row["train_ms"] == {"dense": 3.0, "kron": pytest.approx(3.6)}  # 3·1.2, the middle process


def shape(values: list[float], channels: int) -> dict:
    return combine([process_row(v, channels=channels) for v in values])


@pytest.mark.parametrize(
    ("worst", "shown"),
    [([1.10, 1.11, 1.09, 1.10], True),  # every interval at or below the target
     ([1.30, 1.31, 1.29, 1.30], False),  # the worst shape's interval wholly above it
     ([1.10, 1.20, 1.15, 1.16], None)],  # straddles it
)
def test_the_worst_shape_target_is_shown_met_missed_or_undecided(worst, shown):
    rows = [shape([1.00, 1.01, 0.99, 1.00], 32), shape(worst, 512)]
    s = summarize(rows)
    assert s["max_train_ratio_shown"] is shown
    assert s["max_train_ratio_shape"] == "linear C=512 B=1"
    assert s["max_train_ratio"] == pytest.approx(rows[1]["train_ratio"])
    assert s["targets"]["max_train_ratio"]["met"] == (rows[1]["train_ratio"] <= LIMIT)
