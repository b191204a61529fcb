"""Range search (the seam method ``cbir dedup`` links pairs with): Faiss's flat index
is exact, the k-NN-with-threshold approach on HNSW and IVF-PQ is checked against
the exact oracle (the numpy fake), including groups larger than its first k."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
from conftest import store_of_vectors

from cbir_cli.search.faiss_backend import FaissBackend
from cbir_cli.search.range import knn_range_search, pack_ranges
from cbir_cli.store.feature_store import FeatureStore
from tests.fakes import FakeBackend

THRESHOLD = 0.9


def planted_store(tmp_path: Path, n: int = 1500, dim: int = 32, seed: int = 4) -> tuple[FeatureStore, np.ndarray]:
    """``n`` unit vectors near a shared subspace with planted near-copies: pairs,
    triples and one group of 40 (more than the k-NN approach's first k)."""
    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((6, dim)).astype(np.float32)
    x = rng.standard_normal((n, 6)).astype(np.float32) @ basis + 3.0 * rng.standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    groups = [list(range(i, i + 2)) for i in range(0, 200, 2)] + [list(range(i, i + 3)) for i in range(200, 290, 3)]
    groups.append(list(range(300, 340)))
    for group in groups:
        for member in group[1:]:
            x[member] = x[group[0]] + 0.04 * rng.standard_normal(dim).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return store_of_vectors(tmp_path / "store", x), x


def pairs(result: tuple[np.ndarray, np.ndarray, np.ndarray], query_ids: np.ndarray) -> dict[tuple[int, int], float]:
    lims, scores, ids = result
    out = {}
    for q, (a, b) in enumerate(itertools.pairwise(lims)):
        for score, i in zip(scores[a:b], ids[a:b]):
            out[int(query_ids[q]), int(i)] = float(score)
    return out


@pytest.mark.parametrize("index_type", ["flat", "hnsw", "ivfpq"])
def test_range_search_agrees_with_the_exact_oracle(tmp_path, index_type):
    store, x = planted_store(tmp_path)
    backend, oracle = FaissBackend(), FakeBackend()
    backend.build(store, index_type, persist=False)
    oracle.build(store, "flat")
    assert backend.index_type.startswith(index_type)
    ids = oracle.ids
    found = backend.range_search(x, THRESHOLD)
    truth = pairs(oracle.range_search(x, THRESHOLD), ids)
    got = pairs(found, ids)
    # The planted groups are what passes the threshold: 100 pairs, 30 triples, one
    # group of 40 (ordered pairs, self included).
    assert len(truth) == len(x) + 100 * 2 + 30 * 6 + 40 * 39
    # Every answer is a true one with its exact score...
    assert set(got) <= set(truth)
    np.testing.assert_allclose([got[p] for p in got], [truth[p] for p in got], atol=1e-5)
    # ...and the exact index finds all of them, an approximate one nearly all.
    recall = len(got) / len(truth)
    assert recall == 1.0 if index_type == "flat" else recall >= 0.99, recall
    # The group of 40 is complete even through a k-NN search that starts at k=16.
    big = {(a, b) for a in ids[300:340] for b in ids[300:340]}
    assert len(big & set(got)) >= 0.99 * len(big)
    # Packed layout: sorted best first within each query.
    lims, scores, _ = found
    assert all(np.all(np.diff(scores[a:b]) <= 0) for a, b in itertools.pairwise(lims))


def test_knn_range_search_deepens_only_where_the_list_goes_on():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 8)).astype(np.float32)
    x[:50] = x[0] + 0.01 * rng.standard_normal((50, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    oracle = FakeBackend()
    oracle.add(np.arange(300), x)
    depths: list[tuple[int, int]] = []

    def search(queries, k):
        depths.append((len(queries), k))
        return oracle.search(queries, k)

    got = knn_range_search(search, x[[0, 100]], 0.95, total=300, first_k=4)
    truth = oracle.range_search(x[[0, 100]], 0.95)
    np.testing.assert_array_equal(got[0], truth[0])  # the same number of results per query
    np.testing.assert_allclose(got[1], truth[1], atol=1e-6)
    assert set(got[2][:50]) == set(truth[2][:50]) == set(range(50))
    # Query 0 (50 near-copies) went 4 -> 16 -> 64; query 100 (alone) stopped at 4.
    assert depths == [(2, 4), (1, 16), (1, 64)]


def test_pack_ranges_handles_empty_queries():
    lims, scores, ids = pack_ranges([(np.zeros(0), np.zeros(0)), (np.array([0.5, 0.9]), np.array([3, 7]))])
    assert lims.tolist() == [0, 0, 2] and scores.tolist() == pytest.approx([0.9, 0.5]) and ids.tolist() == [7, 3]
