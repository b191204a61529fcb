"""Opening a Searcher on a saved index reads no rows file: the row ids come from
the index's meta (each shard's first id) and a shard's rows are read, verified,
only when one of its rows is named in a result."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import store_of_vectors

from cbir_cli.errors import CorruptStoreError
from cbir_cli.search.faiss_backend import FaissBackend, index_paths
from cbir_cli.search.searcher import Searcher
from cbir_cli.store.feature_store import FeatureStore


def unit(n: int, dim: int = 16, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture
def saved(tmp_path):
    x = unit(2000)
    store = store_of_vectors(tmp_path / "store", x, shard_size=250)
    store.remove_paths([f"/img/{i:05d}.jpg" for i in range(0, 2000, 7)])
    store.commit()
    FaissBackend().refresh(store, "flat")
    return store, x


def test_open_reads_no_rows_file_and_results_name_the_right_rows(saved, monkeypatch):
    store, x = saved
    read: list[str] = []
    real = FeatureStore.shard_rows

    def counting(self, shard, cache=True):
        read.append(shard["name"])
        return real(self, shard, cache)

    monkeypatch.setattr(FeatureStore, "shard_rows", counting)
    searcher = Searcher.open(store.root)
    assert read == [] and searcher.count == store.count
    hits = searcher.search_vectors(x[[1, 1500]], k=1)
    assert [h[0].path for h in hits] == ["/img/00001.jpg", "/img/01500.jpg"]
    assert [h[0].id for h in hits] == [1, 1500]
    assert len(set(read)) == 2  # only the two shards holding the hits
    monkeypatch.undo()
    assert [r.path for r in searcher.rows] == [r.path for r in store.live_rows()]


def test_rows_whose_ids_are_not_the_recorded_ones_are_refused(saved):
    store, x = saved
    meta_file = index_paths(store)[1]
    meta = json.loads(meta_file.read_text())
    meta["coverage"][0][2] += 1  # a damaged meta: first ids off by one
    meta_file.write_text(json.dumps(meta))
    searcher = Searcher.open(store.root)
    with pytest.raises(CorruptStoreError, match="row ids"):
        searcher.search_vectors(x[[1]], k=1)
