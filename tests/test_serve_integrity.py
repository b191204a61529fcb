"""`cbir serve` only sends a file that is still the image that was indexed (issue
20, item 1): an indexed file swapped for a symlink to a file outside the indexed
folder, or overwritten, is refused (404 / 410, naming no path) for originals,
thumbnails and region searches by id; an untouched file is served and checked
without hashing it again on every request."""

from __future__ import annotations

import io
import os
import shutil
import time
from pathlib import Path

import pytest
from conftest import make_image

from cbir_cli.pipeline.options import ExtractOptions
from cbir_cli.pipeline.statcache import STAT_CACHE
from cbir_cli.pipeline.sync import index_folder

pytest.importorskip("flask")
SECRET = b"root:x:0:0:root:/root:/bin/bash\n"


def indexed_app(tmp_path: Path, embedder, names: list[str]):
    """``names`` (relative paths, seeded images) indexed in tmp_path/images: (app,
    folder, index dir, searcher)."""
    from cbir_cli.search.searcher import Searcher
    from cbir_cli.serve.app import create_app

    folder, index_dir = tmp_path / "images", tmp_path / "index"
    for seed, name in enumerate(names):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        make_image(seed).save(folder / name, quality=90)
    index_folder(folder, index_dir, embedder=embedder, options=ExtractOptions(workers=0))
    searcher = Searcher.open(index_dir, embedder=embedder)
    return create_app(searcher), folder, index_dir, searcher


@pytest.fixture
def served(tmp_path, tiny_embedder):
    """(Flask test client, images folder, index dir, {name: id}, a file outside)."""
    app, folder, index_dir, searcher = indexed_app(tmp_path, tiny_embedder, [f"img_{i}.jpg" for i in range(4)])
    outside = tmp_path / "passwd"
    outside.write_bytes(SECRET)
    return app.test_client(), folder, index_dir, {Path(r.path).name: r.id for r in searcher.rows}, outside


def assert_refused(response, status: int, *fragments: str) -> None:
    assert response.status_code == status, response.data
    assert response.is_json, response.data
    message = response.get_json()["error"]
    assert SECRET not in response.data and "/" not in message, message
    for fragment in fragments:
        assert fragment in message


def urls(image_id: int) -> list[str]:
    return [f"/api/images/{image_id}", f"/api/thumbnails/{image_id}", f"/api/search?id={image_id}&box=0,0,0.5,0.5"]


def test_an_untouched_file_is_served_byte_for_byte(served):
    client, folder, _, ids, _ = served
    response = client.get(f"/api/images/{ids['img_1.jpg']}")
    assert response.status_code == 200 and response.data == (folder / "img_1.jpg").read_bytes()
    assert client.get(f"/api/thumbnails/{ids['img_1.jpg']}").status_code == 200
    assert client.get(f"/api/search?id={ids['img_1.jpg']}&box=0,0,0.5,0.5").status_code == 200


def test_a_file_swapped_for_a_symlink_to_a_file_outside_is_never_served(served):
    client, folder, _, ids, outside = served
    (folder / "img_2.jpg").unlink()
    (folder / "img_2.jpg").symlink_to(outside)
    for url in urls(ids["img_2.jpg"]):
        assert_refused(client.get(url), 404, f"image {ids['img_2.jpg']}", "outside the indexed folder")


def test_a_symlink_outside_to_an_identical_copy_is_still_refused(served, tmp_path):
    client, folder, _, ids, _ = served
    copy = tmp_path / "copy.jpg"
    shutil.copyfile(folder / "img_2.jpg", copy)
    (folder / "img_2.jpg").unlink()
    (folder / "img_2.jpg").symlink_to(copy)
    assert_refused(client.get(f"/api/images/{ids['img_2.jpg']}"), 404, "outside the indexed folder")


def test_a_folder_swapped_for_a_symlink_leading_outside_is_refused(tmp_path, tiny_embedder):
    app, folder, _, searcher = indexed_app(tmp_path, tiny_embedder, ["top.jpg", "sub/x.jpg"])
    image_id = next(r.id for r in searcher.rows if r.path.endswith("x.jpg"))
    elsewhere = tmp_path / "elsewhere"
    (folder / "sub").rename(elsewhere)  # the very same bytes, now outside
    (folder / "sub").symlink_to(elsewhere)
    assert_refused(app.test_client().get(f"/api/images/{image_id}"), 404, "outside")


