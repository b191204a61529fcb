"""Incremental indexing: a re-run embeds only what changed (by content hash), and
queries reflect each change. Real fsyncs here (test_crash.py turns them off)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import make_image
from typer.testing import CliRunner

from cbir_cli.cli import app
from cbir_cli.pipeline.options import ExtractOptions
from cbir_cli.pipeline.sync import sync_folder
from cbir_cli.search.check import check_index
from cbir_cli.search.searcher import Searcher
from cbir_cli.store.feature_store import FeatureStore

OPTIONS = ExtractOptions(workers=0, batch_size=4, shard_size=4)


class CountingEmbedder:
    """The tiny model, counting the images that go through it."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.images = 0

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def embed(self, batch):
        self.images += len(batch)
        return self.inner.embed(batch)


@pytest.fixture
def counting(tiny_embedder) -> CountingEmbedder:
    return CountingEmbedder(tiny_embedder)


def sync(folder: Path, store_dir: Path, embedder: CountingEmbedder):
    embedder.images = 0
    return sync_folder(folder, store_dir, embedder=embedder, options=OPTIONS)


def counts(summary) -> dict[str, int]:
    keys = ("added", "updated", "removed", "unchanged", "reused", "skipped", "embedded", "store_count")
    return {k: getattr(summary, k) for k in keys}


def top_hit(store_dir: Path, embedder, image_path: Path):
    return Searcher.open(store_dir, embedder=embedder).search_paths([image_path], k=1)[0][0]


def test_rerun_on_unchanged_folder_does_no_model_work_and_commits_nothing(image_folder, tmp_path, counting,
                                                                          monkeypatch):
    folder = image_folder(6)
    store_dir = tmp_path / "store"
    first = sync(folder, store_dir, counting)
    assert counts(first) == dict(added=6, updated=0, removed=0, unchanged=0, reused=0, skipped=0, embedded=6,
                                 store_count=6)
    assert counting.images == 6
    generation = FeatureStore.open(store_dir).generation

    again = sync(folder, store_dir, counting)
    assert counts(again) == dict(added=0, updated=0, removed=0, unchanged=6, reused=0, skipped=0, embedded=0,
                                 store_count=6)
    assert counting.images == 0
    assert FeatureStore.open(store_dir).generation == generation  # nothing rewritten

    # Without a preloaded model, nothing is even loaded.
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded for an unchanged folder")

    monkeypatch.setattr("cbir_cli.models.loading.load_embedder", no_model)
    assert sync_folder(folder, store_dir, model="test_tiny", options=OPTIONS).embedded == 0


