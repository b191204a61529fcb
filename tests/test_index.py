"""Search indexes against exact flat search as the oracle (seeded synthetic data)."""

from __future__ import annotations

import numpy as np
import pytest

from cbir_cli.errors import CbirError
from cbir_cli.pipeline.sync import index_folder
from cbir_cli.search.exact import exact_search, rerank
from cbir_cli.search.faiss_backend import (
    AUTO_FLAT_MAX,
    IVFPQ_MIN_VECTORS,
    build_index,
    build_store_index,
    factory_string,
    load_index,
    needs_rerank,
    read_index_meta,
    resolve_index_type,
    search_index,
)
from cbir_cli.store.feature_store import FeatureStore
from cbir_cli.store.vectors import ShardVectors

K = 10


def structured_vectors(n: int, dim: int, seed: int) -> np.ndarray:
    """Unit vectors near a random 8-d subspace, so nearest neighbours are meaningful."""
    rng = np.random.default_rng(seed)
    basis = np.random.default_rng(7).standard_normal((8, dim)).astype(np.float32)
    x = rng.standard_normal((n, 8)).astype(np.float32) @ basis + 0.3 * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return sum(len(set(f[f >= 0]) & set(t[t >= 0])) for f, t in zip(found, truth)) / truth.size


@pytest.fixture(scope="module")
def gallery() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = structured_vectors(3000, 64, seed=1)
    queries = structured_vectors(60, 64, seed=2)
    _, truth = exact_search(x, queries, K)
    return x, queries, truth


def test_flat_index_is_exact(gallery):
    x, queries, truth = gallery
    D, I = search_index(build_index(x, "flat"), queries, K)
    np.testing.assert_array_equal(I, truth)
    np.testing.assert_allclose(D[:, 0], np.einsum("qd,qd->q", queries, x[I[:, 0]]), rtol=1e-5)


def test_hnsw_recall_against_exact(gallery):
    x, queries, truth = gallery
    _, I = search_index(build_index(x, "hnsw"), queries, K)
    assert recall(I, truth) >= 0.9


def test_ivfpq_reranked_recall_and_exact_scores(gallery):
    x, queries, truth = gallery
    index = build_index(x, "ivfpq")
    assert needs_rerank(index) and "IVF" in factory_string("ivfpq", len(x), 64)
    _, plain = search_index(index, queries, K)
    D, I = search_index(index, queries, K, exact_vectors=x)
    assert recall(I, truth) >= 0.95
    assert recall(I, truth) > recall(plain, truth)  # the re-ranking is what buys the recall
    # Re-ranked scores are the exact inner products, sorted.
    np.testing.assert_allclose(D, np.einsum("qd,qkd->qk", queries, x[I]), rtol=1e-5, atol=1e-6)
    assert np.all(np.diff(D, axis=1) <= 1e-6)


@pytest.mark.parametrize("index_type", ["flat", "hnsw", "ivfpq"])
def test_k_larger_than_collection_pads_with_minus_one(index_type):
    x = structured_vectors(5, 32, seed=3)
    index = build_index(x, index_type)
    D, I = search_index(index, x[:2], 8, exact_vectors=x if needs_rerank(index) else None)
    assert I.shape == (2, 8) and D.shape == (2, 8)
    assert np.all(I[:, 5:] == -1) and sorted(I[0, :5]) == [0, 1, 2, 3, 4]
    assert I[0, 0] == 0 and D[0, 0] == pytest.approx(1.0, abs=1e-5)


def test_rerank_pads_when_shortlists_are_short():
    x = structured_vectors(20, 16, seed=4)
    candidates = np.array([[3, 7, -1, -1], [-1, -1, -1, -1]])
    D, I = rerank(x[:2], candidates, x, k=3)
    assert set(I[0, :2]) == {3, 7} and I[0, 2] == -1 and np.all(I[1] == -1)
    assert np.isneginf(D[0, 2]) and np.all(np.isneginf(D[1]))


@pytest.mark.parametrize("index_type", ["flat", "hnsw", "ivfpq", "auto"])
def test_empty_index_returns_only_padding(index_type):
    index = build_index(np.zeros((0, 16), dtype=np.float32), index_type)
    D, I = search_index(index, np.ones((3, 16), dtype=np.float32), 4)
    assert index.ntotal == 0 and np.all(I == -1) and np.all(np.isneginf(D))


