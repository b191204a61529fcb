"""An index knows its roots (the folders ``cbir index`` was given): ``cbir status``
lists them with their counts, ``cbir forget PATH`` drops a root or a folder inside
one in one commit (files untouched), and "inside the indexed folder" checks use
the real roots (issue 22 item 2)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import REPO, make_image
from typer.testing import CliRunner

from cbir_cli.cli import app

runner = CliRunner()


def invoke(*args: str, code: int = 0):
    result = runner.invoke(app, list(args))
    assert result.exit_code == code, result.output
    return result


def index(folder: Path, index_dir: Path) -> None:
    invoke("index", str(folder), "--index", str(index_dir), "--model", "test_tiny", "--workers", "0")


def images(folder: Path, n: int, seed0: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        make_image(seed0 + i).save(folder / f"img_{seed0 + i:03d}.jpg", quality=90)
    return folder


@pytest.fixture
def two_roots(tmp_path: Path) -> tuple[Path, Path, Path]:
    """work/photos (5 images, 2 of them in work/photos/old) and samples (3), both
    indexed into one index: (photos, samples, index)."""
    photos = images(tmp_path / "work" / "photos", 3, 0)
    images(photos / "old", 2, 3)
    samples = images(tmp_path / "samples", 3, 10)
    index_dir = tmp_path / "index"
    index(photos, index_dir)
    index(samples, index_dir)
    return photos.resolve(), samples.resolve(), index_dir


def status(index_dir: Path) -> dict:
    return json.loads(invoke("status", "--index", str(index_dir), "--json").stdout)


def query_paths(index_dir: Path, image: Path) -> list[str]:
    out = json.loads(invoke("query", str(image), "--index", str(index_dir), "-k", "20", "--json").stdout)
    return [hit["path"] for hit in out[0]["results"]]


def test_status_lists_every_indexed_folder_with_its_count(two_roots):
    photos, samples, index_dir = two_roots
    index(photos / "old", index_dir)  # a folder inside a root adds no root
    got = status(index_dir)
    assert {r["path"]: r["images"] for r in got["roots"]} == {str(photos): 5, str(samples): 3}
    assert got["count"] == 8 and got["model"] == "test_tiny" and not got["roots_derived"]
    assert got["bytes"] > 0 and got["updated"] is not None
    text = invoke("status", "--index", str(index_dir)).output
    assert str(photos) in text and str(samples) in text and "8 images" in text and "test_tiny" in text
    # A folder above both roots takes their place.
    index(photos.parent.parent, index_dir)
    assert [r["path"] for r in status(index_dir)["roots"]] == [str(photos.parent.parent)]


def test_forget_a_root_drops_its_images_and_keeps_the_others(two_roots):
    photos, samples, index_dir = two_roots
    out = invoke("forget", str(photos), "--index", str(index_dir))
    assert "forgot 5 images" in out.output
    assert all((photos / f"img_{i:03d}.jpg").is_file() for i in range(3))  # files untouched
    hits = query_paths(index_dir, photos / "img_000.jpg")
    assert sorted(hits) == sorted(str(p) for p in samples.glob("*.jpg"))
    got = status(index_dir)
    assert {r["path"]: r["images"] for r in got["roots"]} == {str(samples): 3} and got["count"] == 3
    check = json.loads(invoke("check", "--index", str(index_dir), "--json").stdout)
    assert check["ok"] and check["search_index"] == "current", check
    again = invoke("forget", str(photos), "--index", str(index_dir), code=1)
    assert len(again.output.strip().splitlines()) == 1 and "not inside any folder of the index" in again.output
    assert status(index_dir)["generation"] == got["generation"]  # nothing written


def test_forget_a_folder_inside_a_root_keeps_the_root(two_roots):
    photos, samples, index_dir = two_roots
    invoke("forget", str(photos / "old"), "--index", str(index_dir))
    got = status(index_dir)
    assert {r["path"]: r["images"] for r in got["roots"]} == {str(photos): 3, str(samples): 3}
    assert not any("/old/" in p for p in query_paths(index_dir, photos / "img_000.jpg"))
    again = invoke("forget", str(photos / "old"), "--index", str(index_dir))
    assert "nothing indexed below" in again.output and len(again.output.strip().splitlines()) == 1
    outside = invoke("forget", str(photos.parent.parent.parent / "elsewhere"), "--index", str(index_dir), code=1)
    assert "not inside any folder of the index" in outside.output and "Traceback" not in outside.output


def test_dedup_move_to_a_sibling_of_the_roots_is_accepted(two_roots):
    photos, _samples, index_dir = two_roots
    dups = photos.parent / "dups"  # inside work, which was never indexed
    out = invoke("dedup", "--index", str(index_dir), "--threshold", "0.9999", "--move-to", str(dups))
    assert "outside the indexed folder" not in out.output
    inside = invoke("dedup", "--index", str(index_dir), "--move-to", str(photos / "dups"), code=1)
    assert "outside the indexed folder" in inside.output and str(photos) in inside.output


def test_quick_start_samples_can_be_forgotten(tmp_path):
    """Index the README's examples/images, then one's own folder, then forget the samples."""
    samples = REPO / "examples" / "images"
    if not samples.is_dir():
        pytest.skip("examples/images not in this checkout")
    index_dir = tmp_path / "index"
    index(samples, index_dir)
    mine = images(tmp_path / "photos", 4, 20)
    index(mine, index_dir)
    assert len(status(index_dir)["roots"]) == 2
    invoke("forget", str(samples), "--index", str(index_dir))
    got = status(index_dir)
    assert [(r["path"], r["images"]) for r in got["roots"]] == [(str(mine.resolve()), 4)] and got["count"] == 4
    assert all(p.startswith(str(mine.resolve())) for p in query_paths(index_dir, mine / "img_020.jpg"))


def test_an_index_without_recorded_roots_derives_them_once(two_roots, tmp_path_factory):
    photos, _samples, index_dir = two_roots
    manifest = json.loads((index_dir / "manifest.json").read_text())
    del manifest["roots"]  # as made by an older cbir
    (index_dir / "manifest.json").write_text(json.dumps(manifest))
    shutil.rmtree(index_dir / "log", ignore_errors=True)
    got = runner.invoke(app, ["status", "--index", str(index_dir), "--json"])
    assert json.loads(got.stdout)["roots"] == [{"path": str(photos.parent.parent), "images": 8}]
    assert json.loads(got.stdout)["roots_derived"]
    text = invoke("status", "--index", str(index_dir)).output
    assert "recorded no folders" in text
    more = images(tmp_path_factory.mktemp("more"), 2, 30)  # outside the derived root
    out = invoke("index", str(more), "--index", str(index_dir), "--model", "test_tiny", "--workers", "0")
    assert "recorded no indexed folders" in out.output
    roots = status(index_dir)
    assert sorted(r["path"] for r in roots["roots"]) == sorted([str(more.resolve()), str(photos.parent.parent)])
    assert not roots["roots_derived"]


def test_roots_helpers_keep_urls_and_never_nest():
    from cbir_cli.store.roots import count_by_root, derived_roots, with_root, without

    assert derived_roots(["s3://b/p/a/1.jpg", "s3://b/p/c/2.jpg"]) == ["s3://b/p"]
    assert derived_roots(["/a/b/1.jpg", "/a/bc/2.jpg"]) == ["/a"] and derived_roots([]) == []
    roots = with_root(with_root([], "/x/photos"), "s3://b/p")
    assert with_root(roots, "/x/photos/old") == roots  # already covered
    assert with_root(roots, "/x") == ["/x", "s3://b/p"]  # folds the root below it in
    assert without(["/x/photos", "/x/photosets"], "/x/photos") == ["/x/photosets"]
    assert count_by_root(roots, ["/x/photos/1.jpg", "s3://b/p/q/2.jpg", "/y/3.jpg"]) == {"/x/photos": 1,
                                                                                       "s3://b/p": 1}


def test_roots_are_committed_through_the_log(tmp_path):
    """A change of roots is a log entry (O(change)), replayed on open; a bad value is refused."""
    import numpy as np
    from conftest import store_of_vectors

    from cbir_cli.store.commit_log import read_state
    from cbir_cli.store.feature_store import FeatureStore

    store_of_vectors(tmp_path / "s", np.eye(4, dtype=np.float32))
    store = FeatureStore.open(tmp_path / "s")
    store.manifest["roots"] = ["/img"]
    assert store.commit()
    entry = json.loads(next((tmp_path / "s" / "log").glob("*.json")).read_text())
    assert entry["set"]["roots"] == ["/img"] and entry["shards"] == []
    assert read_state(tmp_path / "s")[0]["roots"] == ["/img"]
    assert not store.commit()  # unchanged: nothing written
    entry["generation"] += 1
    entry["set"]["roots"] = [3]
    (tmp_path / "s" / "log" / f"{entry['generation']:020d}.json").write_text(json.dumps(entry))
    state, _, ignored = read_state(tmp_path / "s")
    assert state["roots"] == ["/img"] and "roots is not a list" in ignored[0]
