"""Tests for cbir_cli.evaluate.metrics: hand-computed toys, edge cases, and a reference AP."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cbir_cli.evaluate import metrics as M
from cbir_cli.evaluate.metrics import (
    PAD_LABEL,
    average_precision,
    ir_recall_at_k,
    map_at_r,
    mean_average_precision,
    ns_score,
    num_relevant_from_labels,
    precision_at_k,
    recall_at_k,
    relevance_matrix,
    retrieval_metrics,
    top_k_accuracy,
)

# --------------------------------------------------------------------------- a toy
# Three queries, K = 5 ranked results each (query itself already excluded).
#   q0 label 0: [0, 1, 0, 2, 0]  -> rel [1,0,1,0,1], 4 relevant in the gallery (1 never retrieved)
#   q1 label 1: [2, 2, 1, 0, -1] -> rel [0,0,1,0,0], 1 relevant; last slot is padding
#   q2 label 2: [0, 1, 0, 1, 0]  -> rel [0,0,0,0,0], 2 relevant, none retrieved
QL = np.array([0, 1, 2])
RL = np.array(
    [
        [0, 1, 0, 2, 0],
        [2, 2, 1, 0, PAD_LABEL],
        [0, 1, 0, 1, 0],
    ]
)
NR = np.array([4, 1, 2])


@pytest.fixture
def rel() -> np.ndarray:
    return relevance_matrix(QL, RL)


def test_relevance_matrix(rel):
    expected = np.array(
        [
            [1, 0, 1, 0, 1],
            [0, 0, 1, 0, 0],
            [0, 0, 0, 0, 0],
        ],
        dtype=bool,
    )
    assert rel.dtype == np.bool_
    np.testing.assert_array_equal(rel, expected)


def test_recall_at_k(rel):
    # first hit (1-based rank): q0 -> 1, q1 -> 3, q2 -> never
    # R@1 = 1/3 (q0);  R@2 = 1/3;  R@3 = 2/3 (q0, q1);  R@5 = 2/3
    # R@10 > K = 5: all 5 columns are used -> 2/3
    got = recall_at_k(rel, [1, 2, 3, 5, 10])
    assert list(got) == [1, 2, 3, 5, 10]
    assert got[1] == pytest.approx(1 / 3)
    assert got[2] == pytest.approx(1 / 3)
    assert got[3] == pytest.approx(2 / 3)
    assert got[5] == pytest.approx(2 / 3)
    assert got[10] == pytest.approx(2 / 3)
    assert recall_at_k(rel, 3) == {3: pytest.approx(2 / 3)}


def test_top_k_accuracy_is_recall_at_k(rel):
    assert top_k_accuracy(rel, 1) == pytest.approx(1 / 3)
    assert top_k_accuracy(rel, 5) == pytest.approx(2 / 3)


def test_precision_at_k(rel):
    # P@1 = (1 + 0 + 0) / 3 = 1/3
    # P@3 = (2/3 + 1/3 + 0) / 3 = 1/3
    # P@5 = (3/5 + 1/5 + 0) / 3 = 4/15
    # P@10 (k > K, the denominator stays 10) = (3/10 + 1/10 + 0) / 3 = 2/15
    assert precision_at_k(rel, 1) == pytest.approx(1 / 3)
    assert precision_at_k(rel, 3) == pytest.approx(1 / 3)
    assert precision_at_k(rel, 5) == pytest.approx(4 / 15)
    assert precision_at_k(rel, 10) == pytest.approx(2 / 15)


def test_ir_recall_at_k(rel):
    # @3: q0 2/4, q1 1/1, q2 0/2 -> (0.5 + 1 + 0) / 3 = 0.5
    # @5: q0 3/4, q1 1/1, q2 0/2 -> (0.75 + 1 + 0) / 3 = 7/12
    assert ir_recall_at_k(rel, NR, 3) == pytest.approx(0.5)
    assert ir_recall_at_k(rel, NR, 5) == pytest.approx(7 / 12)


def test_average_precision(rel):
    # q0: hits at ranks 1, 3, 5 -> precisions 1/1, 2/3, 3/5; sum = 34/15; / R=4 -> 17/30
    # q1: hit at rank 3 -> precision 1/3; / R=1 -> 1/3
    # q2: no hit -> 0
    ap = average_precision(rel, NR)
    np.testing.assert_allclose(ap, [17 / 30, 1 / 3, 0.0])
    # mAP = (17/30 + 10/30 + 0) / 3 = 27/90 = 0.3
    assert mean_average_precision(rel, NR) == pytest.approx(0.3)


def test_map_at_r(rel):
    # q0: R = 4, ranks 1..4 = [1,0,1,0] -> (1/1 + 2/3) / 4 = 5/12
    # q1: R = 1, rank 1 = [0] -> 0
    # q2: R = 2, ranks 1..2 = [0,0] -> 0
    # MAP@R = (5/12 + 0 + 0) / 3 = 5/36
    assert map_at_r(rel, NR) == pytest.approx(5 / 36)


def test_map_at_r_needs_k_at_least_r(rel):
    with pytest.raises(ValueError, match=r"largest R is 4 but only K = 3"):
        map_at_r(rel[:, :3], NR)


def test_ns_score_toy(rel):
    # include_self=False: relevant in the first 4 -> q0 2, q1 1, q2 0 -> mean 1.0
    # include_self=True: 1 + relevant in the first 3 -> q0 3, q1 2, q2 1 -> mean 2.0
    assert ns_score(rel) == pytest.approx(1.0)
    assert ns_score(rel, include_self=True) == pytest.approx(2.0)


# --------------------------------------------------------------------------- UKBench-like


def test_ns_score_groups_of_four():
    # 8 images, two groups of 4: labels 0 0 0 0 1 1 1 1. Every query has 3 others.
    labels = np.repeat([0, 1], 4)
    nr = num_relevant_from_labels(labels, labels, query_in_gallery=True)
    np.testing.assert_array_equal(nr, [3] * 8)
    # Perfect ranking (query excluded): 3 same-group images, then the 4 others.
    perfect = np.array([[lab] * 3 + [1 - lab] * 4 for lab in labels])
    rel = relevance_matrix(labels, perfect)
    assert ns_score(rel) == pytest.approx(3.0)  # max with the query excluded
    assert ns_score(rel, include_self=True) == pytest.approx(4.0)  # conventional max
    # Mixed: queries of group 0 get [other, same, same, other, same, ...] -> top3 has 2,
    # top4 has 2; queries of group 1 get [other x4, same x3] -> 0.
    mixed = np.array(
        [[1 - lab, lab, lab, 1 - lab, lab, 1 - lab, 1 - lab] if lab == 0 else [0, 0, 0, 0, 1, 1, 1] for lab in labels]
    )
    rel = relevance_matrix(labels, mixed)
    # include_self=False: (4 * 2 + 4 * 0) / 8 = 1.0;  True: (4 * 3 + 4 * 1) / 8 = 2.0
    assert ns_score(rel) == pytest.approx(1.0)
    assert ns_score(rel, include_self=True) == pytest.approx(2.0)


def test_ns_include_self_matches_conventional_score():
    # Conventional UKBench: the query is in the database and ranked first; score = number
    # of same-group images among the top 4 of that list.
    rng = np.random.default_rng(3)
    labels = np.repeat(np.arange(10), 4)
    retrieved = np.stack([rng.permutation(np.delete(labels, i)) for i in range(labels.size)])
    with_self = np.concatenate([labels[:, None], retrieved], axis=1)
    conventional = (with_self[:, :4] == labels[:, None]).sum(axis=1).mean()
    rel = relevance_matrix(labels, retrieved)
    assert ns_score(rel, include_self=True) == pytest.approx(conventional)


# --------------------------------------------------------------------------- edge cases


def test_perfect_ranking_gives_one_everywhere():
    # 3 classes x 4 images, leave-one-out over the whole gallery (K = 11).
    labels = np.repeat([0, 1, 2], 4)
    nr = num_relevant_from_labels(labels, labels, query_in_gallery=True)
    retrieved = []
    for i, lab in enumerate(labels):
        others = np.delete(labels, i)
        retrieved.append(np.concatenate([others[others == lab], others[others != lab]]))
    retrieved = np.array(retrieved)
    out = retrieval_metrics(
        labels, retrieved, nr, ks=(1, 2, 3), p_ks=(1, 3), metrics=M.METRIC_NAMES, ns_include_self=False
    )
    for key in ("recall@1", "recall@2", "recall@3", "precision@1", "precision@3", "ir_recall@3", "map", "map@r"):
        assert out[key] == pytest.approx(1.0), key
    assert out["ir_recall@1"] == pytest.approx(1 / 3)  # only 1 of 3 relevant fits in top 1
    assert out["ns_score"] == pytest.approx(3.0)


def test_reversed_ranking():
    # query label 0; gallery (query excluded) = 2 relevant, 3 not, ranked worst first:
    # [1, 1, 1, 0, 0] -> rel [0,0,0,1,1]
    rel = relevance_matrix([0], [[1, 1, 1, 0, 0]])
    nr = [2]
    # R@1 = R@3 = 0, R@4 = 1
    assert recall_at_k(rel, [1, 3, 4]) == {1: 0.0, 3: 0.0, 4: 1.0}
    # AP = (1/4 + 2/5) / 2 = 0.325
    assert mean_average_precision(rel, nr) == pytest.approx(0.325)
    # MAP@R, R = 2: ranks 1..2 have no hit -> 0
    assert map_at_r(rel, nr) == 0.0
    # P@5 = 2/5
    assert precision_at_k(rel, 5) == pytest.approx(0.4)


def test_k_larger_than_gallery_padding():
    # Gallery of 4 (query excluded: 3 results), K = 6 with 3 PAD slots.
    # query label 5; results [5, 7, 5, PAD, PAD, PAD]; R = 2
    ql = [5]
    rl = [[5, 7, 5, PAD_LABEL, PAD_LABEL, PAD_LABEL]]
    rel = relevance_matrix(ql, rl)
    np.testing.assert_array_equal(rel, [[1, 0, 1, 0, 0, 0]])
    # AP = (1/1 + 2/3) / 2 = 5/6 -- exact, the whole gallery was ranked
    assert mean_average_precision(rel, [2]) == pytest.approx(5 / 6)
    # P@6 = 2/6 (padding counts as a miss)
    assert precision_at_k(rel, 6) == pytest.approx(1 / 3)
    out = retrieval_metrics(ql, rl, [2], ks=(1, 10), p_ks=(5,))
    assert out["k"] == 6
    assert out["recall@10"] == 1.0  # k > K: uses the 6 columns
    assert out["precision@5"] == pytest.approx(2 / 5)
    assert out["map@r"] == pytest.approx(1 / 2)  # R = 2: (1/1) / 2
    assert any("exceed" in n for n in out["notes"])


def test_padding_never_matches_and_pad_query_label_rejected():
    rel = relevance_matrix([0, 3], [[PAD_LABEL, 0], [PAD_LABEL, PAD_LABEL]])
    np.testing.assert_array_equal(rel, [[0, 1], [0, 0]])
    with pytest.raises(ValueError, match="query_labels must be >= 0"):
        relevance_matrix([PAD_LABEL], [[PAD_LABEL]])
    with pytest.raises(ValueError, match="PAD_LABEL"):
        relevance_matrix([0], [[-2]])


def test_query_without_positive_is_excluded_and_counted():
    # q0 label 0 has 1 positive retrieved first; q1 label 9 has no positive at all.
    ql = [0, 9]
    rl = [[0, 1, 2], [0, 1, 2]]
    nr = [1, 0]
    out = retrieval_metrics(ql, rl, nr, ks=(1,), p_ks=(1,))
    assert out["queries"] == 1
    assert out["queries_without_positive"] == 1
    # Only q0 counts: everything is perfect.
    assert out["recall@1"] == 1.0
    assert out["precision@1"] == 1.0
    assert out["map"] == 1.0
    assert out["map@r"] == 1.0


def test_all_queries_without_positive_gives_nan_not_warning():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = retrieval_metrics([1, 2], [[0], [0]], [0, 0], ks=(1,), p_ks=(1,), metrics=M.METRIC_NAMES)
    assert out["queries"] == 0 and out["queries_without_positive"] == 2
    for key in ("recall@1", "precision@1", "ir_recall@1", "map", "map@r", "ns_score"):
        assert math.isnan(out[key]), key


def test_strict_functions_reject_queries_without_positive(rel):
    with pytest.raises(ValueError, match="num_relevant < 1"):
        average_precision(rel, [4, 1, 0])


def test_num_relevant_inconsistent_with_results_is_rejected():
    # 2 relevant retrieved but num_relevant says 1: the query was probably not excluded.
    rel = relevance_matrix([0], [[0, 0, 1]])
    with pytest.raises(ValueError, match="num_relevant"):
        average_precision(rel, [1])


def test_map_at_r_in_retrieval_metrics_default_vs_explicit():
    ql, rl, nr = [0], [[0, 1]], [3]  # R = 3 > K = 2
    out = retrieval_metrics(ql, rl, nr, ks=(1,), p_ks=(1,))
    assert out["map@r"] is None
    assert any("map@r skipped" in n for n in out["notes"])
    with pytest.raises(ValueError, match="MAP@R needs"):
        retrieval_metrics(ql, rl, nr, ks=(1,), p_ks=(1,), metrics=["map_at_r"])


def test_retrieval_metrics_keys_and_toy_values():
    out = retrieval_metrics(QL, RL, NR, ks=(1, 3), p_ks=(5,), metrics=M.METRIC_NAMES, ns_include_self=True)
    assert out["queries"] == 3 and out["queries_without_positive"] == 0 and out["k"] == 5
    assert out["recall@1"] == pytest.approx(1 / 3)
    assert out["recall@3"] == pytest.approx(2 / 3)
    assert out["precision@5"] == pytest.approx(4 / 15)
    assert out["ir_recall@3"] == pytest.approx(0.5)
    assert out["map"] == pytest.approx(0.3)
    assert out["map@r"] == pytest.approx(5 / 36)
    assert out["ns_score"] == pytest.approx(2.0)
    default = retrieval_metrics(QL, RL, NR, ks=(1,), p_ks=(1,))
    assert set(default) == {"queries", "queries_without_positive", "k", "notes", "recall@1", "precision@1", "map",
                            "map@r"}


@pytest.mark.parametrize(
    "args",
    [
        ([0, 1], [[0, 1]], [1, 1]),  # 2 query labels, 1 row
        ([0], [0, 1], [1]),  # retrieved not 2-D
        ([0], [[0, 1]], [1, 1]),  # num_relevant length
        ([[0]], [[0, 1]], [1]),  # query labels not 1-D
        ([0.5], [[0, 1]], [1]),  # float labels
    ],
)
def test_shape_and_type_validation(args):
    with pytest.raises(ValueError):
        retrieval_metrics(*args, ks=(1,), p_ks=(1,))


def test_unknown_metric_lists_valid_choices():
    with pytest.raises(ValueError) as exc:
        retrieval_metrics(QL, RL, NR, metrics=["recall", "ndcg"])
    msg = str(exc.value)
    assert "'ndcg'" in msg
    for name in M.METRIC_NAMES:
        assert name in msg


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_bad_k(rel, bad):
    with pytest.raises(ValueError):
        recall_at_k(rel, [bad])


def test_num_relevant_from_labels():
    gallery = np.array([3, 1, 3, 3, 7])
    # separate query set: counts of label in the gallery
    np.testing.assert_array_equal(num_relevant_from_labels(gallery, [3, 7, 2], query_in_gallery=False), [3, 1, 0])
    # leave-one-out: minus the query itself
    np.testing.assert_array_equal(
        num_relevant_from_labels(gallery, gallery, query_in_gallery=True), [2, 0, 2, 2, 0]
    )
    with pytest.raises(ValueError, match="not in the gallery"):
        num_relevant_from_labels(gallery, [2], query_in_gallery=True)
    np.testing.assert_array_equal(num_relevant_from_labels([], [1], query_in_gallery=False), [0])


# --------------------------------------------------------------------------- reference AP


def _reference_ap(rel_row: list[bool], n_relevant: int) -> float:
    hits, total = 0, 0.0
    for i, r in enumerate(rel_row, start=1):
        if r:
            hits += 1
            total += hits / i
    return total / n_relevant


def _reference_map_at_r(rel_row: list[bool], n_relevant: int) -> float:
    return _reference_ap(rel_row[:n_relevant], n_relevant)


@pytest.mark.parametrize("block_elements", [1 << 22, 37])  # 37: forces many small row blocks
def test_average_precision_matches_reference(monkeypatch, block_elements):
    monkeypatch.setattr(M, "_BLOCK_ELEMENTS", block_elements)
    rng = np.random.default_rng(1234)
    n_gallery, n_classes, q, K = 300, 12, 80, 60
    gallery = rng.integers(0, n_classes, n_gallery)
    queries = rng.integers(0, n_classes, q)
    nr = num_relevant_from_labels(gallery, queries, query_in_gallery=False)
    retrieved = np.stack([gallery[rng.permutation(n_gallery)[:K]] for _ in range(q)])
    rel = relevance_matrix(queries, retrieved)
    keep = nr > 0
    ap = average_precision(rel[keep], nr[keep])
    expected = [_reference_ap(list(r), int(n)) for r, n in zip(rel[keep], nr[keep])]
    np.testing.assert_allclose(ap, expected, rtol=1e-12)
    # Full gallery ranking -> AP agrees with the reference on the complete list too.
    full = np.stack([gallery[rng.permutation(n_gallery)] for _ in range(q)])
    rel_full = relevance_matrix(queries, full)[keep]
    expected_full = [_reference_ap(list(r), int(n)) for r, n in zip(rel_full, nr[keep])]
    np.testing.assert_allclose(average_precision(rel_full, nr[keep]), expected_full, rtol=1e-12)
    # MAP@R on the full ranking vs reference
    expected_mapr = np.mean([_reference_map_at_r(list(r), int(n)) for r, n in zip(rel_full, nr[keep])])
    assert map_at_r(rel_full, nr[keep]) == pytest.approx(expected_mapr, rel=1e-12)


def test_large_input_is_fast():
    # q = 60_000, K = 100 -- vectorised, runs in well under a second or two.
    import time

    rng = np.random.default_rng(0)
    q, K = 60_000, 100
    ql = rng.integers(0, 1000, q)
    rl = rng.integers(0, 1000, (q, K))
    rel = relevance_matrix(ql, rl)
    nr = np.maximum(rel.sum(axis=1), 1) + 5
    t = time.perf_counter()
    out = retrieval_metrics(ql, rl, nr, ks=(1, 10, 100), p_ks=(5,), metrics=M.METRIC_NAMES)
    assert time.perf_counter() - t < 10
    assert out["queries"] == q
