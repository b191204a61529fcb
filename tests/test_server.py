"""The web API (Flask test client): every endpoint and every error answer.

One small index of synthetic images (tiny random model) is built per module; one of
its files is deleted after indexing to test an indexed-but-gone image.
"""

from __future__ import annotations

import io
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_image
from PIL import Image
from typer.testing import CliRunner

from cbir_cli.cli import app as cli_app
from cbir_cli.errors import CbirError
from cbir_cli.serve.app import MAX_K, ThumbnailCache, create_app

pytest.importorskip("flask")

N_IMAGES = 6
GONE = "zz_gone.jpg"


def build_index(folder: Path, index_dir: Path, embedder, n: int, big: bool = False) -> None:
    """Index ``n`` synthetic JPEGs (img_000.jpg ...) in ``folder`` with the tiny model;
    ``big`` makes img_000 600x400 so its thumbnail has to be scaled down."""
    from cbir_cli.pipeline.options import ExtractOptions
    from cbir_cli.pipeline.sync import index_folder

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        make_image(i, size=(600, 400) if big and i == 0 else (160, 120)).save(folder / f"img_{i:03d}.jpg", quality=90)
    index_folder(folder, index_dir, options=ExtractOptions(workers=0), embedder=embedder)


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, tiny_embedder):
    """(images folder, index dir, id of the deleted file)."""
    from cbir_cli.search.searcher import Searcher

    root = tmp_path_factory.mktemp("served")
    folder, index_dir = root / "images", root / "index"
    folder.mkdir()
    make_image(99).save(folder / GONE, quality=90)
    build_index(folder, index_dir, tiny_embedder, N_IMAGES, big=True)
    gone_id = next(r.id for r in Searcher.open(index_dir, embedder=tiny_embedder).rows if r.path.endswith(GONE))
    (folder / GONE).unlink()
    return folder, index_dir, gone_id


@pytest.fixture(scope="module")
def searcher(indexed, tiny_embedder):
    from cbir_cli.search.searcher import Searcher

    return Searcher.open(indexed[1], embedder=tiny_embedder)


@pytest.fixture(scope="module")
def client(searcher):
    return create_app(searcher).test_client()


def id_of(searcher, name: str) -> int:
    return next(r.id for r in searcher.rows if Path(r.path).name == name)


def upload(client, data: bytes, name: str = "query.jpg", k: str | None = "3"):
    form = {"image": (io.BytesIO(data), name)}
    if k is not None:
        form["k"] = k
    return client.post("/api/search", data=form, content_type="multipart/form-data")


def assert_error(response, status: int, *fragments: str) -> str:
    assert response.status_code == status, response.data
    assert response.is_json, response.data
    message = response.get_json()["error"]
    for fragment in fragments:
        assert fragment in message
    return message


# ----------------------------------------------------------------- endpoints

def test_health_reports_model_count_and_index_type(client, indexed):
    info = client.get("/api/health").get_json()
    assert info["status"] == "ok"
    assert info["model"] == "test_tiny" and info["count"] == N_IMAGES + 1
    assert info["index_type"] == "flat" and info["dim"] > 0
    # The page's header, in a user's words (this searcher is opened without re-ranking).
    assert info["summary"] == f"{N_IMAGES + 1} images · test_tiny · exact search, not re-ranked"
    assert info["max_k"] == MAX_K and info["index"] == str(indexed[1])


def test_upload_finds_the_same_image_first(client, indexed, searcher):
    folder = indexed[0]
    response = upload(client, (folder / "img_003.jpg").read_bytes(), "img_003.jpg", k="3")
    assert response.status_code == 200
    body = response.get_json()
    assert body["k"] == 3 and body["query"] == {"name": "img_003.jpg"}
    hits = body["results"]
    assert [h["rank"] for h in hits] == [1, 2, 3]
    top = hits[0]
    assert top["name"] == "img_003.jpg" and top["id"] == id_of(searcher, "img_003.jpg")
    assert top["score"] == pytest.approx(1.0, abs=1e-4)
    assert top["image_url"] == f"/api/images/{top['id']}" and top["thumbnail_url"] == f"/api/thumbnails/{top['id']}"
    scores = [h["score"] for h in hits]
    assert scores == sorted(scores, reverse=True) and scores[1] < 0.9999


def test_upload_without_k_uses_the_default_capped_by_the_index_size(client, indexed):
    response = upload(client, (indexed[0] / "img_001.jpg").read_bytes(), k=None)
    assert response.status_code == 200
    body = response.get_json()
    assert body["k"] == 10 and len(body["results"]) == N_IMAGES + 1  # every image, each once
    assert len({h["id"] for h in body["results"]}) == N_IMAGES + 1


