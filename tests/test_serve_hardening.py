"""`cbir serve` under attack and while its index changes (issue 10, items 9-11): a
real waitress server on a free loopback port over a tiny index."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import make_image

from cbir_cli.pipeline.options import ExtractOptions
from cbir_cli.pipeline.sync import index_folder

pytest.importorskip("waitress")
OPTIONS = ExtractOptions(workers=0)
NEWLINE_NAME = "two\nlines.jpg"
NON_UTF8_NAME = os.fsdecode(b"caf\xe9.jpg")


def start(index_dir: Path, embedder, **server_args):
    from cbir_cli.search.searcher import Searcher
    from cbir_cli.serve.http import HttpServer

    app = __import__("cbir_cli.serve.app", fromlist=["create_app"]).create_app(
        Searcher.open(index_dir, embedder=embedder), max_upload_mb=1)
    server = HttpServer(app, "127.0.0.1", 0, max_body_bytes=app.config["MAX_CONTENT_LENGTH"], **server_args)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, thread


def get(url: str, timeout: float = 30) -> tuple[int, dict, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def raw(port: int, data: bytes, timeout: float = 20) -> bytes:
    """Send ``data`` on a new connection and read until the server closes it."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
        conn.sendall(data)
        chunks = []
        try:
            while chunk := conn.recv(65536):
                chunks.append(chunk)
        except ConnectionResetError:  # closed with our unread excess in its buffer, after answering
            pass
    return b"".join(chunks)


def status_and_json(response: bytes) -> tuple[int, dict]:
    head, _, body = response.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head.lower(), head
    return int(head.split()[1]), json.loads(body)


@pytest.fixture
def served(tmp_path, tiny_embedder):
    folder, index_dir = tmp_path / "images", tmp_path / "index"
    folder.mkdir()
    for i in range(4):
        make_image(i).save(folder / f"img_{i}.jpg", quality=90)
    make_image(10).save(folder / NEWLINE_NAME, quality=90)
    make_image(11).save(folder / NON_UTF8_NAME, quality=90)
    make_image(12).save(folder / "soon_a_pipe.jpg", quality=90)
    index_folder(folder, index_dir, embedder=tiny_embedder, options=OPTIONS)
    server, thread = start(index_dir, tiny_embedder, header_timeout=1.0, body_timeout=2.0)
    yield server, folder, index_dir
    server.close()
    thread.join(10)


def ids_by_name(server) -> dict[str, int]:
    searcher = server.app.extensions["cbir"].current()
    return {Path(r.path).name: r.id for r in searcher.rows}


