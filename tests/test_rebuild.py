"""`cbir index --rebuild`: the new store replaces the old one in one commit."""

from __future__ import annotations

import numpy as np
import pytest

from cbir_cli.errors import Interrupted
from cbir_cli.pipeline.options import ExtractOptions
from cbir_cli.pipeline.sync import index_folder
from cbir_cli.search.check import check_index
from cbir_cli.search.searcher import Searcher
from cbir_cli.store.feature_store import FeatureStore

OPTIONS = ExtractOptions(workers=0, batch_size=2, shard_size=2)


class InterruptAfter:
    """Wraps an embedder; Ctrl-C arrives while it embeds batch number ``n``."""

    def __init__(self, inner, n: int) -> None:
        self.inner, self.n, self.calls = inner, n, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def embed(self, batch):
        self.calls += 1
        if self.calls == self.n:
            raise KeyboardInterrupt
        return self.inner.embed(batch)


def snapshot(store_dir):
    store = FeatureStore.open(store_dir)
    return {r.path: v for r, v in zip(store.live_rows(), store.load_vectors())}


def test_interrupted_rebuild_leaves_previous_index_serving_then_rebuild_completes(
    image_folder, tiny_embedder, tmp_path
):
    folder = image_folder(7)
    store_dir = tmp_path / "idx"
    index_folder(folder, store_dir, embedder=tiny_embedder, options=OPTIONS)
    before = snapshot(store_dir)
    generation = FeatureStore.open(store_dir).generation

    with pytest.raises(Interrupted, match=r"rebuild .* did not finish and the previous index is unchanged"):
        index_folder(folder, store_dir, embedder=InterruptAfter(tiny_embedder, 3), options=OPTIONS, rebuild=True)
    # Two new shards were written, but nothing committed: the old index is whole.
    store = FeatureStore.open(store_dir)
    assert store.generation == generation and store.count == 7
    assert len(store.leftover_files()) >= 2
    searcher = Searcher.open(store_dir, embedder=tiny_embedder)
    assert searcher.count == 7
    assert check_index(store_dir).ok

    summary = index_folder(folder, store_dir, embedder=tiny_embedder, options=OPTIONS, rebuild=True)
    assert summary.embedded == 7 and summary.unchanged == 0 and summary.store_count == 7
    after = snapshot(store_dir)
    assert after.keys() == before.keys()
    for path, vector in before.items():
        np.testing.assert_allclose(after[path], vector, atol=1e-6)
    store = FeatureStore.open(store_dir)
    assert store.leftover_files() == []  # the old shards and the orphans are gone
    old_ids = {r.id for r in Searcher.open(store_dir, embedder=tiny_embedder).rows}
    assert min(old_ids) >= 7  # new rows, new ids: ids are never reused
    assert check_index(store_dir).ok


def test_rebuild_repairs_a_store_too_damaged_to_open(image_folder, tiny_embedder, tmp_path):
    folder = image_folder(3)
    store_dir = tmp_path / "idx"
    index_folder(folder, store_dir, embedder=tiny_embedder, options=OPTIONS)
    (store_dir / "manifest.json").write_text("{ not json")
    with pytest.raises(Exception, match="manifest"):
        Searcher.open(store_dir, embedder=tiny_embedder)
    summary = index_folder(folder, store_dir, embedder=tiny_embedder, options=OPTIONS, rebuild=True)
    assert summary.store_count == 3
    assert check_index(store_dir).ok
    assert Searcher.open(store_dir, embedder=tiny_embedder).count == 3
