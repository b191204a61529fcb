"""Bootstrap intervals over queries (cbir_cli.evaluate.intervals) and the per-query
metric values they resample (cbir_cli.evaluate.metrics.per_query_metrics)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from cbir_cli.evaluate.intervals import Bootstrap, bootstrap_intervals, percentile_interval, resampled_means
from cbir_cli.evaluate.metrics import (
    average_precision,
    map_at_r,
    per_query_metrics,
    precision_at_k,
    recall_at_k,
    retrieval_metrics,
)


def enumerated_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float]:
    """The exact bootstrap interval: every one of the n**n equally likely resamples."""
    v = np.asarray(values, dtype=np.float64)
    means = [v[list(draw)].mean() for draw in itertools.product(range(v.size), repeat=v.size)]
    low, high = np.quantile(means, [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(low), float(high)


def test_interval_matches_the_enumerated_bootstrap_distribution() -> None:
    # [0, 0, 0, 1]: the resampled mean is k/4 with k ~ Binomial(4, 1/4), whose CDF is
    # 0.316, 0.738, 0.949, 0.996, 1: the 2.5 % point is 0 and the 97.5 % point 3/4.
    values = [0.0, 0.0, 0.0, 1.0]
    assert enumerated_interval(values) == (0.0, 0.75)
    assert bootstrap_intervals({"m": values}, Bootstrap(resamples=10_000, seed=0))["m"] == (0.0, 0.75)
    # [1, 0, 1, 1, 0] (R@1 of test_evaluate's hand-ranked case): k/5, k ~ Binomial(5, 3/5),
    # CDF 0.010, 0.087, ..., 0.922, 1 -> from 1/5 to 1.
    hits = [1.0, 0.0, 1.0, 1.0, 0.0]
    assert enumerated_interval(hits) == (pytest.approx(0.2), 1.0)
    assert bootstrap_intervals({"m": hits}, Bootstrap(resamples=10_000, seed=3))["m"] == (pytest.approx(0.2), 1.0)


def test_resampled_means_by_hand_with_a_fixed_seed() -> None:
    values = np.array([0.0, 1.0, 2.0, 3.0, 4.0])
    means = resampled_means({"m": values, "twice": 2 * values}, resamples=7, seed=11)["m"]
    draws = np.random.default_rng(11).integers(0, 5, size=(7, 5))  # the draws the function makes
    np.testing.assert_allclose(means, values[draws].mean(axis=1))
    # Paired: every metric sees the same resamples.
    np.testing.assert_allclose(resampled_means({"m": values, "twice": 2 * values}, 7, 11)["twice"], 2 * means)
    low, high = percentile_interval(means, 0.5)
    assert (low, high) == tuple(np.quantile(means, [0.25, 0.75]))


def test_interval_contains_the_estimate_and_shrinks_with_more_queries() -> None:
    rng = np.random.default_rng(5)
    widths = []
    for n in (50, 500, 5000):
        hits = (rng.random(n) < 0.8).astype(np.float64)
        ap = rng.beta(5, 2, size=n)
        intervals = bootstrap_intervals({"r@1": hits, "ap": ap})
        for name, values in (("r@1", hits), ("ap", ap)):
            low, high = intervals[name]
            assert low <= values.mean() <= high
        widths.append(intervals["ap"][1] - intervals["ap"][0])
    assert widths[0] > widths[1] > widths[2] > 0
    # ~ 1/sqrt(n): 100 x the queries, about a tenth of the width.
    assert 0.05 < widths[2] / widths[0] < 0.2


def test_intervals_are_reproducible_and_can_be_turned_off() -> None:
    values = {"m": np.random.default_rng(1).random(300)}
    assert bootstrap_intervals(values, Bootstrap(seed=4)) == bootstrap_intervals(values, Bootstrap(seed=4))
    assert bootstrap_intervals(values, Bootstrap(seed=4)) != bootstrap_intervals(values, Bootstrap(seed=5))
    assert bootstrap_intervals(values, Bootstrap(resamples=0)) == {"m": None}
    assert bootstrap_intervals({"m": np.zeros(0)}) == {"m": None}
    assert bootstrap_intervals({"m": np.full(10, 0.5)})["m"] == (0.5, 0.5)
    with pytest.raises(ValueError, match="same length"):
        resampled_means({"a": np.zeros(3), "b": np.zeros(4)}, 10)
    assert "1000 resamples, seed 0" in Bootstrap().describe(1360) and "1360 queries" in Bootstrap().describe(1360)


def test_per_query_metrics_average_to_the_metrics() -> None:
    rel = np.array([[1, 0, 1, 0], [0, 1, 1, 0], [0, 0, 0, 1], [1, 1, 0, 0]], dtype=bool)
    nr = np.array([2, 2, 3, 2])
    rows = per_query_metrics(rel, nr, ks=(1, 2), p_ks=(2,), metrics=("recall", "precision", "ir_recall", "map",
                                                                     "map_at_r", "ns"))
    np.testing.assert_array_equal(rows["recall@1"], [1, 0, 0, 1])
    np.testing.assert_array_equal(rows["recall@2"], [1, 1, 0, 1])
    np.testing.assert_allclose(rows["precision@2"], [0.5, 0.5, 0, 1])
    np.testing.assert_allclose(rows["ir_recall@2"], [0.5, 0.5, 0, 1])
    np.testing.assert_allclose(rows["map"], average_precision(rel, nr))
    np.testing.assert_allclose(rows["ns_score"], [3, 3, 1, 3])  # 1 + relevant among the first 3
    assert rows["map@r"].mean() == pytest.approx(map_at_r(rel, nr))
    assert rows["precision@2"].mean() == pytest.approx(precision_at_k(rel, 2))
    assert rows["recall@2"].mean() == recall_at_k(rel, 2)[2]
    # retrieval_metrics hands the same arrays back for the queries it keeps.
    labels = np.array([0, 1, 2])
    retrieved = np.array([[0, 1], [0, 1], [0, 1]])
    out = retrieval_metrics(labels, retrieved, np.array([1, 1, 0]), ks=(1,), p_ks=(1,), per_query=True)
    assert out["queries"] == 2
    np.testing.assert_array_equal(out["per_query"]["recall@1"], [1, 0])
    assert out["recall@1"] == 0.5
