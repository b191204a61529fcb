"""Defects found using it as a new user would: the same folder spelled two ways, a
failed first run, the missing-index message."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cbir_cli.cli import app
from cbir_cli.pipeline.options import ExtractOptions
from cbir_cli.pipeline.sync import index_folder, sync_folder
from cbir_cli.search.searcher import Searcher
from cbir_cli.store.feature_store import FeatureStore
from cbir_cli.store.manifest import MANIFEST

OPTIONS = ExtractOptions(workers=0, batch_size=4)
runner = CliRunner()


def test_one_folder_spelled_two_ways_is_stored_once(image_folder, tmp_path, tiny_embedder, monkeypatch):
    folder = image_folder(4, name="photos")
    (tmp_path / "a").mkdir()
    (tmp_path / "link").symlink_to(folder)
    monkeypatch.chdir(tmp_path)
    index_dir = tmp_path / "index"
    for spelling in ("./a/../photos", str(folder), "link"):
        summary = index_folder(spelling, index_dir, embedder=tiny_embedder, options=OPTIONS)
        assert summary.store_count == 4, spelling
    assert summary.unchanged == 4 and summary.embedded == 0
    paths = [r.path for r in FeatureStore.open(index_dir).live_rows()]
    assert sorted(paths) == sorted(str(p) for p in folder.iterdir())  # resolved, absolute
    hits = Searcher.open(index_dir, embedder=tiny_embedder).search_paths([folder / "img_002.jpg"], k=2)[0]
    assert hits[0].path == str(folder / "img_002.jpg") and hits[1].path != hits[0].path


def test_an_older_index_with_unnormalised_paths_migrates_without_re_embedding(image_folder, tmp_path, tiny_embedder):
    folder = image_folder(3, name="photos")
    (tmp_path / "a").mkdir()
    store_dir = tmp_path / "store"
    sync_folder(folder, store_dir, embedder=tiny_embedder, options=OPTIONS)
    # What older versions stored for `cbir index ./a/../photos`: the path as given.
    store = FeatureStore.open(store_dir)
    shard = store.manifest["shards"][0]
    rows_file = store.shard_paths(shard)[1]
    rows = json.loads(rows_file.read_text())
    for row in rows:
        row["path"] = row["path"].replace(f"{os.sep}photos{os.sep}", f"{os.sep}a{os.sep}..{os.sep}photos{os.sep}")
    data = (json.dumps(rows, indent=1, sort_keys=True) + "\n").encode("ascii")
    rows_file.write_bytes(data)
    import hashlib

    manifest = json.loads((store_dir / MANIFEST).read_text())
    manifest["shards"][0].update(rows_sha256=hashlib.sha256(data).hexdigest(), rows_bytes=len(data))
    (store_dir / MANIFEST).write_text(json.dumps(manifest))
    assert all("/a/../" in r.path for r in FeatureStore.open(store_dir).live_rows())

    summary = sync_folder(folder, store_dir, embedder=tiny_embedder, options=OPTIONS)
    assert (summary.embedded, summary.added, summary.removed, summary.unchanged, summary.store_count) == (0, 0, 0, 3, 3)
    assert sorted(r.path for r in FeatureStore.open(store_dir).live_rows()) == sorted(str(p) for p in folder.iterdir())


def test_a_failed_first_run_leaves_no_index_and_pins_no_model(image_folder, tmp_path, monkeypatch):
    folder = image_folder(3)
    index_dir = tmp_path / "index"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no-weights"))
    monkeypatch.setenv("CBIR_OFFLINE", "1")
    failed = runner.invoke(app, ["index", str(folder), "--index", str(index_dir), "--model", "resnet50",
                                 "--workers", "0"])
    assert failed.exit_code == 1 and "no pretrained weights for model 'resnet50'" in failed.stderr
    assert not index_dir.exists()  # no manifest, no folder holding only .lock

    # A later plain run picks the model afresh (here the default is made the tiny model).
    from cbir_cli import resolve

    monkeypatch.setattr(resolve, "choose_default_model", lambda: resolve.ModelChoice("test_tiny"))
    plain = runner.invoke(app, ["index", str(folder), "--index", str(index_dir), "--workers", "0", "--json"])
    assert plain.exit_code == 0, plain.output
    assert FeatureStore.open(index_dir).fingerprint["model"] == "test_tiny"


@pytest.mark.parametrize("make", ["missing", "empty"])
def test_a_bad_folder_creates_no_index(tmp_path, make):
    folder = tmp_path / "photos"
    if make == "empty":
        folder.mkdir()
    index_dir = tmp_path / "index"
    result = runner.invoke(app, ["index", str(folder), "--index", str(index_dir), "--model", "test_tiny"])
    assert result.exit_code == 1 and result.stderr.startswith("error: ") and len(result.stderr.splitlines()) == 1
    assert not index_dir.exists()


def test_the_missing_index_message_reads_right(tmp_path, image_folder):
    image = image_folder(1) / "img_000.jpg"
    result = runner.invoke(app, ["query", str(image), "--index", str(tmp_path / "nowhere")])
    assert result.exit_code == 1
    line = result.stderr.strip()
    assert line == (f"error: {tmp_path / 'nowhere'}: no index here (no manifest.json); build one with "
                    "`cbir index FOLDER`, or name an existing one with --index DIR")


def test_the_default_model_notice_never_precedes_an_unrelated_error(tmp_path, monkeypatch):
    from cbir_cli import resolve

    monkeypatch.setattr(resolve, "choose_default_model",
                        lambda: resolve.ModelChoice("test_tiny", notice="note: using another model"))
    result = runner.invoke(app, ["index", str(tmp_path / "missing"), "--index", str(tmp_path / "index")])
    assert result.exit_code == 1 and "note:" not in result.stderr
    assert result.stderr.strip().endswith("folder does not exist")


def test_library_messages_name_concepts_not_flags(tmp_path):
    """The same error, from Python and from the CLI: flags only in the CLI's wording."""
    from cbir_cli.errors import IndexNotFoundError

    with pytest.raises(IndexNotFoundError) as info:
        FeatureStore.open(tmp_path / "nowhere")
    assert "--" not in str(info.value)
    assert Path(str(info.value).split(":")[0]) == tmp_path / "nowhere"