def test_png_upload_of_a_re_encoded_image_still_ranks_its_original_first(client, indexed):
    img = Image.open(indexed[0] / "img_004.jpg").convert("RGBA")
    buf = io.BytesIO()
    img.resize((120, 90)).save(buf, format="PNG")
    top = upload(client, buf.getvalue(), "edited.png").get_json()["results"][0]
    assert top["name"] == "img_004.jpg"


def test_search_by_id_matches_the_library(client, searcher):
    image_id = id_of(searcher, "img_002.jpg")
    body = client.get(f"/api/search?id={image_id}&k=4").get_json()
    assert body["query"] == {"id": image_id, "name": "img_002.jpg"}
    expected = searcher.search_ids([image_id], 4)[0]
    assert [h["id"] for h in body["results"]] == [h.id for h in expected]
    assert body["results"][0]["id"] == image_id


def test_original_image_is_the_indexed_file_byte_for_byte(client, indexed, searcher):
    response = client.get(f"/api/images/{id_of(searcher, 'img_001.jpg')}")
    assert response.status_code == 200 and response.mimetype == "image/jpeg"
    assert response.data == (indexed[0] / "img_001.jpg").read_bytes()
    assert response.headers["X-Content-Type-Options"] == "nosniff"


def test_thumbnail_is_a_small_jpeg_and_is_cached(searcher, monkeypatch):
    app = create_app(searcher)
    client = app.test_client()
    calls = []
    import cbir_cli.serve.files as server

    real = server.make_thumbnail
    monkeypatch.setattr(server, "make_thumbnail", lambda *a, **kw: calls.append(a) or real(*a, **kw))
    big_id = id_of(searcher, "img_000.jpg")  # 600x400
    first = client.get(f"/api/thumbnails/{big_id}")
    assert first.status_code == 200 and first.mimetype == "image/jpeg"
    thumb = Image.open(io.BytesIO(first.data))
    assert thumb.format == "JPEG" and thumb.size == (256, 171)
    second = client.get(f"/api/thumbnails/{big_id}")
    assert second.data == first.data and len(calls) == 1
    small = Image.open(io.BytesIO(client.get(f"/api/thumbnails/{id_of(searcher, 'img_001.jpg')}").data))
    assert small.size == (160, 120)  # never enlarged


def test_thumbnail_cache_evicts_the_least_recently_used(indexed, monkeypatch):
    import cbir_cli.serve.files as server

    made = []
    monkeypatch.setattr(server, "make_thumbnail",
                        lambda path, size=256, budget=None: made.append(str(path)) or str(path).encode())
    cache = ThumbnailCache(capacity=2)
    a, b, c = (indexed[0] / f"img_00{i}.jpg" for i in range(3))
    cache.get((0, "a"), a)
    cache.get((1, "b"), b)
    cache.get((0, "a"), a)  # a is now the most recent
    cache.get((2, "c"), c)  # evicts b
    assert len(cache) == 2
    cache.get((0, "a"), a)
    cache.get((1, "b"), b)
    assert made == [str(a), str(b), str(c), str(b)]


def test_page_and_its_assets_are_served(client):
    page = client.get("/")
    assert page.status_code == 200 and page.mimetype == "text/html"
    html = page.get_data(as_text=True)
    assert "/static/app.js" in html and 'id="results"' in html and 'type="file"' in html
    script = client.get("/static/app.js")
    assert script.status_code == 200 and "/api/search" in script.get_data(as_text=True)
    assert client.get("/static/style.css").status_code == 200


# ----------------------------------------------------------------- errors

def test_upload_too_large_is_413_json(searcher):
    client = create_app(searcher, max_upload_mb=0.01).test_client()
    response = upload(client, b"\xff" * 20_000)
    assert_error(response, 413, "too large", "0.01 MB")


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"this is plain text, not a picture", "not a recognised image format"),
        (b"", "empty file"),
    ],
)
def test_non_image_upload_is_400_with_the_reason(client, data, reason):
    assert_error(upload(client, data, "notes.jpg"), 400, "notes.jpg", reason)