def test_add_change_delete_touch_and_move_are_each_handled_and_reflected_in_queries(image_folder, tmp_path,
                                                                                   counting):
    folder = image_folder(6)
    store_dir = tmp_path / "store"
    sync(folder, store_dir, counting)

    # Add a file: only it is embedded, and it finds itself.
    make_image(50).save(folder / "new.jpg", quality=90)
    assert counts(sync(folder, store_dir, counting)) == dict(
        added=1, updated=0, removed=0, unchanged=6, reused=0, skipped=0, embedded=1, store_count=7)
    assert counting.images == 1
    assert top_hit(store_dir, counting, folder / "new.jpg").path == str(folder / "new.jpg")

    # Change a file's content under the same name: re-embedded, old vector gone.
    old_content = tmp_path / "old_001.jpg"
    (folder / "img_001.jpg").rename(old_content)
    make_image(51).save(folder / "img_001.jpg", quality=90)
    assert counts(sync(folder, store_dir, counting)) == dict(
        added=0, updated=1, removed=0, unchanged=6, reused=0, skipped=0, embedded=1, store_count=7)
    hit = top_hit(store_dir, counting, folder / "img_001.jpg")
    assert hit.path == str(folder / "img_001.jpg") and hit.score == pytest.approx(1.0, abs=1e-4)
    stale = top_hit(store_dir, counting, old_content)
    assert not (stale.path == str(folder / "img_001.jpg") and stale.score > 0.9999)

    # Delete a file: removed from the store and from results.
    (folder / "img_002.jpg").unlink()
    assert counts(sync(folder, store_dir, counting)) == dict(
        added=0, updated=0, removed=1, unchanged=6, reused=0, skipped=0, embedded=0, store_count=6)
    paths = [r.path for r in Searcher.open(store_dir, embedder=counting).rows]
    assert str(folder / "img_002.jpg") not in paths and len(paths) == 6

    # Touch a file (new mtime, same bytes): unchanged, nothing embedded.
    stat = (folder / "img_003.jpg").stat()
    os.utime(folder / "img_003.jpg", ns=(stat.st_atime_ns + 10**10, stat.st_mtime_ns + 10**10))
    assert counts(sync(folder, store_dir, counting)) == dict(
        added=0, updated=0, removed=0, unchanged=6, reused=0, skipped=0, embedded=0, store_count=6)
    assert counting.images == 0

    # Move a file: its stored vector is reused under the new path, no model work.
    store = FeatureStore.open(store_dir)
    before = dict(zip([r.path for r in store.live_rows()], store.load_vectors()))
    moved = folder / "sub" / "renamed.jpg"
    moved.parent.mkdir()
    (folder / "img_004.jpg").rename(moved)
    assert counts(sync(folder, store_dir, counting)) == dict(
        added=1, updated=0, removed=1, unchanged=5, reused=1, skipped=0, embedded=0, store_count=6)
    assert counting.images == 0
    store = FeatureStore.open(store_dir)
    after = dict(zip([r.path for r in store.live_rows()], store.load_vectors()))
    np.testing.assert_array_equal(after[str(moved)], before[str(folder / "img_004.jpg")])
    assert str(folder / "img_004.jpg") not in after
    assert top_hit(store_dir, counting, moved).path == str(moved)
    assert check_index(store_dir).ok


def test_a_file_that_turns_undecodable_loses_its_stale_vector_and_is_not_decoded_again(image_folder, tmp_path,
                                                                                      counting):
    folder = image_folder(4)
    store_dir = tmp_path / "store"
    sync(folder, store_dir, counting)
    (folder / "img_000.jpg").write_bytes(b"not an image any more")
    summary = sync(folder, store_dir, counting)
    assert counts(summary) == dict(added=0, updated=0, removed=1, unchanged=3, reused=0, skipped=1, embedded=0,
                                   store_count=3)
    assert summary.skipped_files == [(str(folder / "img_000.jpg"), "not a recognised image format")]
    assert str(folder / "img_000.jpg") not in FeatureStore.open(store_dir).rows_by_path()

    # Unchanged bad file: reported again from the manifest, without decoding.
    summary = sync(folder, store_dir, counting)
    assert (summary.skipped, summary.embedded, counting.images) == (1, 0, 0)
    # Fixed: embedded again.
    make_image(0).save(folder / "img_000.jpg", quality=90)
    assert counts(sync(folder, store_dir, counting))["added"] == 1


def test_cli_index_rerun_reports_counts_and_keeps_the_saved_index(image_folder, tmp_path):
    folder = image_folder(5)
    index_dir = tmp_path / "index"
    args = ["index", str(folder), "--index", str(index_dir), "--model", "test_tiny", "--workers", "0", "--json"]
    runner = CliRunner()
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    meta_before = (index_dir / "index" / "index.json").read_bytes()
    second = runner.invoke(app, args)
    assert second.exit_code == 0, second.output
    summary = json.loads(second.stdout)
    assert (summary["unchanged"], summary["embedded"], summary["added"], summary["store_count"]) == (5, 0, 0, 5)
    assert (index_dir / "index" / "index.json").read_bytes() == meta_before  # not rebuilt
    check = runner.invoke(app, ["check", "--index", str(index_dir)])
    assert check.exit_code == 0 and "search index current" in check.output
