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


def test_embeddings_overlap_up_to_the_cores(tmp_path, image_folder, tiny_embedder, monkeypatch):
    folder = image_folder(6)
    index_folder(folder, tmp_path / "idx", embedder=tiny_embedder)
    embedder = CountingEmbedder(tiny_embedder)
    searcher = Searcher.open(tmp_path / "idx", embedder=embedder)
    monkeypatch.setattr("cbir_cli.serve.app.usable_cores", lambda: 2)
    client = create_app(searcher).test_client()
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
