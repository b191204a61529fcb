"""The Milvus search backend on a real Milvus Lite database in a temporary folder
(skipped with the reason when the extra is missing): it answers like exact Faiss,
mirrors additions, changes and removals at each indexing run, is recorded in the
index so queries need no options, and every failure is one line with nothing
written to the store."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cbir_cli.cli import app
from cbir_cli.errors import CbirError
from cbir_cli.search.backends import backend_for
from cbir_cli.search.check import check_index
from cbir_cli.search.faiss_backend import FaissBackend
from cbir_cli.search.protocol import SearchBackend
from cbir_cli.search.searcher import Searcher
from cbir_cli.store.feature_store import FeatureStore

REPO = Path(__file__).resolve().parents[1]
HAVE_MILVUS = importlib.util.find_spec("pymilvus") is not None and importlib.util.find_spec("milvus_lite") is not None
pytestmark = pytest.mark.skipif(not HAVE_MILVUS,
                                reason="Milvus is an optional extra: pip install 'cbir-cli[milvus]'")
runner = CliRunner()


def milvus():
    from cbir_cli.search.milvus_backend import MilvusBackend

    return MilvusBackend


def synthetic_store(root: Path, n: int = 2000, dim: int = 32, seed: int = 3) -> tuple[FeatureStore, np.ndarray]:
    """Clustered unit vectors (like embeddings: real neighbours exist)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((40, dim)).astype(np.float32)
    x = centres[rng.integers(0, 40, n)] + 0.35 * rng.standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    store = FeatureStore.create(root, {"model": "synthetic", "weights": "none", "dim": dim, "preprocessing": {}})
    for start in range(0, n, 500):
        store.add_shard(x[start:start + 500], [(f"/img/{i:05d}.jpg", f"{i:064x}", 1)
                                              for i in range(start, min(n, start + 500))])
    store.commit()
    return store, x


def index(folder: Path, target: Path, *extra: str) -> dict:
    result = runner.invoke(app, ["index", str(folder), "--index", str(target), "--model", "test_tiny",
                                 "--workers", "0", "--json", *extra])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def collection_ids(backend) -> set[int]:
    return backend._collection_ids()


def test_top10_of_50_queries_equal_exact_faiss_on_the_same_shards(tmp_path):
    store, x = synthetic_store(tmp_path / "store")
    backend = milvus()(str(tmp_path / "m.db"), "cbir_recall")
    exact = FaissBackend()
    try:
        backend.build(store, "hnsw")
        exact.build(store, "flat", persist=False)
        queries = x[::40][:50] + 0.05 * np.random.default_rng(1).standard_normal((50, x.shape[1])).astype(np.float32)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        scores, ids = backend.search(queries, 10)
        truth_scores, truth = exact.search(queries, 10)
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, truth)])
        assert recall >= 0.99, recall
        same = ids[:, 0] == truth[:, 0]
        np.testing.assert_allclose(scores[same, 0], truth_scores[same, 0], rtol=1e-4)  # IP = cosine
        assert backend.count == 2000 and backend.index_type == "HNSW"
        np.testing.assert_allclose(backend.vectors(np.array([7, 1999])), x[[7, 1999]], atol=1e-6)
        assert isinstance(backend, SearchBackend)
        # Range search (what dedup uses): the same sets as exact Faiss, best first.
        lims, range_scores, range_ids = backend.range_search(queries[:10], 0.8)
        truth_lims, _, truth_ids = exact.range_search(queries[:10], 0.8)
        found = truth = 0
        for q in range(10):
            mine, theirs = range_ids[lims[q]:lims[q + 1]], truth_ids[truth_lims[q]:truth_lims[q + 1]]
            found, truth = found + len(set(mine) & set(theirs)), truth + len(theirs)
            assert set(mine) <= set(theirs)  # every score is exact: nothing below the threshold
            assert list(range_scores[lims[q]:lims[q + 1]]) == sorted(range_scores[lims[q]:lims[q + 1]], reverse=True)
        assert truth > 10 and found / truth >= 0.98, (found, truth)
    finally:
        backend.close()


