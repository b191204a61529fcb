"""A writer's start and a reader's open cost what changed, not what is stored
(bench/scale.py, 10M rows): the shard-verdict record is a journal a run appends
to, and a manifest checked once is not checked entry by entry again."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from cbir_cli.errors import CorruptStoreError
from cbir_cli.store import manifest as manifest_module
from cbir_cli.store.feature_store import FeatureStore
from cbir_cli.store.repair import SHARD_VERDICTS, drop_damaged_shards
from cbir_cli.store.verdicts import VerdictRecord

FINGERPRINT = {"model": "fake", "weights": "w", "dim": 4, "preprocessing": {}}


@pytest.fixture
def settled(monkeypatch):
    """Files written by the test count as settled (no 2 s racy window)."""
    from cbir_cli.store import verdicts

    monkeypatch.setattr(verdicts, "RACY_SECONDS", -1.0)


def grow(store: FeatureStore, shards: int, start: int) -> None:
    for k in range(shards):
        v = np.random.default_rng(start + k).normal(size=(3, 4)).astype(np.float32)
        store.add_shard(v / np.linalg.norm(v, axis=1, keepdims=True),
                        [(f"/x/{start + k}-{i}.jpg", f"{start + k:064x}", 1) for i in range(3)])
        store.commit()


def test_a_writers_start_appends_its_verdicts_instead_of_rewriting_the_record(tmp_path, settled):
    store = FeatureStore.create(tmp_path / "idx", FINGERPRINT)
    grow(store, 30, 0)
    assert drop_damaged_shards(FeatureStore.open(store.root)) == []
    record = store.root / SHARD_VERDICTS
    lines = record.read_text().splitlines()
    assert len(lines) == 60  # two files per shard
    inode = record.stat().st_ino
    grow(store, 2, 100)
    assert drop_damaged_shards(FeatureStore.open(store.root)) == []
    after = record.read_text().splitlines()
    assert after[:60] == lines and len(after) == 64 and record.stat().st_ino == inode  # appended
    # Nothing new: nothing written; every shard held by the record, none read.
    before = record.read_bytes()
    reads: list[str] = []
    real = FeatureStore.read_shard
    try:
        FeatureStore.read_shard = lambda self, shard, mmap: reads.append(shard["name"]) or real(self, shard, mmap)
        assert drop_damaged_shards(FeatureStore.open(store.root)) == []
    finally:
        FeatureStore.read_shard = real
    assert reads == [] and record.read_bytes() == before


def test_a_torn_last_line_and_the_older_json_record_are_read(tmp_path, settled):
    store = FeatureStore.create(tmp_path / "idx", FINGERPRINT)
    grow(store, 3, 0)
    drop_damaged_shards(FeatureStore.open(store.root))
    record_file = store.root / SHARD_VERDICTS
    text = record_file.read_text()
    record_file.write_text(text + text.splitlines()[0][:25])  # a crash while appending
    record = VerdictRecord(record_file)
    path = store.shard_paths(store.manifest["shards"][0])[0]
    st = os.stat(path)
    stamp = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
    assert record.holds(path, stamp, store.manifest["shards"][0]["sha256"])
    entries = {line.split(" ")[0]: [int(f) for f in line.split(" ")[1:5]] + [line.split(" ")[5]]
               for line in text.splitlines()}
    record_file.write_text(json.dumps({"format": 1, "files": entries}))  # the earlier format
    assert VerdictRecord(record_file).holds(path, stamp, store.manifest["shards"][0]["sha256"])
    assert drop_damaged_shards(FeatureStore.open(store.root)) == []
    assert not record_file.read_text().startswith("{")  # rewritten as a journal


def test_a_checked_manifest_is_not_checked_again_until_it_changes(tmp_path, monkeypatch):
    store = FeatureStore.create(tmp_path / "idx", FINGERPRINT)
    grow(store, 2, 0)
    checks: list[int] = []
    real = manifest_module.manifest_problems
    monkeypatch.setattr(manifest_module, "manifest_problems", lambda m: checks.append(1) or real(m))
    FeatureStore.open(store.root)
    FeatureStore.open(store.root)
    assert checks == []  # the writer that made it recorded it as checked
    (store.root / manifest_module.CHECKED).unlink()
    FeatureStore.open(store.root)
    FeatureStore.open(store.root)
    assert checks == [1]
    path = store.root / "manifest.json"
    data = json.loads(path.read_text())
    data["shards"][0]["removed"] = [0, 0]  # a damaged entry, well-formed JSON
    path.write_text(json.dumps(data))
    with pytest.raises(CorruptStoreError, match="tombstones out of range or repeated"):
        FeatureStore.open(store.root)
    with pytest.raises(CorruptStoreError):  # never remembered as good
        FeatureStore.open(store.root)
    assert checks == [1, 1, 1]


def test_a_large_stores_start_stats_one_slice_and_still_finds_a_damaged_shard(tmp_path, settled, monkeypatch):
    from cbir_cli.store import repair

    monkeypatch.setattr(repair, "SWEEP_SHARDS", 4)  # 12 shards: three slices
    store = FeatureStore.create(tmp_path / "idx", FINGERPRINT)
    grow(store, 12, 0)
    assert drop_damaged_shards(FeatureStore.open(store.root)) == []  # every shard verified once
    damaged = store.manifest["shards"][5]
    vectors_file = store.shard_paths(damaged)[0]
    data = bytearray(vectors_file.read_bytes())
    data[-3] ^= 0xFF
    vectors_file.write_bytes(bytes(data))  # same size, new stamp
    stats: list[str] = []
    real_stat = os.stat
    monkeypatch.setattr(repair.os, "stat", lambda path, *a, **k: (stats.append(str(path)), real_stat(path, *a, **k))[1])
    found_after = None
    for run in range(3):
        opened = FeatureStore.open(store.root, check_files=False)  # as a writer's begin() does
        stats.clear()
        notes = drop_damaged_shards(opened)
        assert len({p for p in stats if p.endswith(".npy")}) <= 4  # one slice, not all 12
        if notes:
            assert str(vectors_file) in notes[0] and "checksum mismatch" in notes[0]
            found_after = run
            break
        grow(opened, 1, 500 + run)  # a commit: the next run is another generation
    assert found_after is not None
