"""The image-source seam on this machine (no server): the local folder source, a
``file://`` URL through fsspec, and the stat cache's stamps (ETag-style, read from
older caches without re-hashing)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from fakes import CountingExecutor

from cbir_cli.imageio.files import LocalFolderSource, list_images, open_source
from cbir_cli.pipeline.local import LocalExecutor
from cbir_cli.pipeline.options import ExtractOptions
from cbir_cli.pipeline.statcache import STAT_CACHE
from cbir_cli.pipeline.sync import sync_folder
from cbir_cli.store.feature_store import FeatureStore

OPTIONS = ExtractOptions(workers=0)


def counting_executor() -> CountingExecutor:
    """The local executor (decoding in this process), recording what it hashes."""
    return CountingExecutor(LocalExecutor(OPTIONS))


def settled(folder: Path) -> None:
    past = time.time() - 100
    for path in folder.rglob("*"):
        os.utime(path, (past, past))


def test_local_source_streams_what_list_images_lists(image_folder):
    folder = image_folder(4)
    (folder / "sub").mkdir()
    (folder / "sub" / "x.png").write_bytes((folder / "img_000.jpg").read_bytes())
    (folder / "notes.txt").write_text("no")
    source = open_source(folder)
    assert isinstance(source, LocalFolderSource) and source.movable
    entries = list(source.entries([]))
    assert [e.uri for e in entries] == [str(p) for p in list_images(folder)]
    st = os.stat(entries[0].uri)
    assert entries[0] == source.stat(entries[0].uri)
    assert entries[0].stamp == (st.st_size, st.st_mtime_ns, f"{st.st_ino}:{st.st_ctime_ns}")


def test_a_format_1_stat_cache_is_read_without_rehashing(image_folder, tiny_embedder, tmp_path):
    """Indexes written before the seam keep their stat cache: the next run hashes nothing."""
    folder = image_folder(5)
    settled(folder)
    store_dir = tmp_path / "store"
    sync_folder(folder, store_dir, embedder=tiny_embedder, options=OPTIONS)
    rows = FeatureStore.open(store_dir).live_rows()
    old = {"format": 1, "entries": {}}
    for row in rows:
        st = os.stat(row.path)
        old["entries"][row.path] = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, row.sha256]
    (store_dir / STAT_CACHE).write_text(json.dumps(old))
    executor = counting_executor()
    summary = sync_folder(folder, store_dir, embedder=tiny_embedder, executor=executor)
    assert executor.hashed == [] and summary.unchanged == 5


def test_file_url_indexes_like_the_folder_keyed_by_uri(image_folder, tiny_embedder, tmp_path):
    pytest.importorskip("fsspec")
    folder = image_folder(5)
    settled(folder)
    os.mkfifo(folder / "pipe.jpg")  # fsspec's local open would block on it: never opened
    local = sync_folder(folder, tmp_path / "local", embedder=tiny_embedder, options=OPTIONS)
    uri = f"file://{folder}/"
    remote = sync_folder(uri, tmp_path / "url", embedder=tiny_embedder, options=OPTIONS)
    assert local.added == remote.added == 5
    a = {Path(r.path).name: v for r, v in zip(*_rows(tmp_path / "local"))}
    b = {r.path.rsplit("/", 1)[-1]: v for r, v in zip(*_rows(tmp_path / "url"))}
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    assert all(r.path.startswith(f"file://{folder}/") for r in _rows(tmp_path / "url")[0])
    executor = counting_executor()
    again = sync_folder(uri, tmp_path / "url", embedder=tiny_embedder, executor=executor)
    assert executor.hashed == [] and again.unchanged == 5
    (folder / "img_001.jpg").unlink()
    assert sync_folder(uri, tmp_path / "url", embedder=tiny_embedder, options=OPTIONS).removed == 1


def _rows(store_dir: Path):
    store = FeatureStore.open(store_dir)
    return store.live_rows(), store.load_vectors()
