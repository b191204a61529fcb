"""Damage an index on purpose: the store never copies damaged vectors, never starts
over on shards whose manifest was lost, and a plain re-run repairs what it can
derive (issue 10, items 1-3)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cbir_cli.cli import app
from cbir_cli.errors import CorruptStoreError
from cbir_cli.pipeline.options import ExtractOptions
from cbir_cli.pipeline.sync import index_folder
from cbir_cli.search.check import check_index
from cbir_cli.search.searcher import Searcher
from cbir_cli.store.feature_store import FeatureStore
from cbir_cli.store.transaction import write_transaction

OPTIONS = ExtractOptions(workers=0, batch_size=2, shard_size=2)
N_IMAGES = 6
runner = CliRunner()


@pytest.fixture
def built(image_folder, tmp_path, tiny_embedder) -> tuple[Path, Path]:
    """(images folder, index) of 6 images in 3 shards of 2."""
    folder, index_dir = image_folder(N_IMAGES), tmp_path / "index"
    index_folder(folder, index_dir, embedder=tiny_embedder, options=OPTIONS)
    return folder, index_dir


def poison_first_vector(shard: Path) -> None:
    """Make the first vector of a shard huge, keeping the file size (a flipped bit
    in a float's exponent)."""
    data = bytearray(shard.read_bytes())
    header = data.index(b"\n") + 1  # the .npy header ends with a newline
    data[header + 3] = 0x7E  # the first float32's exponent byte: ~1e38 instead of ~0.06
    shard.write_bytes(bytes(data))


def first_shard_paths(index_dir: Path) -> list[str]:
    rows = json.loads((index_dir / "shards" / "shard-000001.rows.json").read_text())
    return [r["path"] for r in rows]


def assert_healthy(index_dir: Path, tiny_embedder, count: int = N_IMAGES) -> None:
    report = check_index(index_dir)
    assert report.ok, report.problems
    assert report.count == count and report.search_index == "current"
    searcher = Searcher.open(index_dir, embedder=tiny_embedder)
    for hits in searcher.search_ids([r.id for r in searcher.rows], k=count):
        assert all(-1.0001 <= h.score <= 1.0001 for h in hits)


def test_moved_files_never_reuse_vectors_of_a_damaged_shard(built, tiny_embedder):
    folder, index_dir = built
    poison_first_vector(index_dir / "shards" / "shard-000001.npy")
    for path in first_shard_paths(index_dir):  # move the shard's source files
        Path(path).rename(Path(path).with_name("moved_" + Path(path).name))
    summary = index_folder(folder, index_dir, embedder=tiny_embedder, options=OPTIONS)
    assert summary.reused == 0 and summary.embedded == 2
    assert_healthy(index_dir, tiny_embedder)


def test_reuse_reads_only_verified_shards_and_valid_vectors(built, tiny_embedder):
    """Even with the shard's checksum forged to match, an invalid vector is never copied."""
    import hashlib

    folder, index_dir = built
    shard = index_dir / "shards" / "shard-000001.npy"
    poison_first_vector(shard)
    manifest = json.loads((index_dir / "manifest.json").read_text())
    manifest["shards"][0]["sha256"] = hashlib.sha256(shard.read_bytes()).hexdigest()
    (index_dir / "manifest.json").write_text(json.dumps(manifest))
    store = FeatureStore.open(index_dir)
    rows = store.shard_rows(store.manifest["shards"][0])
    assert set(store.vectors_for(rows)) == {rows[1].id}  # the poisoned row is not offered
    moved = Path(rows[0].path)
    moved.rename(moved.with_name("moved.jpg"))
    summary = index_folder(folder, index_dir, embedder=tiny_embedder, options=OPTIONS)
    assert summary.reused == 0
    assert_healthy(index_dir, tiny_embedder)


def test_the_store_refuses_invalid_vectors_from_any_writer(tmp_path, tiny_embedder):
    dim = tiny_embedder.config.dim
    store = FeatureStore.create(tmp_path / "s", tiny_embedder.fingerprint())
    unit = np.eye(1, dim, dtype=np.float32)
    for bad in (unit * 5e34, unit * np.nan, unit * 0.5):
        with pytest.raises(ValueError, match="invalid vector"):
            store.add_shard(bad, [("/x.jpg", "0" * 64, 1)])
    store.add_shard(np.zeros((1, dim), dtype=np.float32), [("/blank.jpg", "1" * 64, 1)])  # a descriptor's "nothing"

    # The transaction skips such rows with a reason instead of failing the run.
    with write_transaction(tmp_path / "t") as txn:
        txn.begin(tiny_embedder.fingerprint())
        txn.add(np.concatenate([unit, np.full_like(unit, np.inf)]), [("/a.jpg", "a" * 64, 1), ("/b.jpg", "b" * 64, 1)])
    assert txn.rejected == [("/b.jpg", "the model produced an invalid vector (not finite, or neither unit length "
                                       "nor zero)")]
    stored = FeatureStore.open(tmp_path / "t")
    assert [r.path for r in stored.live_rows()] == ["/a.jpg"] and "/b.jpg" in stored.manifest["skipped"]


def test_a_deleted_manifest_is_refused_then_recovered(built, tiny_embedder):
    folder, index_dir = built
    before = {r.path: r.id for r in FeatureStore.open(index_dir).live_rows()}
    shards = sorted(p.name for p in (index_dir / "shards").iterdir())
    (index_dir / "manifest.json").unlink()

    with pytest.raises(CorruptStoreError, match=r"3 shard file.* but no manifest\.json"):
        index_folder(folder, index_dir, embedder=tiny_embedder, options=OPTIONS)
    assert sorted(p.name for p in (index_dir / "shards").iterdir()) == shards  # nothing deleted
    result = runner.invoke(app, ["query", str(folder / "img_000.jpg"), "--index", str(index_dir)])
    assert result.exit_code == 1 and "cbir check --repair" in result.stderr and "Traceback" not in result.output

    result = runner.invoke(app, ["check", "--repair", "--index", str(index_dir)])
    assert result.exit_code == 0, result.output
    assert "recovered from 3 shard(s), 6 images" in result.stderr
    assert {r.path: r.id for r in FeatureStore.open(index_dir).live_rows()} == before
    summary = index_folder(folder, index_dir, embedder=tiny_embedder, options=OPTIONS)
    assert summary.embedded == 0 and summary.unchanged == N_IMAGES
    assert_healthy(index_dir, tiny_embedder)


def test_recovery_keeps_the_newest_row_of_a_path(built, tiny_embedder):
    folder, index_dir = built
    from conftest import make_image

    make_image(50).save(folder / "img_000.jpg")  # changed content: a new row, the old one tombstoned
    index_folder(folder, index_dir, embedder=tiny_embedder, options=OPTIONS)
    live = {r.path: r.id for r in FeatureStore.open(index_dir).live_rows()}
    (index_dir / "manifest.json").write_text("{garbage")
    result = runner.invoke(app, ["check", "--repair", "--index", str(index_dir)])
    assert result.exit_code == 0, result.output
    assert {r.path: r.id for r in FeatureStore.open(index_dir).live_rows()} == live


def test_an_interrupted_first_run_is_not_mistaken_for_a_lost_manifest(tmp_path, image_folder, tiny_embedder):
    """Shards without manifest *and* without store.json: never committed, leftovers."""
    index_dir = tmp_path / "index"
    (index_dir / "shards").mkdir(parents=True)
    (index_dir / "shards" / "shard-000001.npy").write_bytes(b"half a run")
    summary = index_folder(image_folder(2), index_dir, embedder=tiny_embedder, options=OPTIONS)
    assert summary.store_count == 2 and check_index(index_dir).ok


@pytest.mark.parametrize("target", ["shard", "rows", "missing shard", "search index", "search index meta"])
def test_a_plain_rerun_repairs_what_it_can_derive(built, tiny_embedder, target):
    folder, index_dir = built
    shard = index_dir / "shards" / "shard-000002.npy"
    notices: list[str] = []
    if target == "shard":
        poison_first_vector(shard)
    elif target == "rows":
        rows = shard.with_name("shard-000002.rows.json")
        rows.write_text(rows.read_text().replace("img", "IMG"))
    elif target == "missing shard":
        shard.unlink()
    elif target == "search index":
        data = bytearray((index_dir / "index" / "index.faiss").read_bytes())
        data[-8] ^= 0x40
        (index_dir / "index" / "index.faiss").write_bytes(bytes(data))
    else:
        (index_dir / "index" / "index.json").write_text('"x"')
    assert not check_index(index_dir).ok
    summary = index_folder(folder, index_dir, embedder=tiny_embedder, options=OPTIONS, on_notice=notices.append)
    shard_damage = target in ("shard", "rows", "missing shard")
    assert summary.embedded == (2 if shard_damage else 0)  # only the damaged shard's images
    assert any("shard-000002" in n and "embedded again" in n for n in notices) == shard_damage
    assert_healthy(index_dir, tiny_embedder)
    assert not shard.exists() or not shard_damage  # the damaged file is gone


def test_a_writer_start_reads_only_shards_changed_since_verified(built, tiny_embedder, monkeypatch):
    """Issue 21 item 3: a writer verifies every shard at its start, but one whose
    files have the stamps they had when last verified is not read again (one stat
    per file, not every vector); any write to a shard still gets it verified and,
    damaged, dropped and embedded again."""
    from cbir_cli.store import verdicts

    folder, index_dir = built
    monkeypatch.setattr(verdicts, "RACY_SECONDS", 0.0)  # the fixture's files count as settled
    reads: list[str] = []
    original = FeatureStore.read_shard
    monkeypatch.setattr(FeatureStore, "read_shard", lambda self, shard, mmap: (
        reads.append(shard["name"]) if not mmap else None, original(self, shard, mmap))[1])

    index_folder(folder, index_dir, embedder=tiny_embedder, options=OPTIONS)  # verifies and records
    shards = len(FeatureStore.open(index_dir).manifest["shards"])
    assert len(reads) == shards
    reads.clear()
    summary = index_folder(folder, index_dir, embedder=tiny_embedder, options=OPTIONS)
    assert reads == [] and summary.embedded == 0

    poison_first_vector(index_dir / "shards" / "shard-000002.npy")  # same size, new stamp
    notices: list[str] = []
    summary = index_folder(folder, index_dir, embedder=tiny_embedder, options=OPTIONS, on_notice=notices.append)
    assert "shard-000002" in reads and summary.embedded == 2
    assert any("shard-000002" in n and "embedded again" in n for n in notices)
    assert_healthy(index_dir, tiny_embedder)