def test_truncated_jpeg_upload_is_400_cannot_decode(client, indexed):
    data = (indexed[0] / "img_002.jpg").read_bytes()
    assert_error(upload(client, data[: len(data) // 3], "cut.jpg"), 400, "cut.jpg")


def test_upload_without_the_image_field_is_400(client):
    response = client.post("/api/search", data={"k": "3"}, content_type="multipart/form-data")
    assert_error(response, 400, "'image'")


@pytest.mark.parametrize("k", ["0", "-1", str(MAX_K + 1), "abc", "2.5"])
def test_bad_k_is_400_for_both_kinds_of_search(client, indexed, searcher, k):
    data = (indexed[0] / "img_001.jpg").read_bytes()
    assert_error(upload(client, data, k=k), 400, "k must be")
    assert_error(client.get(f"/api/search?id={id_of(searcher, 'img_001.jpg')}&k={k}"), 400, "k must be")


@pytest.mark.parametrize(("query", "fragment"), [("", "missing query parameter 'id'"), ("?id=x1", "integer")])
def test_search_by_id_without_a_valid_id_is_400(client, query, fragment):
    assert_error(client.get(f"/api/search{query}"), 400, fragment)


@pytest.mark.parametrize("url", ["/api/search?id=12345", "/api/images/12345", "/api/thumbnails/12345"])
def test_unknown_id_is_404(client, url):
    assert_error(client.get(url), 404, "no image with id 12345")


@pytest.mark.parametrize("kind", ["images", "thumbnails"])
def test_indexed_file_deleted_from_disk_is_404(client, indexed, kind):
    assert_error(client.get(f"/api/{kind}/{indexed[2]}"), 404, f"image {indexed[2]} is in the index")


@pytest.mark.parametrize(
    "url",
    [
        "/api/images/-1",
        "/api/images/..%2F..%2Fetc%2Fpasswd",
        "/api/images/../../etc/passwd",
        "/api/thumbnails/1.jpg",
        "/static/../server.py",
        "/static/..%2Fserver.py",
        "/static/",
        "/api/",
        "/nope",
    ],
)
def test_paths_ids_cannot_name_and_unknown_routes_are_404_json(client, url):
    response = client.get(url)
    assert_error(response, 404, "not found")
    assert b"def create_app" not in response.data and b"root:" not in response.data


@pytest.mark.parametrize(("method", "url"), [("delete", "/api/search"), ("post", "/api/health"),
                                              ("put", "/api/images/0"), ("post", "/")])
def test_wrong_method_is_405_json(client, method, url):
    assert_error(getattr(client, method)(url), 405, f"method {method.upper()} not allowed")


def test_options_is_405_json_with_allow_not_an_empty_200(client):
    for url, allowed in [("/api/search", {"GET", "HEAD", "POST"}), ("/api/images/0", {"GET", "HEAD"}),
                         ("/static/app.js", {"GET", "HEAD"}), ("/", {"GET", "HEAD"})]:
        response = client.options(url)
        assert_error(response, 405, "method OPTIONS not allowed")
        assert set(response.headers["Allow"].split(", ")) == allowed
    assert "POST" in client.delete("/api/search").headers["Allow"]  # every 405 says what is allowed


def test_a_form_of_50000_parts_is_refused_for_its_parts_not_its_size(client):
    """3.4 MB (under the 20 MB limit) in 50,000 tiny fields: Werkzeug's form-parts limit."""
    body = b"".join(b"--b\r\nContent-Disposition: form-data; name=\"f\"\r\n\r\nxxxxxxxxxxxxxxxxxx\r\n"
                    for _ in range(50_000)) + b"--b--\r\n"
    assert 3_000_000 < len(body) < 4_000_000
    response = client.post("/api/search", data=body, content_type="multipart/form-data; boundary=b")
    message = assert_error(response, 413, "too many parts", "limit 1000")
    assert "MB" not in message


def test_a_form_field_over_werkzeugs_limit_is_named_as_such(client):
    response = client.post("/api/search", data={"k": "3", "box": "1" * 600_000, "image": (io.BytesIO(b"x"), "q.jpg")},
                           content_type="multipart/form-data")
    assert_error(response, 413, "form field", "500 KB")


def test_create_app_on_a_missing_index_is_a_domain_error(tmp_path):
    with pytest.raises(CbirError, match="no index here"):
        create_app(index_dir=tmp_path / "none")


def test_importing_the_server_does_not_import_flask():
    code = "import sys, cbir_cli.serve.app, cbir_cli.cli; print('flask' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


# ----------------------------------------------------------------- cbir serve

def test_serve_on_a_busy_port_is_a_one_line_error(indexed):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = CliRunner().invoke(cli_app, ["serve", "--index", str(indexed[1]), "--port", str(port),
                                              "--device", "cpu"])
    assert result.exit_code != 0
    assert f"error: cannot listen on 127.0.0.1:{port}" in result.output
    assert "Traceback" not in result.output


def test_serve_without_an_index_is_a_one_line_error(tmp_path):
    result = CliRunner().invoke(cli_app, ["serve", "--index", str(tmp_path / "none"), "--port", "0"])
    assert result.exit_code != 0 and "error:" in result.output and "no index here" in result.output
    assert "Traceback" not in result.output