def test_index_type_choice_by_size():
    assert resolve_index_type("auto", AUTO_FLAT_MAX) == "flat"
    assert resolve_index_type("auto", AUTO_FLAT_MAX + 1) == "ivfpq"
    # Too few vectors for IVF-PQ to be worth it (or trainable): exact instead.
    assert resolve_index_type("ivfpq", IVFPQ_MIN_VECTORS - 1) == "flat"
    assert factory_string("ivfpq", 10, 64) == "Flat"
    assert resolve_index_type("hnsw", 3) == "hnsw"
    with pytest.raises(CbirError, match="unknown index type 'annoy'; choose one of: flat, hnsw, ivfpq, auto"):
        resolve_index_type("annoy", 10)


def test_queries_of_wrong_dimension_are_refused():
    index = build_index(structured_vectors(10, 16, seed=5), "flat")
    with pytest.raises(ValueError, match=r"shape \(n, 16\)"):
        search_index(index, np.ones((1, 8), dtype=np.float32), 3)


def make_store(tmp_path, shards: list[np.ndarray]) -> FeatureStore:
    dim = shards[0].shape[1]
    store = FeatureStore.create(tmp_path / "store", {"model": "synthetic", "weights": "none", "dim": dim,
                                                      "preprocessing": {}})
    start = 0
    for vectors in shards:
        items = [(f"/img/{start + i:05d}.jpg", f"{start + i:064x}", 1) for i in range(len(vectors))]
        store.add_shard(vectors, items)
        start += len(vectors)
    store.commit()
    return store


def test_shard_vectors_follow_live_rows_across_shards_and_removals(tmp_path):
    a, b = structured_vectors(30, 16, seed=6), structured_vectors(20, 16, seed=7)
    store = make_store(tmp_path, [a, b])
    store.remove_paths(["/img/00003.jpg", "/img/00031.jpg"])
    store.commit()
    live = store.load_vectors()
    view = ShardVectors(FeatureStore.open(store.root))
    assert view.shape == live.shape == (48, 16)
    positions = np.array([0, 2, 3, 27, 28, 29, 47])
    np.testing.assert_array_equal(view[positions], live[positions])
    with pytest.raises(IndexError):
        view[np.array([48])]


def test_saved_ivfpq_index_round_trips_and_searcher_reranks(tmp_path):
    from cbir_cli.search.searcher import Searcher

    x = structured_vectors(1200, 32, seed=8)
    store = make_store(tmp_path, [x[:700], x[700:]])
    built = build_store_index(store, "ivfpq")
    meta = read_index_meta(store)
    assert meta["index_type"] == "ivfpq" and meta["factory"].startswith("IVF") and meta["count"] == 1200
    loaded, index_type = load_index(FeatureStore.open(store.root))
    assert index_type == "ivfpq" and loaded.ntotal == built.ntotal == 1200
    np.testing.assert_array_equal(search_index(loaded, x[:5], K)[1], search_index(built, x[:5], K)[1])

    searcher = Searcher.open(store.root)
    assert searcher.backend.exact is not None  # re-ranked from the shards
    ids = [r.id for r in searcher.rows[:40]]
    results = searcher.search_ids(ids, k=K)
    _, truth = exact_search(x, x[:40], K)
    found = np.array([[searcher.rows.index(searcher.row(h.id)) for h in hits] for hits in results])
    assert recall(found, truth) >= 0.95
    for image_id, hits in zip(ids, results):
        assert hits[0].id == image_id and hits[0].score == pytest.approx(1.0, abs=1e-5)


def test_index_folder_keeps_the_saved_type_unless_asked(tmp_path, image_folder, tiny_embedder):
    from cbir_cli.pipeline.options import ExtractOptions

    folder = image_folder(6)
    options = ExtractOptions(workers=0)
    index_folder(folder, tmp_path / "idx", embedder=tiny_embedder, options=options, index_type="hnsw")
    store = FeatureStore.open(tmp_path / "idx")
    assert read_index_meta(store)["index_type"] == "hnsw"
    (folder / "img_000.jpg").unlink()  # a change, so the index is rebuilt
    index_folder(folder, tmp_path / "idx", embedder=tiny_embedder, options=options)
    store = FeatureStore.open(tmp_path / "idx")
    assert read_index_meta(store)["index_type"] == "hnsw" and read_index_meta(store)["count"] == 5
    with pytest.raises(CbirError, match="unknown index type 'bogus'"):
        index_folder(folder, tmp_path / "idx", embedder=tiny_embedder, options=options, index_type="bogus")