def test_the_backend_is_recorded_and_additions_changes_removals_are_mirrored(image_folder, tmp_path, tiny_embedder):
    folder = image_folder(10)
    target = tmp_path / "index"
    first = index(folder, target, "--backend", "milvus")
    assert first["store_count"] == 10
    store = FeatureStore.open(target)
    assert store.manifest["search_backend"]["name"] == "milvus"
    assert store.manifest["search_backend"]["uri"] == "milvus.db" and (target / "milvus.db").is_dir()

    from conftest import make_image

    (folder / "img_000.jpg").unlink()  # removed
    make_image(50).save(folder / "img_001.jpg", quality=90)  # changed: a new row id
    make_image(51).save(folder / "img_new.jpg", quality=90)  # added
    second = index(folder, target)  # no backend options: the recorded one is used
    assert (second["added"], second["updated"], second["removed"]) == (1, 1, 1)

    store = FeatureStore.open(target)
    backend = backend_for(store)
    try:
        assert backend.load(store) and backend.name == "milvus"
        assert collection_ids(backend) == {r.id for r in store.live_rows()}  # old ids of 000 and 001 are gone
        changed = store.rows_by_path()[str(folder / "img_001.jpg")]
        vector = store.vectors_for([changed])[changed.id]
        scores, ids = backend.search(vector[None], 3)
        assert ids[0, 0] == changed.id and abs(scores[0, 0] - 1.0) < 1e-4
    finally:
        backend.close()

    # Queries and the web server find the backend through the index alone.
    searcher = Searcher.open(target, embedder=tiny_embedder)
    assert searcher.backend.name == "milvus" and searcher.count == 10
    hits = searcher.search_paths([folder / "img_new.jpg"], k=1)[0]
    assert hits[0].path == str(folder / "img_new.jpg")
    searcher.backend.close()
    result = runner.invoke(app, ["check", "--index", str(target)])
    assert result.exit_code == 0 and "search index current (milvus)" in result.stderr


def test_check_finds_a_dropped_collection_and_rebuild_backend_restores_it(image_folder, tmp_path, tiny_embedder):
    folder = image_folder(6)
    target = tmp_path / "index"
    index(folder, target, "--backend", "milvus", "--backend-collection", "my_images")
    store = FeatureStore.open(target)
    backend = backend_for(store)
    backend.client().drop_collection("my_images")
    backend.close()

    report = check_index(target)
    assert not report.ok and report.repair == "rebuild-backend"
    assert report.problems == [f"Milvus collection my_images at {target / 'milvus.db'} is missing"]
    result = runner.invoke(app, ["check", "--index", str(target)])
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines()[-1].endswith("repair with `cbir index --rebuild-backend` "
                                                           "(no re-embedding)")
    query = runner.invoke(app, ["query", str(folder / "img_001.jpg"), "--index", str(target)])
    assert query.exit_code == 1 and len(query.stderr.splitlines()) == 1 and "is missing" in query.stderr

    shards_before = sorted((target / "shards").iterdir())
    generation = store.generation
    result = runner.invoke(app, ["index", "--rebuild-backend", "--index", str(target)])
    assert result.exit_code == 0, result.output
    assert "from its 6 stored vectors" in result.stderr
    assert sorted((target / "shards").iterdir()) == shards_before  # nothing re-embedded
    assert FeatureStore.open(target).generation == generation
    assert check_index(target).ok
    searcher = Searcher.open(target, embedder=tiny_embedder)
    assert searcher.search_paths([folder / "img_004.jpg"], k=1)[0][0].path == str(folder / "img_004.jpg")
    searcher.backend.close()


