"""The store's write path stays linear in what is written (issue 14, "bounded memory
at 1M"): a new shard tombstones the live rows of its paths through an index of live
paths, not a scan of every stored row; rows files parse fast and still refuse
anything malformed."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cbir_cli.store.feature_store import FeatureStore
from cbir_cli.store.manifest import Row, parse_rows

FINGERPRINT = {"model": "fake", "weights": "w", "dim": 4, "preprocessing": {}}


def unit_rows(n: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n, 4)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def add(store: FeatureStore, paths: list[str], seed: int) -> list[Row]:
    return store.add_shard(unit_rows(len(paths), seed), [(p, f"{seed:064d}", 1) for p in paths])


def live_paths(store: FeatureStore) -> list[str]:
    return [r.path for r in store.live_rows()]


@pytest.fixture
def store(tmp_path):
    s = FeatureStore.create(tmp_path / "idx", FINGERPRINT)
    for k in range(30):
        add(s, [f"/d/{k}/{i}.jpg" for i in range(4)], k)
    s.commit()
    return FeatureStore.open(tmp_path / "idx")


def test_new_shards_do_not_read_every_stored_row(store, monkeypatch):
    reads = []
    original = FeatureStore.shard_rows
    monkeypatch.setattr(FeatureStore, "shard_rows", lambda self, shard, cache=True: (
        reads.append(shard["name"]), original(self, shard, cache))[1])
    add(store, ["/new/0.jpg", "/d/3/1.jpg"], 100)  # first write in this process: builds the index once
    assert len(reads) == 30
    reads.clear()
    for k in range(5):
        add(store, [f"/new/{k + 1}.jpg", f"/d/{k + 10}/2.jpg"], 101 + k)
    assert reads == []  # 30 per shard when every new shard scanned the store


def test_replacing_and_removing_through_the_index_matches_a_full_scan(store):
    add(store, ["/d/3/1.jpg", "/x.jpg"], 200)  # replaces one row of shard 4
    add(store, ["/d/3/1.jpg"], 201)  # replaces the row just written
    assert store.remove_paths(["/d/5/0.jpg", "/d/5/1.jpg", "/d/5/2.jpg", "/d/5/3.jpg", "/not/there.jpg"]) == 4
    paths = live_paths(store)
    assert len(paths) == len(set(paths)) == 30 * 4 - 4 + 1
    assert "/d/5/0.jpg" not in paths and paths.count("/d/3/1.jpg") == 1
    # The shard whose rows were all removed is gone; the latest copy of /d/3/1.jpg is live.
    assert "shard-000006" not in {s["name"] for s in store.manifest["shards"]}
    newest = {r.path: r for r in store.live_rows()}["/d/3/1.jpg"]
    assert newest.sha256 == f"{201:064d}"
    store.commit()
    reopened = FeatureStore.open(store.root)
    assert live_paths(reopened) == paths


def test_a_manifest_changed_elsewhere_is_seen(store):
    """A repair drops shards by assigning the manifest: the index must notice."""
    add(store, ["/warm.jpg"], 300)  # index built
    dropped = store.manifest["shards"][0]
    store.manifest = {**store.manifest, "shards": store.manifest["shards"][1:]}
    add(store, ["/d/0/0.jpg", "/d/1/0.jpg"], 301)  # /d/0/0.jpg was in the dropped shard
    paths = live_paths(store)
    assert paths.count("/d/0/0.jpg") == 1 and paths.count("/d/1/0.jpg") == 1
    assert dropped["name"] not in {s["name"] for s in store.manifest["shards"]}
    shard_1 = next(s for s in store.manifest["shards"] if s["name"] == "shard-000002")
    assert shard_1["removed"] == [0]


def test_rows_files_still_refuse_malformed_rows():
    good = {"id": 1, "path": "/a.jpg", "sha256": "0" * 64, "size": 5}
    assert parse_rows(json.dumps([good]).encode()) == [Row(1, "/a.jpg", "0" * 64, 5)]
    for bad in ({**good, "id": True}, {**good, "size": 1.5}, {**good, "path": 3}, {**good, "extra": 1},
                {k: v for k, v in good.items() if k != "sha256"}, [1, 2], "row"):
        with pytest.raises(ValueError, match="row #1"):
            parse_rows(json.dumps([good, bad]).encode())
    with pytest.raises(ValueError, match="not a JSON list"):
        parse_rows(b'{"id": 1}')
