"""Concurrent web searches (issue 22, item 9): the model runs outside the search
lock, so two clients' embeddings overlap, and never more at once than the cores."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

from cbir_cli.pipeline.sync import index_folder
from cbir_cli.search.searcher import Searcher
from cbir_cli.serve.app import create_app


class CountingEmbedder:
    """The tiny model, counting how many embeddings run at once; once armed, the
    first two wait for each other (they can only meet if both run at once)."""

    def __init__(self, inner) -> None:
        self.inner, self.armed, self.entered, self.in_flight, self.most = inner, False, 0, 0, 0
        self.meet, self.lock = threading.Barrier(2, timeout=20), threading.Lock()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def embed(self, batch):
        with self.lock:
            self.in_flight += 1
            self.most = max(self.most, self.in_flight)
            self.entered += 1
            first_two = self.armed and self.entered <= 2
        try:
            if first_two:
                self.meet.wait()
            time.sleep(0.05)
            return self.inner.embed(batch)
        finally:
            with self.lock:
                self.in_flight -= 1


def serve_on_two_cores(tmp_path, image_folder, tiny_embedder, embedder, monkeypatch):
    """6 images indexed with the tiny model, served with ``embedder`` on a 2-core machine."""
    folder = image_folder(6)
    index_folder(folder, tmp_path / "idx", embedder=tiny_embedder)
    monkeypatch.setattr("cbir_cli.serve.app.usable_cores", lambda: 2)
    return folder, create_app(Searcher.open(tmp_path / "idx", embedder=embedder)).test_client()


def test_embeddings_overlap_up_to_the_cores(tmp_path, image_folder, tiny_embedder, monkeypatch):
    embedder = CountingEmbedder(tiny_embedder)
    folder, client = serve_on_two_cores(tmp_path, image_folder, tiny_embedder, embedder, monkeypatch)
    embedder.armed, embedder.entered, embedder.most = True, 0, 0
    photos = sorted(folder.iterdir())

    def search(path):
        with open(path, "rb") as fh:
            answer = client.post("/api/search", data={"image": (fh, path.name), "k": "1"})
        return answer.status_code, answer.get_json()

    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(search, photos))
    assert [status for status, _ in answers] == [200] * 6, answers
    assert [body["results"][0]["path"] for _, body in answers] == [str(p) for p in photos]
    assert embedder.most == 2  # two at once (outside the lock), never more than the cores


class ThreadedFake:
    """An embedder whose sessions can be re-opened with fewer threads; records which
    session ran each embedding and how many ran at once."""

    def __init__(self, inner, threads: int = 2, log=None) -> None:
        self.inner, self.threads = inner, threads
        self.log = log if log is not None else {"runs": [], "in_flight": 0, "most": 0, "lock": threading.Lock()}
        self.gate = threading.Event()
        self.gate.set()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def with_threads(self, threads: int) -> ThreadedFake:
        sibling = ThreadedFake(self.inner, threads, self.log)
        sibling.gate = self.gate
        return sibling

    def embed(self, batch):
        log = self.log
        with log["lock"]:
            log["in_flight"] += 1
            log["most"] = max(log["most"], log["in_flight"])
            log["runs"].append((id(self), self.threads))
        try:
            self.gate.wait(20)
            return self.inner.embed(batch)
        finally:
            with log["lock"]:
                log["in_flight"] -= 1


def test_a_lone_query_uses_every_thread_and_concurrent_ones_one_each(tmp_path, image_folder, tiny_embedder,
                                                                       monkeypatch):
    embedder = ThreadedFake(tiny_embedder)
    folder, client = serve_on_two_cores(tmp_path, image_folder, tiny_embedder, embedder, monkeypatch)
    photos = sorted(folder.iterdir())

    def search(path):
        with open(path, "rb") as fh:
            answer = client.post("/api/search", data={"image": (fh, path.name), "k": "1"})
        return answer.status_code, answer.get_json()["results"][0]["path"]

    embedder.log["runs"].clear()
    assert search(photos[0]) == (200, str(photos[0]))
    assert embedder.log["runs"] == [(id(embedder), 2)]  # alone: the model's own all-core session

    embedder.log["runs"].clear()
    embedder.log["most"] = 0
    embedder.gate.clear()  # hold the first runs so that the others queue behind them
    with ThreadPoolExecutor(6) as pool:
        answers = pool.map(search, photos)
        deadline = time.monotonic() + 20
        while embedder.log["in_flight"] < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        held = list(embedder.log["runs"])
        embedder.gate.set()
        assert list(answers) == [(200, str(p)) for p in photos]
    # The first held run started alone (the all-core session), the second beside it (1 thread).
    assert sorted(threads for _, threads in held) == [1, 2]
    assert embedder.log["most"] == 2  # never more at once than the cores
    singles = {session for session, threads in embedder.log["runs"] if threads == 1}
    assert 1 <= len(singles) <= 2 and id(embedder) not in singles  # at most one 1-thread session per core


def test_slots_drop_the_sessions_of_a_replaced_model():
    from cbir_cli.serve.embedding import EmbeddingSlots

    first, second = ThreadedFake(None), ThreadedFake(None)
    slots = EmbeddingSlots(2)
    slots.prepare(first, lambda model: None)
    with slots.slot(first) as a, slots.slot(first) as b:
        assert a is first and b is not first and b.threads == 1
    with slots.slot(second) as c, slots.slot(second) as d:  # the index was reloaded onto another model
        assert c is second and d.inner is None and d is not b and d.threads == 1


def test_an_onnx_model_reopened_with_one_thread_gives_the_same_vectors(tiny_embedder, tmp_path):
    import numpy as np
    from conftest import make_image

    from cbir_cli.models.onnx_embedder import OnnxEmbedder
    from cbir_cli.models.protocol import embed_images

    model = OnnxEmbedder.from_torch(tiny_embedder, cache_dir=tmp_path, threads=2)
    single = model.with_threads(1)
    assert single.session is not model.session and (single.threads, model.threads) == (1, 2)
    assert single.session.get_session_options().intra_op_num_threads == 1
    images = [make_image(i) for i in range(3)]
    np.testing.assert_allclose(embed_images(single, images), embed_images(model, images), atol=1e-5)
    assert single.fingerprint() == model.fingerprint()