def test_rebuild_backend_switches_an_existing_index_to_milvus_without_reembedding(image_folder, tmp_path,
                                                                                 tiny_embedder):
    folder = image_folder(5)
    target = tmp_path / "index"
    index(folder, target)  # Faiss
    shards = sorted((target / "shards").iterdir())
    result = runner.invoke(app, ["index", "--rebuild-backend", "--index", str(target), "--backend", "milvus"])
    assert result.exit_code == 0, result.output
    assert sorted((target / "shards").iterdir()) == shards
    assert FeatureStore.open(target).manifest["search_backend"]["name"] == "milvus"
    searcher = Searcher.open(target, embedder=tiny_embedder)
    assert searcher.backend.name == "milvus" and searcher.backend.index_type == "HNSW"
    searcher.backend.close()
    assert check_index(target).ok


def manifest_bytes(target: Path) -> bytes | None:
    path = target / "manifest.json"
    return path.read_bytes() if path.exists() else None


@pytest.mark.parametrize("case", ["unreachable server", "other model in the collection", "lite cannot ivfpq",
                                  "not a milvus address"])
def test_a_bad_backend_is_one_line_and_nothing_is_written(image_folder, tmp_path, case):
    folder = image_folder(4)
    target = tmp_path / "index"
    if case == "other model in the collection":
        other, _ = synthetic_store(tmp_path / "other", n=20, dim=8)
        backend = milvus()(str(tmp_path / "shared.db"), "shared")
        backend.build(other, "flat")
        backend.close()
        args, expected = ["--milvus-uri", str(tmp_path / "shared.db"), "--milvus-collection", "shared"], \
            "holds vectors of model synthetic (dim 8), this index has model test_tiny (dim 256)"
    elif case == "unreachable server":
        args, expected = ["--milvus-uri", "http://127.0.0.1:1"], "cannot reach Milvus at http://127.0.0.1:1"
    elif case == "lite cannot ivfpq":
        args, expected = ["--index-type", "ivfpq"], "Milvus Lite cannot build IVF_PQ indexes"
    else:
        args, expected = ["--milvus-uri", str(tmp_path / "x.sqlite")], "a file path ending in .db (Milvus Lite)"
    for existing in (False, True):
        if existing:
            index(folder, target)  # an existing Faiss index must stay exactly as it is
        before = manifest_bytes(target)
        result = runner.invoke(app, ["index", str(folder), "--index", str(target), "--model", "test_tiny",
                                     "--workers", "0", "--backend", "milvus", *args])
        assert result.exit_code == 1, result.output
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines
        assert manifest_bytes(target) == before
        if not existing:
            assert not target.exists()


HOLDER = """
import sys, time
from cbir_cli.search.milvus_client import open_client
client = open_client(sys.argv[1])
print("open", flush=True)
time.sleep(120)
"""


@contextlib.contextmanager
def held_by_another_process(db: Path) -> Iterator[subprocess.Popen]:
    """A process holding the Milvus Lite database ``db`` open (like `cbir serve`)."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(db)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        yield holder
    finally:
        holder.kill()
        holder.wait()


def test_a_lite_database_open_in_another_process_says_one_process_at_a_time(image_folder, tmp_path):
    folder = image_folder(3)
    target = tmp_path / "index"
    index(folder, target, "--backend", "milvus")
    with held_by_another_process(target / "milvus.db") as holder:
        result = runner.invoke(app, ["query", str(folder / "img_000.jpg"), "--index", str(target)])
        assert result.exit_code == 1
        assert f"open in another process (pid {holder.pid}: " in result.stderr  # which one, so it can be stopped
        assert "Milvus Lite allows one process per database file" in result.stderr
        assert len(result.stderr.splitlines()) == 1
    deadline = time.monotonic() + 30  # the lock goes with the process
    while True:
        result = runner.invoke(app, ["query", str(folder / "img_000.jpg"), "--index", str(target), "--json"])
        if result.exit_code == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert result.exit_code == 0, result.output


def test_check_says_a_lite_database_held_by_another_process_is_in_use_not_damaged(image_folder, tmp_path):
    """A lock is not damage: no problem, no advice to rebuild the backend; the
    holder is named by pid."""
    folder = image_folder(3)
    target = tmp_path / "index"
    index(folder, target, "--backend", "milvus")
    with held_by_another_process(target / "milvus.db") as holder:
        report = check_index(target)
        assert report.ok and report.repair is None and report.search_index == "in use", report
        [note] = report.notes
        assert f"is open in another process (pid {holder.pid}: " in note and "not checked" in note
        result = runner.invoke(app, ["check", "--index", str(target)])
        assert result.exit_code == 0, result.output
        assert "rebuild-backend" not in result.stderr and "problem" not in result.stderr


def damage_lite_collection(db: Path) -> list[Path]:
    """Random bytes over the collection's data and index files, sizes kept."""
    rng = np.random.default_rng(7)
    damaged = sorted(db.glob("collections/*/partitions/_default/data/*.parquet"))
    damaged += sorted(db.glob("collections/*/partitions/_default/indexes/*.idx"))
    for path in damaged:
        path.write_bytes(rng.bytes(path.stat().st_size))
    return damaged


