"""Re-ranking (alpha-QE, DBA, the pinned raw top-1) against a naive numpy
implementation, through every search backend, in memory and saved next to an index."""

from __future__ import annotations

import numpy as np
import pytest
from fakes import FakeBackend

from cbir_cli.search.dba import DbaSettings, augment, check_augmentation, dba_paths, load_augmentation
from cbir_cli.search.faiss_backend import FaissBackend
from cbir_cli.search.rerank import RerankingBackend, RerankSettings


def l2n(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def clustered(n: int, d: int, clusters: int, seed: int, noise: float = 0.5) -> np.ndarray:
    """Unit vectors around ``clusters`` random centres (neighbours mean something)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d))
    return l2n(centres[rng.integers(0, clusters, n)] + noise * rng.standard_normal((n, d))).astype(np.float32)


def naive_rank(queries, gallery, qe=(3, 3.0), dba=(3, 3.0), pin=True, exclude=None) -> np.ndarray:
    """Full rankings (gallery positions) by the textbook definitions, all in dense
    matrices: DBA over the gallery (itself excluded), alpha-QE from the raw search's
    neighbours with their augmented vectors, then the raw top-1 first."""

    def top(scores, n):
        order = np.argsort(-scores, axis=1, kind="stable")[:, :n]
        return order, np.take_along_axis(scores, order, axis=1)

    augmented = gallery
    if dba[0]:
        self_scores = gallery @ gallery.T
        np.fill_diagonal(self_scores, -np.inf)
        idx, sims = top(self_scores, dba[0])
        augmented = l2n(gallery + np.einsum("qn,qnd->qd", np.maximum(sims, 0) ** dba[1], gallery[idx]))
    raw = queries @ gallery.T
    if exclude is not None:
        raw[np.arange(len(queries)), exclude] = -np.inf
    expanded = queries
    if qe[0]:
        idx, sims = top(raw, qe[0])
        expanded = l2n(queries + np.einsum("qn,qnd->qd", np.maximum(sims, 0) ** qe[1], augmented[idx]))
    scores = expanded @ augmented.T
    if exclude is not None:
        scores[np.arange(len(queries)), exclude] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")
    if pin:
        first = raw.argmax(axis=1)
        order = np.array([[f, *(o for o in row if o != f)] for f, row in zip(first, order)])
    return order[:, :-1] if exclude is not None else order


IDS = np.arange(400, dtype=np.int64) * 3 + 7  # row ids are not positions


@pytest.fixture(scope="module")
def data():
    return clustered(400, 32, 25, seed=0), clustered(60, 32, 25, seed=1, noise=0.8)


VARIANTS = [
    (RerankSettings(), DbaSettings(), dict(qe=(3, 3.0), dba=(3, 3.0), pin=True)),
    (RerankSettings(pin_first=False), DbaSettings(), dict(qe=(3, 3.0), dba=(3, 3.0), pin=False)),
    (RerankSettings(qe_depth=0), DbaSettings(5, 1.0), dict(qe=(0, 0.0), dba=(5, 1.0), pin=True)),
    (RerankSettings(qe_depth=4, qe_alpha=0.0, use_dba=False), None, dict(qe=(4, 0.0), dba=(0, 0.0), pin=True)),
]


@pytest.mark.parametrize("inner", [FaissBackend, FakeBackend])
@pytest.mark.parametrize("settings, dba, reference", VARIANTS)
def test_reranked_top_k_equals_the_naive_implementation(data, inner, settings, dba, reference, monkeypatch):
    """With a shortlist that covers the gallery the re-ranking is exact."""
    import cbir_cli.search.rerank as rerank_module

    monkeypatch.setattr(rerank_module, "SHORTLIST_MIN", 10_000)
    gallery, queries = data
    backend = RerankingBackend(inner(), settings, dba)
    backend.add(IDS, gallery)
    _, ids = backend.rank(queries, 10)
    np.testing.assert_array_equal(ids, IDS[naive_rank(queries, gallery, **reference)[:, :10]])
    # search(): the same order, each score the raw cosine of that result.
    scores, same = backend.search(queries, 10)
    np.testing.assert_array_equal(same, ids)
    np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", queries, gallery[(ids - 7) // 3]), atol=1e-5)


def test_the_default_shortlist_stays_close_to_the_exhaustive_re_ranking(data):
    """The query path re-scores a shortlist (the raw top results and the images their
    DBA neighbour lists point back to); it must agree with the exhaustive ranking."""
    gallery, queries = data
    backend = RerankingBackend(FaissBackend(), RerankSettings(), DbaSettings())
    backend.add(IDS, gallery)
    _, ids = backend.rank(queries, 10)
    expected = IDS[naive_rank(queries, gallery)[:, :10]]
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, expected)])
    assert overlap >= 0.97 and (ids[:, :5] == expected[:, :5]).mean() >= 0.97, overlap


def test_all_vs_all_with_the_query_excluded_equals_the_naive_implementation(data):
    gallery, _ = data
    backend = RerankingBackend(FaissBackend(), RerankSettings(), DbaSettings())
    backend.add(IDS, gallery)
    _, ids = backend.rank(gallery, len(gallery) - 1, exclude=IDS)
    expected = IDS[naive_rank(gallery, gallery, exclude=np.arange(len(gallery)))]
    assert not (ids == IDS[:, None]).any()
    # Whole rankings agree but for swaps of near-equal scores far down.
    assert (ids[:, :20] == expected[:, :20]).all() and (ids == expected).mean() > 0.999


@pytest.mark.parametrize("index_type", ["hnsw", "ivfpq"])
def test_approximate_backends_rerank_too(index_type, tmp_path):
    """Through an ANN index the re-ranked top-10 stays close to the exact one."""
    gallery = clustered(3000, 64, 60, seed=2)
    queries = clustered(50, 64, 60, seed=3, noise=0.6)
    exact = RerankingBackend(FaissBackend(), RerankSettings(), DbaSettings())
    exact.add(np.arange(3000), gallery)
    ann = FaissBackend()
    from cbir_cli.search.faiss_backend import build_index

    ann.index, ann.index_type, ann.ids = build_index(gallery, index_type), index_type, np.arange(3000)
    if index_type == "ivfpq":
        ann.exact = gallery
    approximate = RerankingBackend(ann, RerankSettings(), DbaSettings())
    approximate.augmentation = augment(ann, np.arange(3000), DbaSettings())
    _, want = exact.rank(queries, 10)
    _, got = approximate.rank(queries, 10)
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(want, got)])
    assert overlap >= 0.95, overlap
    assert (got[:, 0] == want[:, 0]).mean() >= 0.95


def test_incremental_augmentation_equals_a_fresh_one(data):
    gallery, _ = data
    grown = RerankingBackend(FaissBackend(), RerankSettings(), DbaSettings())
    grown.add(IDS[:300], gallery[:300])
    grown.add(IDS[300:], gallery[300:])
    fresh = RerankingBackend(FaissBackend(), RerankSettings(), DbaSettings())
    fresh.add(IDS, gallery)
    np.testing.assert_array_equal(grown.augmentation.neighbours, fresh.augmentation.neighbours)
    np.testing.assert_allclose(grown.augmentation.vectors, fresh.augmentation.vectors, atol=1e-6)
    gone = IDS[::5]
    grown.remove(gone)
    kept = ~np.isin(IDS, gone)
    fresh = RerankingBackend(FaissBackend(), RerankSettings(), DbaSettings())
    fresh.add(IDS[kept], gallery[kept])
    np.testing.assert_array_equal(grown.augmentation.ids, IDS[kept])
    np.testing.assert_array_equal(grown.augmentation.neighbours, fresh.augmentation.neighbours)
    np.testing.assert_allclose(grown.augmentation.vectors, fresh.augmentation.vectors, atol=1e-6)


def test_a_copy_of_an_indexed_image_stays_first_with_the_pin(data):
    """Expansion pulls a query towards its cluster; the raw top-1 (a near-copy) stays first."""
    gallery, _ = data
    rng = np.random.default_rng(5)
    copies = l2n(gallery[:40] + 0.45 * rng.standard_normal(gallery[:40].shape)).astype(np.float32)
    pinned = RerankingBackend(FaissBackend(), RerankSettings(), DbaSettings(5, 3.0))
    pinned.add(IDS, gallery)
    loose = RerankingBackend(FaissBackend(), RerankSettings(qe_depth=5, pin_first=False), DbaSettings(5, 3.0))
    loose.add(IDS, gallery)
    raw = FaissBackend()
    raw.add(IDS, gallery)
    raw_top = raw.search(copies, 1)[1][:, 0]
    np.testing.assert_array_equal(pinned.rank(copies, 5)[1][:, 0], raw_top)
    assert (loose.rank(copies, 5)[1][:, 0] != raw_top).any()  # without the pin some copies lose


def test_settings_are_validated():
    from cbir_cli.errors import CbirError

    with pytest.raises(CbirError, match="query-expansion depth"):
        RerankSettings(qe_depth=-1)
    with pytest.raises(CbirError, match="augmentation depth"):
        DbaSettings(depth=1000)


def test_saved_augmentation_is_current_incremental_and_checked(image_folder, tmp_path, tiny_embedder):
    from cbir_cli.pipeline.sync import index_folder
    from cbir_cli.store.feature_store import FeatureStore

    folder = image_folder(10)
    index_folder(folder, tmp_path / "idx", embedder=tiny_embedder)
    store = FeatureStore.open(tmp_path / "idx")
    live = np.array([r.id for r in store.live_rows()])
    saved = load_augmentation(store)
    assert saved is not None and saved.settings == DbaSettings() and list(saved.ids) == list(live)
    assert check_augmentation(store, live) == ("current", [])
    first = np.array(saved.vectors)
    # Grow the folder and change one file: the saved augmentation follows (only the
    # rows whose neighbours change are recomputed), equal to one made from scratch.
    from conftest import make_image

    for i in range(4):
        make_image(50 + i).save(folder / f"new_{i}.jpg", quality=90)
    make_image(99).save(folder / "img_000.jpg", quality=90)
    index_folder(folder, tmp_path / "idx", embedder=tiny_embedder)
    store = FeatureStore.open(tmp_path / "idx")
    grown = load_augmentation(store)
    backend = FaissBackend()
    backend.load(store)
    fresh = augment(backend, np.array([r.id for r in store.live_rows()]), DbaSettings())
    assert grown is not None and grown.count == 14 and 0 not in grown.ids
    np.testing.assert_array_equal(grown.neighbours, fresh.neighbours)
    np.testing.assert_allclose(grown.vectors, fresh.vectors, atol=1e-6)
    assert not np.allclose(first, grown.vectors[:10])  # new neighbours changed some rows
    # A damaged file is found by check and never silently served.
    vectors_file, _, _ = dba_paths(store)
    data = bytearray(vectors_file.read_bytes())
    data[-5] ^= 0xFF
    vectors_file.write_bytes(bytes(data))
    state, problems = check_augmentation(store, np.array([r.id for r in store.live_rows()]))
    assert state == "current" and any("checksum mismatch" in p for p in problems)
    from cbir_cli.search.check import check_index

    report = check_index(tmp_path / "idx")
    assert not report.ok and any("dba.npy: checksum mismatch" in p for p in report.problems)


def test_query_and_serve_re_rank_by_default_and_can_be_told_not_to(image_folder, tmp_path):
    import json

    from typer.testing import CliRunner

    from cbir_cli.cli import app
    from cbir_cli.pipeline.sync import index_folder
    from cbir_cli.search.rerank import NO_RERANKING
    from cbir_cli.serve.app import create_app

    folder = image_folder(8)
    index_folder(folder, tmp_path / "idx", model="test_tiny")
    served = create_app(index_dir=tmp_path / "idx", device="cpu").extensions["cbir"].current()
    assert isinstance(served.backend, RerankingBackend) and served.backend.augmentation is not None
    plain = create_app(index_dir=tmp_path / "idx", device="cpu", rerank=NO_RERANKING).extensions["cbir"].current()
    assert not isinstance(plain.backend, RerankingBackend)
    health = create_app(index_dir=tmp_path / "idx", device="cpu").test_client().get("/api/health").get_json()
    assert "re-ranked: DBA n=3" in health["index_type"]
    runner = CliRunner()
    for flags in ([], ["--no-rerank"], ["--qe", "0", "--qe-alpha", "1"]):
        result = runner.invoke(app, ["query", str(folder / "img_004.jpg"), "--index", str(tmp_path / "idx"),
                                     "-k", "3", "--device", "cpu", "--json", *flags])
        assert result.exit_code == 0, result.output
        hits = json.loads(result.stdout)[0]["results"]
        assert hits[0]["path"].endswith("img_004.jpg") and len(hits) == 3, flags


def test_a_damaged_augmentation_is_refused_by_readers_and_remade_by_the_next_index_run(image_folder, tmp_path,
                                                                                      caplog):
    from cbir_cli.pipeline.sync import index_folder
    from cbir_cli.search.searcher import Searcher
    from cbir_cli.store.feature_store import FeatureStore

    folder = image_folder(6)
    index_folder(folder, tmp_path / "idx", model="test_tiny")
    vectors_file, _, _ = dba_paths(FeatureStore.open(tmp_path / "idx"))
    vectors_file.write_bytes(vectors_file.read_bytes()[:-64])  # truncated
    # Never used: the plain ranking is served, with one warning saying how to repair.
    damaged = Searcher.open(tmp_path / "idx", device="cpu", rerank=RerankSettings())
    assert damaged.backend.plain_only and damaged.backend.augmentation is None
    messages = [r.getMessage() for r in caplog.records if "dba.npy" in r.getMessage()]
    assert len(messages) == 1 and messages[0].endswith("`cbir check --repair`")
    index_folder(folder, tmp_path / "idx", model="test_tiny")  # nothing new to embed: repairs it
    searcher = Searcher.open(tmp_path / "idx", device="cpu", rerank=RerankSettings())
    assert searcher.backend.augmentation is not None and searcher.backend.augmentation.count == 6