def test_every_error_the_server_answers_itself_is_json(served):
    server, _, _ = served
    status, body = status_and_json(raw(server.port, b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 40_000
                                       + b"\r\n\r\n"))
    assert status == 431 and "error" in body
    status, body = status_and_json(raw(server.port, b"GET /" + b"a" * 40_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"))
    assert status == 431 and "error" in body
    status, body = status_and_json(raw(server.port, b"NONSENSE\r\n\r\n"))
    assert status == 400 and "error" in body
    # An upload over the limit is refused from its headers, at once, and the
    # connection is closed: it never hangs waiting for the 100 MB.
    started = time.monotonic()
    status, body = status_and_json(raw(server.port, b"POST /api/search HTTP/1.1\r\nHost: x\r\n"
                                       b"Content-Type: multipart/form-data; boundary=b\r\n"
                                       b"Content-Length: 100000000\r\n\r\n--b\r\n"))
    assert status == 413 and "error" in body and time.monotonic() - started < 10


def test_slow_clients_are_cut_off_and_never_starve_the_others(served):
    server, _, _ = served
    slow = []
    for _ in range(50):  # slowloris: headers that never end
        conn = socket.create_connection(("127.0.0.1", server.port))
        conn.sendall(b"GET /api/health HTTP/1.1\r\nHost: x\r\n")
        slow.append(conn)
    assert get(server.url + "api/health", timeout=5)[0] == 200  # served meanwhile
    time.sleep(3.5)  # > header timeout (1 s) + the 1 s maintenance tick
    for conn in slow:
        conn.settimeout(5)
        assert conn.recv(100) == b""  # closed by the server
        conn.close()


def test_unexpected_errors_are_json_500(served, monkeypatch):
    server, _, _ = served
    searcher = server.app.extensions["cbir"].current()
    monkeypatch.setattr(searcher, "search_ids", lambda *a, **k: 1 / 0)
    status, _, body = get(server.url + "api/search?id=0")
    assert status == 500 and json.loads(body)["error"].startswith("internal error (ZeroDivisionError)")


@pytest.mark.parametrize("name", [NEWLINE_NAME, NON_UTF8_NAME])
def test_originals_with_any_file_name_are_served_with_an_rfc5987_name(served, name):
    server, folder, _ = served
    status, headers, body = get(f"{server.url}api/images/{ids_by_name(server)[name]}")
    assert status == 200 and body == (folder / name).read_bytes()
    disposition = headers["Content-Disposition"]
    assert disposition.startswith('inline; filename="') and "filename*=UTF-8''" in disposition
    assert "\n" not in disposition and disposition.isascii()


def test_a_file_replaced_by_a_pipe_is_a_prompt_404_not_a_hang(served):
    server, folder, _ = served
    image_id = ids_by_name(server)["soon_a_pipe.jpg"]
    (folder / "soon_a_pipe.jpg").unlink()
    os.mkfifo(folder / "soon_a_pipe.jpg")
    for kind in ("thumbnails", "images"):
        status, _, body = get(f"{server.url}api/{kind}/{image_id}", timeout=20)
        assert status == 404 and "not a regular file" in json.loads(body)["error"]


def test_the_server_follows_the_index_and_health_shows_the_generation(served, tiny_embedder):
    server, folder, index_dir = served
    before = json.loads(get(server.url + "api/health")[2])
    removed = ids_by_name(server)["img_0.jpg"]
    (folder / "img_0.jpg").unlink()
    make_image(30).save(folder / "new.jpg", quality=90)
    index_folder(folder, index_dir, embedder=tiny_embedder, options=OPTIONS)
    deadline = time.monotonic() + 30
    while (health := json.loads(get(server.url + "api/health")[2]))["generation"] == before["generation"]:
        assert time.monotonic() < deadline, health
        time.sleep(0.2)
    assert health["count"] == before["count"] and health["reloads"] == 1
    body = json.loads(get(f"{server.url}api/search?id={ids_by_name(server)['new.jpg']}&k=100")[2])
    assert removed not in {hit["id"] for hit in body["results"]} and body["generation"] == health["generation"]
    assert get(f"{server.url}api/search?id={removed}")[0] == 404


def test_the_server_follows_a_commit_that_wrote_no_checkpoint(served, tiny_embedder, monkeypatch):
    """A large store's run ends with log entries only (no manifest.json rewrite:
    store.committing._checkpoint_worthwhile); the server watched manifest.json alone
    and kept serving the old state."""
    from cbir_cli.store import committing

    server, folder, index_dir = served
    monkeypatch.setattr(committing, "CHECKPOINT_SMALL_BYTES", 0)
    before = json.loads(get(server.url + "api/health")[2])
    checkpoint = (index_dir / "manifest.json").read_bytes()
    make_image(31).save(folder / "newer.jpg", quality=90)
    index_folder(folder, index_dir, embedder=tiny_embedder, options=OPTIONS)
    assert (index_dir / "manifest.json").read_bytes() == checkpoint  # the log holds the commit
    deadline = time.monotonic() + 30
    while (health := json.loads(get(server.url + "api/health")[2]))["generation"] == before["generation"]:
        assert time.monotonic() < deadline, health
        time.sleep(0.2)
    assert health["count"] == before["count"] + 1
    assert "newer.jpg" in ids_by_name(server)


def test_16_clients_while_the_index_changes_see_no_error_and_no_removed_id(served, tiny_embedder):
    """The reload load test: uploads and id searches from 16 threads while images are
    added and removed twice; every answer is 200 (or 404 for an id removed
    meanwhile), and once the server shows the last generation no result is a removed id."""
    server, folder, index_dir = served
    upload = (folder / "img_1.jpg").read_bytes()
    errors: list[str] = []
    seen_ids = set(ids_by_name(server).values())
    stop = threading.Event()
    answered = [0]

    def client(n: int) -> None:
        boundary = "cbirtest"
        form = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"q.jpg\"\r\n"
                f"Content-Type: image/jpeg\r\n\r\n").encode() + upload + f"\r\n--{boundary}--\r\n".encode()
        while not stop.is_set():
            if n % 2:
                request = urllib.request.Request(server.url + "api/search", data=form, headers={
                    "Content-Type": f"multipart/form-data; boundary={boundary}"})
                try:
                    with urllib.request.urlopen(request, timeout=60) as response:
                        status = response.status
                except urllib.error.HTTPError as exc:
                    status = exc.code
                except OSError as exc:
                    errors.append(f"upload: {exc}")
                    continue
                if status != 200:
                    errors.append(f"upload: {status}")
            else:
                image_id = sorted(seen_ids)[answered[0] % len(seen_ids)]
                status, _, body = get(f"{server.url}api/search?id={image_id}&k=5", timeout=60)
                if status == 200:
                    seen_ids.update(hit["id"] for hit in json.loads(body)["results"])
                elif status != 404:
                    errors.append(f"id search: {status} {body[:200]!r}")
            answered[0] += 1

    threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(16)]
    for t in threads:
        t.start()
    removed_ids = set()
    for round_ in range(2):
        gone = f"img_{round_ + 2}.jpg"
        removed_ids.add(ids_by_name(server)[gone])
        (folder / gone).unlink()
        make_image(40 + round_).save(folder / f"added_{round_}.jpg", quality=90)
        index_folder(folder, index_dir, embedder=tiny_embedder, options=OPTIONS)
        time.sleep(1.0)
    final = json.loads((index_dir / "manifest.json").read_text())["generation"]
    deadline = time.monotonic() + 30
    while json.loads(get(server.url + "api/health")[2])["generation"] != final:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    after: set[int] = set()
    for image_id in ids_by_name(server).values():
        after.update(hit["id"] for hit in json.loads(get(f"{server.url}api/search?id={image_id}&k=100")[2])["results"])
    stop.set()
    for t in threads:
        t.join(60)
    assert errors == [] and answered[0] > 16
    assert not after & removed_ids


def test_closing_a_busy_server_from_another_thread_raises_nothing_in_its_loop(monkeypatch):
    """close() used to close the sockets under the serving thread's select():
    EBADF in that thread, now and then (a race). Many closes, each while clients
    keep connections open, must leave no exception in any serving thread."""
    import socket
    import threading

    from flask import Flask

    from cbir_cli.serve.http import HttpServer

    failures: list[BaseException] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: failures.append(args.exc_value))
    app = Flask(__name__)
    for _ in range(15):
        server = HttpServer(app, "127.0.0.1", 0)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        clients = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(5)]
        server.close()
        thread.join(timeout=10)
        for client in clients:
            client.close()
        assert not thread.is_alive()
    assert failures == []
