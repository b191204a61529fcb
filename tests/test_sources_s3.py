"""Indexing from object storage through the image-source seam, against a REAL
S3-compatible server: moto's server mode (``moto[server]``, the test extra) started
on a free 127.0.0.1 port for this module -- s3fs talks HTTP to it exactly as to
AWS; nothing is mocked in the client. The endpoint reaches s3fs the way a user's
does: ``AWS_ENDPOINT_URL`` (see the README's "Indexing from object storage").
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from conftest import REPO
from fakes import CountingExecutor
from typer.testing import CliRunner

pytest.importorskip("s3fs", reason="the s3 extra (fsspec + s3fs) is not installed")
pytest.importorskip("moto.server", reason="moto[server] (test extra) is not installed")
pytest.importorskip("boto3")

if TYPE_CHECKING:
    from s3_server import Bucket

pytest_plugins = ["s3_server"]  # the server and bucket fixtures, shared with the Ray tests

from cbir_cli.cli import app
from cbir_cli.imageio.files import list_images
from cbir_cli.pipeline.local import LocalExecutor
from cbir_cli.pipeline.options import ExtractOptions
from cbir_cli.pipeline.sync import sync_folder
from cbir_cli.search.searcher import Searcher
from cbir_cli.store.feature_store import FeatureStore

OPTIONS = ExtractOptions(workers=0, batch_size=8, shard_size=8)


def vectors_by_name(store_dir: Path) -> dict[str, np.ndarray]:
    store = FeatureStore.open(store_dir)
    return {r.path.rsplit("/", 1)[-1]: v for r, v in zip(store.live_rows(), store.load_vectors())}


def upload_folder(bucket: Bucket, folder: Path, prefix: str) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            bucket.put(f"{prefix}/{path.relative_to(folder).as_posix()}", path.read_bytes())


def test_listing_streams_uris_with_etags_and_skips_folder_markers(bucket):
    for i in range(3):
        bucket.put_image(f"p/img_{i}.jpg", i)
    bucket.put_image("p/sub/deep.png", 9)
    bucket.put("p/notes.txt", b"not an image")
    bucket.put("p/empty/", b"")  # a "folder" marker some tools write
    bucket.put_image("other/img_9.jpg", 9)  # outside the prefix
    files = list_images(bucket.uri("p/"))
    assert list(files) == [bucket.uri(f"p/img_{i}.jpg") for i in range(3)] + [bucket.uri("p/sub/deep.png")]
    entry = files.source.stat(bucket.uri("p/img_0.jpg"))
    assert entry.size > 0 and entry.etag and entry.mtime_ns > 0
    assert files.unreadable == []


def test_a_missing_prefix_or_bucket_is_one_line(bucket):
    result = CliRunner().invoke(app, ["index", bucket.uri("nothing-here"), "--index", "unused", "--model",
                                      "test_tiny"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"error: {bucket.uri('nothing-here')}: no such bucket, container or prefix"]


def test_index_from_s3_equals_the_local_folder(bucket, image_folder, tiny_embedder, tmp_path):
    folder = image_folder(10)
    upload_folder(bucket, folder, "photos")
    local = sync_folder(folder, tmp_path / "local", embedder=tiny_embedder, options=OPTIONS)
    remote = sync_folder(bucket.uri("photos"), tmp_path / "s3", embedder=tiny_embedder, options=OPTIONS)
    assert local.added == remote.added == 10 and remote.skipped == 0
    a, b = vectors_by_name(tmp_path / "local"), vectors_by_name(tmp_path / "s3")
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])  # same bytes, same decoder: exactly equal
    rows = FeatureStore.open(tmp_path / "s3").live_rows()
    assert {r.path for r in rows} == {bucket.uri(f"photos/img_{i:03d}.jpg") for i in range(10)}


def counting_executor() -> CountingExecutor:
    """The local executor (decoding in this process), recording what it hashes."""
    return CountingExecutor(LocalExecutor(OPTIONS))


def test_rerun_unchanged_overwrite_and_delete(bucket, tiny_embedder, tmp_path):
    for i in range(6):
        bucket.put_image(f"p/img_{i}.jpg", i)
    store_dir = tmp_path / "index"
    assert sync_folder(bucket.uri("p"), store_dir, embedder=tiny_embedder, options=OPTIONS).added == 6

    # Unchanged: the listing's ETag/size/mtime match the stat cache; no object is read.
    executor = counting_executor()
    again = sync_folder(bucket.uri("p"), store_dir, embedder=tiny_embedder, executor=executor)
    assert (again.embedded, again.unchanged, again.removed) == (0, 6, 0) and executor.hashed == []

    # Overwritten (same size class, new content: a new ETag) -> re-embedded; deleted -> dropped.
    bucket.put_image("p/img_1.jpg", 101)
    bucket.delete("p/img_2.jpg")
    executor = counting_executor()
    changed = sync_folder(bucket.uri("p"), store_dir, embedder=tiny_embedder, executor=executor)
    assert executor.hashed == [bucket.uri("p/img_1.jpg")]
    assert (changed.embedded, changed.updated, changed.removed, changed.unchanged) == (1, 1, 1, 4)
    names = vectors_by_name(store_dir)
    assert sorted(names) == ["img_0.jpg", "img_1.jpg", "img_3.jpg", "img_4.jpg", "img_5.jpg"]
    fresh = tmp_path / "fresh"
    bucket_only = sync_folder(bucket.uri("p"), fresh, embedder=tiny_embedder, options=OPTIONS)
    assert bucket_only.added == 5
    np.testing.assert_array_equal(names["img_1.jpg"], vectors_by_name(fresh)["img_1.jpg"])


def test_a_corrupt_object_is_skipped_with_one_line_naming_its_uri(bucket, tmp_path):
    for i in range(3):
        bucket.put_image(f"p/img_{i}.jpg", i)
    bucket.put("p/broken.jpg", b"\xff\xd8\xff\xe0 this is not a JPEG")
    result = CliRunner().invoke(app, ["index", bucket.uri("p"), "--index", str(tmp_path / "index"),
                                      "--model", "test_tiny", "--workers", "0"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if "broken.jpg" in line]
    assert len(lines) == 1 and bucket.uri("p/broken.jpg") in lines[0], result.output
    assert len(FeatureStore.open(tmp_path / "index").live_rows()) == 3


def test_query_shows_uris_and_dedup_move_to_refuses_in_one_line(bucket, tmp_path):
    data = bucket.put_image("p/img_0.jpg", 0)
    bucket.put("p/copy_of_0.jpg", data)
    bucket.put_image("p/img_1.jpg", 1)
    index_dir = str(tmp_path / "index")
    runner = CliRunner()
    built = runner.invoke(app, ["index", bucket.uri("p"), "--index", index_dir, "--model", "test_tiny",
                                "--workers", "0"])
    assert built.exit_code == 0, built.output
    query = tmp_path / "q.jpg"
    query.write_bytes(data)
    found = runner.invoke(app, ["query", str(query), "--index", index_dir, "-k", "2"])
    assert found.exit_code == 0, found.output
    assert bucket.uri("p/img_0.jpg") in found.output or bucket.uri("p/copy_of_0.jpg") in found.output

    moved = runner.invoke(app, ["dedup", "--index", index_dir, "--threshold", "0.9", "--move-to",
                                  str(tmp_path / "aside"), "--yes"])
    assert moved.exit_code == 1
    assert len(moved.output.strip().splitlines()) == 1 and "cannot move images out of object storage" in moved.output
    assert not (tmp_path / "aside").exists()
    assert len(FeatureStore.open(index_dir).live_rows()) == 3


def test_sigkill_mid_run_then_rerun_holds_every_object_once(bucket, tmp_path):
    n = 300
    for i in range(n):
        bucket.put_image(f"many/img_{i:04d}.jpg", i, size=(48, 36))
    index_dir = tmp_path / "index"
    env = {**os.environ, **bucket.env, "PYTHONPATH": str(REPO / "src"), "CBIR_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "cbir_cli.cli", "index", bucket.uri("many"), "--index", str(index_dir),
           "--model", "test_tiny", "--workers", "0", "--batch-size", "8", "--shard-size", "8"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    # Kill once some of it is committed (and not all of it).
    while time.monotonic() < deadline and proc.poll() is None:
        if FeatureStore.exists(index_dir) and 0 < FeatureStore.open(index_dir).count < n:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed: " + proc.stderr.read().decode()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    partial = FeatureStore.open(index_dir).count
    assert 0 < partial < n
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = FeatureStore.open(index_dir).live_rows()
    paths = [r.path for r in rows]
    assert len(paths) == len(set(paths)) == n
    assert set(paths) == {bucket.uri(f"many/img_{i:04d}.jpg") for i in range(n)}


@pytest.mark.real
def test_oxford17_from_s3_gives_the_local_folders_vectors(bucket, shared_dir, tiny_embedder, tmp_path):
    flowers = shared_dir / "datasets" / "oxford17flowers"
    if not flowers.is_dir():
        pytest.skip(f"{flowers} not found")
    subset = tmp_path / "flowers"
    for cls in sorted(p for p in flowers.iterdir() if p.is_dir())[:4]:
        for image in sorted(cls.glob("*.jpg"))[:5]:
            (subset / cls.name).mkdir(parents=True, exist_ok=True)
            (subset / cls.name / image.name).write_bytes(image.read_bytes())
    upload_folder(bucket, subset, "oxford17")
    sync_folder(subset, tmp_path / "local", embedder=tiny_embedder, options=OPTIONS)
    sync_folder(bucket.uri("oxford17"), tmp_path / "s3", embedder=tiny_embedder, options=OPTIONS)
    local = FeatureStore.open(tmp_path / "local")
    remote = FeatureStore.open(tmp_path / "s3")
    a = {os.path.relpath(r.path, subset): v for r, v in zip(local.live_rows(), local.load_vectors())}
    prefix = bucket.uri("oxford17/")
    b = {r.path[len(prefix):]: v for r, v in zip(remote.live_rows(), remote.load_vectors())}
    assert a.keys() == b.keys() and len(a) == 20
    cosines = [float(np.dot(a[k], b[k]) / (np.linalg.norm(a[k]) * np.linalg.norm(b[k]))) for k in a]
    assert min(cosines) >= 0.999


def test_serve_sends_an_indexed_object_only_while_it_is_unchanged(bucket, tiny_embedder, tmp_path):
    """The server's "still the indexed image" check (pipeline/indexed_files.py) for
    rows keyed by URI: the object's bytes while unchanged; 410 once it is overwritten."""
    from cbir_cli.pipeline.sync import index_folder
    from cbir_cli.serve.app import create_app

    data = bucket.put_image("p/a.jpg", 1)
    bucket.put_image("p/b.jpg", 2)
    index_folder(bucket.uri("p"), tmp_path / "idx", embedder=tiny_embedder, options=OPTIONS)
    rows = {r.path: r for r in FeatureStore.open(tmp_path / "idx").live_rows()}
    image_id = rows[bucket.uri("p/a.jpg")].id
    client = create_app(Searcher.open(tmp_path / "idx", embedder=tiny_embedder)).test_client()

    first = client.get(f"/api/images/{image_id}")
    assert first.status_code == 200 and first.data == data
    assert client.get(f"/api/thumbnails/{image_id}").status_code == 200

    bucket.put_image("p/a.jpg", 3)  # overwritten after indexing
    changed = client.get(f"/api/images/{image_id}")
    assert changed.status_code == 410 and "s3://" not in changed.get_data(as_text=True)
    assert client.get(f"/api/thumbnails/{image_id}").status_code == 410