@pytest.mark.parametrize("same_size", [False, True])
def test_a_file_overwritten_with_other_bytes_is_410(served, same_size):
    client, folder, _, ids, _ = served
    target = folder / "img_3.jpg"
    original = target.read_bytes()
    other = (folder / "img_0.jpg").read_bytes()
    # Same size: the stat fast path cannot tell, the content hash must.
    target.write_bytes((other + b"\0" * len(original))[:len(original)] if same_size else other)
    for url in urls(ids["img_3.jpg"]):
        assert_refused(client.get(url), 410, f"image {ids['img_3.jpg']} changed since it was indexed")


def test_a_thumbnail_made_before_the_swap_is_not_served_after_it(served):
    client, folder, _, ids, outside = served
    image_id = ids["img_1.jpg"]
    assert client.get(f"/api/thumbnails/{image_id}").status_code == 200  # cached now
    (folder / "img_1.jpg").unlink()
    (folder / "img_1.jpg").symlink_to(outside)
    assert_refused(client.get(f"/api/thumbnails/{image_id}"), 404)


def test_an_unchanged_file_is_checked_by_the_stat_cache_or_hashed_once(served, tiny_embedder):
    from cbir_cli.search.searcher import Searcher
    from cbir_cli.serve.app import create_app

    _, folder, index_dir, ids, _ = served
    old = time.time() - 60  # not "racily clean": stamps and verdicts may be remembered
    for path in folder.iterdir():
        os.utime(path, (old, old))
    index_folder(folder, index_dir, embedder=tiny_embedder, options=ExtractOptions(workers=0))
    assert (index_dir / STAT_CACHE).exists()
    app = create_app(Searcher.open(index_dir, embedder=tiny_embedder))
    client, checker = app.test_client(), app.extensions["cbir-files"]
    # The stat cache written by `cbir index` spares reading the file at all.
    assert client.get(f"/api/images/{ids['img_1.jpg']}").status_code == 200 and checker.hashed == 0
    (index_dir / STAT_CACHE).unlink()
    for _ in range(3):
        response = client.get(f"/api/images/{ids['img_0.jpg']}")
        assert response.status_code == 200 and response.data == (folder / "img_0.jpg").read_bytes()
    assert checker.hashed == 1
    # A same-size overwrite changes the stamp: checked again, refused.
    data = (folder / "img_0.jpg").read_bytes()
    (folder / "img_0.jpg").write_bytes(data[:-2] + b"\0\0")
    assert client.get(f"/api/images/{ids['img_0.jpg']}").status_code == 410 and checker.hashed == 2


def test_the_served_bytes_come_from_the_checked_descriptor(served, monkeypatch):
    """A swap right after the check cannot change what is sent: the path is never opened again."""
    import cbir_cli.serve.app as server

    client, folder, _, ids, outside = served
    real_open = server.IndexedFiles.open

    def open_then_swap(self, searcher, row):
        fh = real_open(self, searcher, row)
        os.unlink(row.path)
        os.symlink(outside, row.path)
        return fh

    monkeypatch.setattr(server.IndexedFiles, "open", open_then_swap)
    expected = (folder / "img_2.jpg").read_bytes()
    response = client.get(f"/api/images/{ids['img_2.jpg']}")
    assert response.status_code == 200 and response.data == expected
    thumb = client.get(f"/api/thumbnails/{ids['img_3.jpg']}")
    from PIL import Image

    assert thumb.status_code == 200 and Image.open(io.BytesIO(thumb.data)).format == "JPEG"


def test_a_name_that_is_not_utf8_is_given_losslessly_beside_its_display_form(tmp_path, tiny_embedder):
    """Issue 20, item 7: byte 0xff showed as U+FFFD in `path` and in filename*, nothing more."""
    from urllib.parse import unquote_to_bytes

    app, folder, _, searcher = indexed_app(tmp_path, tiny_embedder, [os.fsdecode(b"caf\xff.jpg"), "plain.jpg"])
    odd, client = folder / os.fsdecode(b"caf\xff.jpg"), app.test_client()
    odd_id = next(r.id for r in searcher.rows if r.path == str(odd))
    results = client.get(f"/api/search?id={odd_id}&k=2").get_json()["results"]
    hit = next(h for h in results if h["id"] == odd_id)
    assert hit["name"] == "caf\ufffd.jpg" and unquote_to_bytes(hit["path_bytes"]) == os.fsencode(odd)
    assert all("path_bytes" not in h for h in results if h["id"] != odd_id)
    response = client.get(f"/api/images/{odd_id}")
    assert response.status_code == 200 and response.data == odd.read_bytes()
    assert response.headers["Content-Disposition"].isascii()
    assert unquote_to_bytes(response.headers["X-Filename-Bytes"]) == b"caf\xff.jpg"