@pytest.mark.parametrize("remedy", [["index", "--rebuild-backend"], ["check", "--repair"]])
def test_a_damaged_lite_database_is_repaired_the_way_check_advises(image_folder, tmp_path, tiny_embedder, remedy):
    """The rebuild never reads the damaged collection: it is set aside (kept, not
    deleted) and the collection made again from the shards."""
    folder = image_folder(6)
    target = tmp_path / "index"
    index(folder, target, "--backend", "milvus")
    assert len(damage_lite_collection(target / "milvus.db")) == 2

    report = check_index(target)
    assert not report.ok and report.repair == "rebuild-backend", report
    assert "Parquet" in report.problems[0]
    shards_before = sorted((target / "shards").iterdir())

    result = runner.invoke(app, [*remedy, "--index", str(target)])
    assert result.exit_code == 0, result.output
    assert sorted((target / "shards").iterdir()) == shards_before  # nothing re-embedded
    report = check_index(target)
    assert report.ok and report.search_index == "current", report
    [aside] = (target / "milvus.db.damaged").iterdir()  # the damaged copy, for whoever wants to look
    assert any(str(aside.parent) in note for note in report.notes), report.notes
    searcher = Searcher.open(target, embedder=tiny_embedder)
    try:
        assert searcher.backend.name == "milvus"
        assert searcher.search_paths([folder / "img_004.jpg"], k=1)[0][0].path == str(folder / "img_004.jpg")
    finally:
        searcher.backend.close()


def test_a_lite_database_still_failing_without_the_collection_is_set_aside_whole(tmp_path, monkeypatch):
    """Damage outside the collection's folder: the whole database goes aside, and
    the collection is made again in a new one."""
    from cbir_cli.search.milvus_client import LiteDamagedError

    store, x = synthetic_store(tmp_path / "store", n=300)
    backend = milvus()(str(tmp_path / "m.db"), "cbir_whole")
    backend.build(store, "flat")
    backend.close()
    real_exists, failures = type(backend)._exists, iter(range(2))

    def damaged_twice(self):
        if next(failures, None) is not None:
            raise LiteDamagedError("unreadable")
        return real_exists(self)

    monkeypatch.setattr(type(backend), "_exists", damaged_twice)
    try:
        backend.build(store, "flat")
        assert backend.search(x[:1], 1)[1][0, 0] == 0
    finally:
        backend.close()
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "m.db.damaged").iterdir()) == ["cbir_whole", "m.db"]


def test_without_the_extra_the_milvus_backend_is_one_line_naming_it(image_folder, tmp_path, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "pymilvus" else real_find_spec(name, *a))
    with pytest.raises(CbirError, match=r"pip install 'cbir-cli\[milvus\]'"):
        milvus()(str(tmp_path / "m.db"), "x").client()
    result = runner.invoke(app, ["index", str(image_folder(2)), "--index", str(tmp_path / "index"),
                                 "--model", "test_tiny", "--backend", "milvus"])
    assert result.exit_code == 1
    assert result.stderr == ("error: the milvus backend needs pymilvus and milvus-lite, an optional extra: "
                             "pip install 'cbir-cli[milvus]'\n")
