"""The four seams (Embedder, store write transaction, Executor, Search backend):
every implementation satisfies its protocol, the fakes drive the real pipeline and
Searcher without torch or faiss, and Faiss agrees with exact search (the oracle)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import store_of_vectors

from cbir_cli.models.descriptors import descriptor_embedder
from cbir_cli.models.protocol import Embedder
from cbir_cli.pipeline.executor import Executor
from cbir_cli.pipeline.local import LocalExecutor
from cbir_cli.pipeline.options import ExtractOptions
from cbir_cli.pipeline.sync import sync_folder
from cbir_cli.search.faiss_backend import FaissBackend
from cbir_cli.search.protocol import SearchBackend
from cbir_cli.search.searcher import Searcher
from cbir_cli.store.feature_store import FeatureStore
from tests.fakes import CountingExecutor, FakeBackend, FakeEmbedder

REPO = Path(__file__).resolve().parents[1]


def test_every_implementation_satisfies_its_protocol(tiny_embedder):
    for embedder in (tiny_embedder, descriptor_embedder("hsv"), FakeEmbedder()):
        assert isinstance(embedder, Embedder), type(embedder)
    for backend in (FaissBackend(), FakeBackend()):
        assert isinstance(backend, SearchBackend), type(backend)
    local = LocalExecutor(ExtractOptions(workers=0))
    for executor in (local, CountingExecutor(local)):
        assert isinstance(executor, Executor), type(executor)
    assert not isinstance(object(), Embedder) and not isinstance(object(), SearchBackend)


def test_pipeline_and_searcher_run_on_fakes_without_torch_or_faiss(image_folder, tmp_path):
    """Index with the fake embedder (real plan, executor, transaction, store), search
    with the fake backend: the right image comes first and neither torch nor faiss
    is ever imported."""
    folder = image_folder(6)
    code = f"""
import sys
from cbir_cli.pipeline.options import ExtractOptions
from cbir_cli.pipeline.sync import sync_folder
from cbir_cli.search.searcher import Searcher
from tests.fakes import FakeBackend, FakeEmbedder

embedder = FakeEmbedder()
summary = sync_folder({str(folder)!r}, {str(tmp_path / 'store')!r}, embedder=embedder,
                      options=ExtractOptions(workers=0, batch_size=4, shard_size=4))
assert summary.embedded == 6 and summary.store_count == 6, summary
searcher = Searcher.open({str(tmp_path / 'store')!r}, embedder=embedder, backend=FakeBackend())
hits = searcher.search_paths([{str(folder / 'img_003.jpg')!r}], k=3)[0]
assert hits[0].path.endswith("img_003.jpg") and abs(hits[0].score - 1.0) < 1e-5, hits
assert [h.id for h in searcher.search_ids([hits[1].id], k=1)[0]] == [hits[1].id]
print(",".join(m for m in ("torch", "faiss", "torchvision") if m in sys.modules) or "none")
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "none"


def test_sync_goes_through_the_executor_and_an_unchanged_folder_embeds_nothing(image_folder, tmp_path):
    folder = image_folder(5)
    embedder = FakeEmbedder()
    executor = CountingExecutor(LocalExecutor(ExtractOptions(workers=0)))
    sync_folder(folder, tmp_path / "store", embedder=embedder, executor=executor)
    assert sorted(Path(p).name for p in executor.embedded) == [f"img_{i:03d}.jpg" for i in range(5)]
    assert len(executor.hashed) == 5

    again = CountingExecutor(LocalExecutor(ExtractOptions(workers=0)))
    summary = sync_folder(folder, tmp_path / "store", embedder=embedder, executor=again)
    assert again.embedded == [] and len(again.hashed) == 5 and summary.unchanged == 5


def synthetic_store(tmp_path: Path, n: int = 1500, dim: int = 32, seed: int = 3) -> tuple[FeatureStore, np.ndarray]:
    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((6, dim)).astype(np.float32)
    x = rng.standard_normal((n, 6)).astype(np.float32) @ basis + 0.3 * rng.standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return store_of_vectors(tmp_path / "store", x), x


@pytest.mark.parametrize("index_type", ["flat", "hnsw", "ivfpq"])
def test_faiss_backend_agrees_with_exact_search_also_after_add_and_remove(tmp_path, index_type):
    store, x = synthetic_store(tmp_path)
    faiss_backend, exact = FaissBackend(), FakeBackend()
    faiss_backend.build(store, index_type, persist=False)
    exact.build(store, "flat")
    queries = x[:40] + 0.05
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)

    def agree() -> None:
        scores, ids = faiss_backend.search(queries, 10)
        truth_scores, truth = exact.search(queries, 10)
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, truth)])
        assert recall >= (1.0 if index_type == "flat" else 0.95), recall
        found = ids[:, 0] == truth[:, 0]
        # Scores are exact inner products (re-ranked for compressed indexes).
        np.testing.assert_allclose(scores[found, 0], truth_scores[found, 0], rtol=1e-4)

    agree()
    gone = exact.ids[::7]
    faiss_backend.remove(gone)
    exact.remove(gone)
    assert faiss_backend.count == exact.count == len(x) - len(gone)
    agree()
    assert not set(faiss_backend.search(queries, 50)[1].ravel()) & set(gone.tolist())

    new = np.roll(x[:30], 1, axis=1)
    new_ids = np.arange(10_000, 10_030)
    faiss_backend.add(new_ids, new)
    exact.add(new_ids, new)
    agree()
    np.testing.assert_allclose(faiss_backend.vectors(new_ids[:3]), new[:3], atol=1e-6)
    assert faiss_backend.search(new[:1], 1)[1][0, 0] == 10_000


def test_searcher_answers_the_same_through_either_backend(tmp_path):
    store, _ = synthetic_store(tmp_path, n=300)
    a = Searcher.open(store.root, backend=FakeBackend(), embedder=FakeEmbedderFor(store))
    b = Searcher.open(store.root, embedder=FakeEmbedderFor(store))
    assert a.index_type == "exact (fake)" and b.index_type.startswith("flat")
    ids = [r.id for r in a.rows[:20]]
    assert [[h.id for h in hits] for hits in a.search_ids(ids, 5)] == \
           [[h.id for h in hits] for hits in b.search_ids(ids, 5)]


class FakeEmbedderFor(FakeEmbedder):
    """A fake whose fingerprint matches a synthetic store (searches by id only)."""

    def __init__(self, store: FeatureStore) -> None:
        super().__init__()
        self._fp = store.fingerprint

    def fingerprint(self):
        return dict(self._fp)


def test_evaluate_ranks_through_the_backend_and_faiss_agrees_with_the_fake():
    from cbir_cli.evaluate.run import rank_all_vs_all

    rng = np.random.default_rng(5)
    x = rng.standard_normal((200, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    np.testing.assert_array_equal(rank_all_vs_all(x, 20), rank_all_vs_all(x, 20, backend=FakeBackend()))
