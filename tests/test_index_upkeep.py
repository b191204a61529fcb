"""Incremental upkeep of the saved Faiss index (search/index_upkeep.py): new rows
are added to the saved (trained) index and removed rows leave it, instead of a
rebuild from every shard; checked against the exact oracle and a fresh build."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import store_of_vectors

from cbir_cli.search import saved_index as saved_index_module
from cbir_cli.search.faiss_backend import FaissBackend, index_paths, read_index_meta
from cbir_cli.search.index_upkeep import RETRAIN_GROWTH
from cbir_cli.store import vectors as vectors_module
from cbir_cli.store.feature_store import FeatureStore
from tests.fakes import FakeBackend

DIM = 32


def structured(n: int, seed: int) -> np.ndarray:
    """Unit vectors near a 6-d subspace, so nearest neighbours mean something."""
    rng = np.random.default_rng(seed)
    basis = np.random.default_rng(0).standard_normal((6, DIM)).astype(np.float32)
    x = rng.standard_normal((n, 6)).astype(np.float32) @ basis + 0.3 * rng.standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def churn(store: FeatureStore, first: int, added: int, removed_every: int, seed: int) -> None:
    """Add ``added`` rows (one new shard) and remove every ``removed_every``-th live path (0: none); commit."""
    new = structured(added, seed)
    store.add_shard(new, [(f"/img/new{first + i:06d}.jpg", f"{first + i + 10**9:064x}", 100) for i in range(added)])
    if removed_every:
        store.remove_paths([r.path for r in store.live_rows()[::removed_every]])
    store.commit()


def recall(backend, oracle, queries: np.ndarray, k: int = 10) -> float:
    ids = backend.search(queries, k)[1]
    truth = oracle.search(queries, k)[1]
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(ids, truth)]))


@pytest.mark.parametrize("index_type", ["flat", "hnsw", "ivfpq"])
def test_incremental_refresh_equals_a_fresh_build(tmp_path, index_type):
    x = structured(3000, 1)
    store = store_of_vectors(tmp_path / "store", x)
    assert FaissBackend().refresh(store, index_type)
    for round_ in range(2):
        churn(store, 1000 * round_, 700, 9, seed=10 + round_)
        incremental = FaissBackend()
        assert incremental.refresh(store, index_type)
        assert read_index_meta(store)["generation"] == store.generation
        fresh, oracle = FaissBackend(), FakeBackend()
        fresh.build(store, index_type, persist=False)
        oracle.build(store, "flat")
        assert incremental.count == fresh.count == oracle.count == store.count
        queries = structured(60, 99 + round_)
        gone = set(range(len(x))) - {int(i) for i in oracle.ids}
        assert not set(incremental.search(queries, 50)[1].ravel().tolist()) & gone
        if index_type == "flat":
            s1, i1 = incremental.search(queries, 10)
            s2, i2 = fresh.search(queries, 10)
            np.testing.assert_array_equal(i1, i2)
            np.testing.assert_array_equal(s1, s2)
        else:
            assert recall(incremental, oracle, queries) >= recall(fresh, oracle, queries) - 0.03
            assert recall(incremental, oracle, queries) >= 0.9
        # What was saved answers as the refreshed backend does.
        loaded = FaissBackend()
        assert loaded.load(FeatureStore.open(store.root))
        np.testing.assert_array_equal(loaded.search(queries, 10)[1], incremental.search(queries, 10)[1])


def test_incremental_refresh_verifies_only_the_new_shards(tmp_path, monkeypatch):
    store = store_of_vectors(tmp_path / "store", structured(3000, 1))
    FaissBackend().refresh(store, "ivfpq")
    verified: list[str] = []
    real_verify, real_read = vectors_module.verify_shard_file, FeatureStore.read_shard

    def counting_verify(store_, shard, *args, **kwargs):
        verified.append(shard["name"])
        return real_verify(store_, shard, *args, **kwargs)

    def counting_read(self, shard, mmap):
        if not mmap:
            verified.append(shard["name"])
        return real_read(self, shard, mmap)

    monkeypatch.setattr(vectors_module, "verify_shard_file", counting_verify)
    monkeypatch.setattr(FeatureStore, "read_shard", counting_read)
    churn(store, 0, 250, 20, seed=5)  # below the segments' share (MERGE_FRACTION): no rebuild
    verified.clear()
    assert FaissBackend().refresh(store, "ivfpq")
    assert verified == [store.manifest["shards"][-1]["name"]]


def test_ivf_is_retrained_once_the_collection_outgrows_its_training_count(tmp_path):
    store = store_of_vectors(tmp_path / "store", structured(1200, 1))
    FaissBackend().refresh(store, "ivfpq")
    assert read_index_meta(store)["trained_count"] == 1200
    churn(store, 0, 1000, 0, seed=2)  # 2,200 rows: below 4x, kept
    FaissBackend().refresh(store, "ivfpq")
    assert read_index_meta(store)["trained_count"] == 1200
    churn(store, 1000, RETRAIN_GROWTH * 1200 - 2200 + 1, 0, seed=3)  # past 4x: retrained
    backend = FaissBackend()
    backend.refresh(store, "ivfpq")
    assert read_index_meta(store)["trained_count"] == store.count == RETRAIN_GROWTH * 1200 + 1
    assert recall(backend, _oracle(store), structured(40, 7)) >= 0.9


def _oracle(store: FeatureStore) -> FakeBackend:
    oracle = FakeBackend()
    oracle.build(store, "flat")
    return oracle


def test_an_index_saved_by_an_older_version_is_rebuilt_once(tmp_path, monkeypatch):
    store = store_of_vectors(tmp_path / "store", structured(2000, 1))
    FaissBackend().refresh(store, "ivfpq")
    meta_file = index_paths(store)[1]
    meta = json.loads(meta_file.read_text())
    for key in ("coverage", "labels", "trained_count"):
        meta.pop(key)
    meta_file.write_text(json.dumps(meta))
    churn(store, 0, 300, 13, seed=4)
    builds: list[int] = []
    real = saved_index_module.build_labelled
    monkeypatch.setattr(saved_index_module, "build_labelled", lambda s, t: builds.append(1) or real(s, t))
    backend = FaissBackend()
    assert backend.refresh(store, "ivfpq") and builds == [1]
    assert "coverage" in read_index_meta(store)
    assert recall(backend, _oracle(store), structured(40, 8)) >= 0.9


def test_a_damaged_saved_index_is_rebuilt_not_updated(tmp_path):
    store = store_of_vectors(tmp_path / "store", structured(2000, 1))
    FaissBackend().refresh(store, "flat")
    churn(store, 0, 300, 13, seed=4)
    index_file = Path(index_paths(store)[0])
    data = bytearray(index_file.read_bytes())
    data[-10] ^= 0xFF
    index_file.write_bytes(bytes(data))
    backend = FaissBackend()
    assert backend.refresh(store, "flat")
    fresh = FaissBackend()
    fresh.build(store, "flat", persist=False)
    queries = structured(20, 3)
    np.testing.assert_array_equal(backend.search(queries, 10)[1], fresh.search(queries, 10)[1])


@pytest.mark.parametrize("index_type", ["flat", "ivfpq"])
def test_a_shard_whose_rows_are_all_removed_leaves_the_index(tmp_path, index_type):
    store = store_of_vectors(tmp_path / "store", structured(6000, 1))
    FaissBackend().refresh(store, index_type)
    dropped = store.manifest["shards"][1]["name"]
    store.remove_paths([f"/img/{i:05d}.jpg" for i in range(500, 1000)])  # the second shard, whole
    store.commit()
    assert dropped not in {s["name"] for s in store.manifest["shards"]}
    incremental, oracle = FaissBackend(), _oracle(store)
    assert incremental.refresh(store, index_type)
    assert read_index_meta(store)["generation"] == store.generation
    queries = structured(40, 5)
    assert not set(incremental.search(queries, 50)[1].ravel().tolist()) & set(range(500, 1000))
    assert recall(incremental, oracle, queries) >= (1.0 if index_type == "flat" else 0.9)


def test_a_reranking_refresh_reads_no_rows_file_for_its_live_ids(tmp_path, monkeypatch):
    """The DBA upkeep after an incremental refresh found the live ids by parsing
    every rows file (10M rows: 43 s and 4.5 GB in bench/scale.py); they come from
    the manifest and the saved index's record of each shard's first id."""
    from cbir_cli.search.dba import DbaSettings
    from cbir_cli.search.rerank import RerankingBackend

    store = store_of_vectors(tmp_path / "store", structured(3000, 1))
    RerankingBackend(FaissBackend(), dba=DbaSettings(depth=0)).refresh(store, "flat")
    churn(store, 0, 500, 11, seed=5)
    store = FeatureStore.open(store.root)  # a new writer: nothing cached
    reads: list[str] = []
    real = FeatureStore.shard_rows
    monkeypatch.setattr(FeatureStore, "shard_rows", lambda self, shard, cache=True: (
        reads.append(shard["name"]), real(self, shard, cache))[1])
    backend = RerankingBackend(FaissBackend(), dba=DbaSettings(depth=0))
    backend.refresh(store, "flat")
    assert set(reads) <= {store.manifest["shards"][-1]["name"]}  # the new shard's own rows, for its ids
    live = np.array([r.id for r in store.live_rows()])
    assert np.array_equal(backend._live_ids(store), live)


def test_an_ivf_upkeep_writes_a_segment_and_never_reads_or_rewrites_the_base(tmp_path, monkeypatch):
    """At 10M x 32-d the base file is 154 MB: reading and rewriting it per run made
    the +1,000/-1,000 upkeep grow 8x from 1M to 10M rows (bench/scale.py)."""
    store = store_of_vectors(tmp_path / "store", structured(3000, 1))
    FaissBackend().refresh(store, "ivfpq")
    base = Path(index_paths(store)[0])
    before = base.stat()
    reads: list[int] = []
    real = saved_index_module.read_saved_index
    monkeypatch.setattr(saved_index_module, "read_saved_index", lambda *a, **k: reads.append(1) or real(*a, **k))
    churn(store, 0, 200, 17, seed=6)
    assert FaissBackend().refresh(store, "ivfpq")
    after = base.stat()
    assert reads == [] and (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    meta = read_index_meta(store)
    last = store.manifest["shards"][-1]
    assert [len(meta["segments"]), meta["segments"][0][2]] == [1, last["rows"] - len(last["removed"])]
    assert meta["count"] - meta["tombstones"] == store.count
    # Loaded (base + segment merged) it answers as one index with every vector added.
    loaded = FaissBackend()
    assert loaded.load(FeatureStore.open(store.root))
    oracle = _oracle(store)
    queries = structured(60, 11)
    assert loaded.count == store.count
    assert recall(loaded, oracle, queries) >= 0.9
    new_ids = {int(r.id) for r in store.shard_rows(store.manifest["shards"][-1])}
    hits = set(loaded.search(structured(200, 6)[:50], 1)[1].ravel().tolist())
    assert hits & new_ids  # the segment's rows are found (the queries are the new vectors)


def test_segments_merge_by_size_tier_and_the_index_is_built_whole_past_its_share(tmp_path):
    from cbir_cli.search.index_segments import MERGE_FRACTION

    store = store_of_vectors(tmp_path / "store", structured(4000, 1))
    FaissBackend().refresh(store, "ivfpq")
    folder = Path(index_paths(store)[0]).parent
    # Rows per run -> segment rows after it: a smaller one stays apart, a same-tier one merges.
    for round_, (added, expected) in enumerate([(100, [100]), (30, [100, 30]), (10, [100, 30, 10]),
                                                (40, [180])]):
        churn(store, 1000 * round_, added, 0, seed=20 + round_)
        FaissBackend().refresh(store, "ivfpq")
        segments = read_index_meta(store)["segments"]
        assert [e[2] for e in segments] == expected
        assert sorted(p.name for p in folder.glob("segment-*.faiss")) == sorted(e[0] for e in segments)
        loaded = FaissBackend()
        assert loaded.load(FeatureStore.open(store.root))
        assert loaded.count == store.count
        assert recall(loaded, _oracle(store), structured(40, 9)) >= 0.9
    # Past MERGE_FRACTION of the base's rows in segments: built whole, with the
    # training it has (retrained only past RETRAIN_GROWTH).
    churn(store, 9000, int(MERGE_FRACTION * 4000), 0, seed=30)
    FaissBackend().refresh(store, "ivfpq")
    meta = read_index_meta(store)
    assert meta["segments"] == [] and meta["trained_count"] == 4000
    assert meta["count"] == store.count and meta["tombstones"] == 0
    assert not list(folder.glob("segment-*.faiss"))
    loaded = FaissBackend()
    assert loaded.load(FeatureStore.open(store.root))
    assert recall(loaded, _oracle(store), structured(40, 9)) >= 0.9


def test_a_damaged_segment_is_never_served_and_the_next_writer_rebuilds(tmp_path):
    from cbir_cli.errors import CorruptStoreError

    store = store_of_vectors(tmp_path / "store", structured(3000, 1))
    FaissBackend().refresh(store, "ivfpq")
    churn(store, 0, 200, 0, seed=6)
    FaissBackend().refresh(store, "ivfpq")
    segment = Path(index_paths(store)[0]).parent / read_index_meta(store)["segments"][0][0]
    data = bytearray(segment.read_bytes())
    data[-20] ^= 0xFF
    segment.write_bytes(bytes(data))
    with pytest.raises(CorruptStoreError, match="segment-"):
        FaissBackend().load(FeatureStore.open(store.root))
    churn(store, 1000, 100, 0, seed=7)
    backend = FaissBackend()
    assert backend.refresh(store, "ivfpq")
    assert read_index_meta(store)["segments"] == [] and not segment.exists()
    assert backend.count == store.count


@pytest.mark.parametrize("bad", [["../../etc/passwd", "0" * 64, 1, []], ["segment-1.faiss", "0" * 64, -1, []],
                                 ["segment-1.faiss", 5, 1, []], ["/tmp/segment-1.faiss", "0" * 64, 1, []],
                                 ["segment-1.faiss", "0" * 64, 1], ["segment-1.faiss", "0" * 64, 1, [7]]])
def test_a_meta_naming_a_segment_outside_the_index_is_damaged(bad):
    meta = {"generation": 1, "count": 1, "index_type": "ivfpq", "sha256": "0" * 64, "dim": 4,
            "segments": [bad]}
    assert saved_index_module.meta_problem(meta)
    assert not saved_index_module.meta_problem({**meta, "segments": [["segment-1.faiss", "0" * 64, 1, ["a"]]]})
