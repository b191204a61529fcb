"""The store's commit log (issue 21, item 2): a commit writes what changed, not what
is stored; readers replay the log after the checkpoint; a crash between a log entry
and the next checkpoint loses nothing; a garbled entry is ignored and reported;
old (format 1) stores open and are migrated by their first commit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from cbir_cli.search.check import check_index
from cbir_cli.search.repair import repair_index
from cbir_cli.store.commit_log import CHECKPOINT_EVERY, LOG_DIR, entry_path
from cbir_cli.store.feature_store import FeatureStore
from cbir_cli.store.repair import recover_manifest
from cbir_cli.store.transaction import write_transaction

FINGERPRINT = {"model": "fake", "weights": "w", "dim": 4, "preprocessing": {}}


def unit_rows(n: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n, 4)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def add(store: FeatureStore, paths: list[str], seed: int) -> None:
    store.add_shard(unit_rows(len(paths), seed), [(p, f"{seed:064x}", 1) for p in paths])


def state(store: FeatureStore) -> dict:
    keep = ("shards", "count", "skipped", "next_id", "next_shard", "generation", "fingerprint")
    return json.loads(json.dumps({k: store.manifest[k] for k in keep}))


def problems(root: Path) -> list[str]:
    """``cbir check``'s problems but the model's (a fake fingerprint here)."""
    return [p for p in check_index(root).problems if "unknown model" not in p]


def log_files(root: Path) -> list[str]:
    folder = root / LOG_DIR
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


@pytest.fixture
def store(tmp_path):
    s = FeatureStore.create(tmp_path / "idx", FINGERPRINT)
    add(s, ["/a/0.jpg", "/a/1.jpg"], 0)
    assert s.commit()  # the first commit of a store: a checkpoint
    return s


def test_a_commit_writes_what_changed_not_what_is_stored(store):
    checkpoint = (store.root / "manifest.json").read_bytes()
    sizes = []
    for k in range(1, CHECKPOINT_EVERY - 1):
        add(store, [f"/d/{k}/0.jpg", f"/d/{k}/1.jpg", f"/a/{k % 2}.jpg"], k)  # also replaces a stored row
        assert store.commit()
        sizes.append(entry_path(store.root, store.generation).stat().st_size)
        assert store.last_commit_bytes == sizes[-1]
    # One shard's entry (and one tombstone) each time, whatever is already stored.
    assert sizes[-1] - sizes[2] < 64, sizes
    assert (store.root / "manifest.json").read_bytes() == checkpoint  # not rewritten per commit
    assert state(FeatureStore.open(store.root)) == state(store)


def test_a_checkpoint_every_k_commits_and_at_the_end_prunes_the_log(store):
    for k in range(1, CHECKPOINT_EVERY + 3):
        add(store, [f"/d/{k}.jpg"], k)
        store.commit()
    on_disk = json.loads((store.root / "manifest.json").read_text())
    assert on_disk["format"] == 2 and on_disk["generation"] == CHECKPOINT_EVERY + 1
    assert len(log_files(store.root)) == 2  # the commits after that checkpoint
    assert store.checkpoint()
    assert log_files(store.root) == []
    assert json.loads((store.root / "manifest.json").read_text())["generation"] == store.generation
    assert state(FeatureStore.open(store.root)) == state(store)


def test_replayed_state_equals_the_writers_through_tombstones_drops_and_skips(store):
    rng = np.random.default_rng(7)
    for k in range(1, 40):
        paths = [f"/r/{int(i)}.jpg" for i in rng.choice(30, size=int(rng.integers(1, 6)), replace=False)]
        add(store, paths, k)
        store.remove_paths([f"/r/{int(rng.integers(30))}.jpg"])
        store.record_skipped(f"/bad/{k % 5}.jpg", "0" * 64, f"reason {k}")
        store.forget_skipped([f"/bad/{(k + 2) % 5}.jpg"])
        if k % 3:
            store.commit()
        if k % 11 == 0:
            store.manifest["weights_path"] = f"/w/{k}.pt"  # a caller's top-level key
    store.commit()
    reopened = FeatureStore.open(store.root)
    assert state(reopened) == state(store)
    assert reopened.manifest["weights_path"] == store.manifest["weights_path"]
    assert reopened.count == len(reopened.live_rows()) == len({r.path for r in reopened.live_rows()})
    assert problems(store.root) == []


def test_nothing_changed_writes_nothing(store):
    generation = store.generation
    assert not store.commit()
    assert store.generation == generation and log_files(store.root) == []


def test_sigkill_between_log_entries_and_the_checkpoint_loses_nothing(tmp_path):
    root = tmp_path / "idx"
    script = textwrap.dedent(f"""
        import os, signal, sys
        import numpy as np
        from cbir_cli.store.transaction import write_transaction
        with write_transaction({str(root)!r}, shard_size=2) as txn:
            txn.begin({FINGERPRINT!r})
            for k in range(10):
                v = np.eye(4, dtype=np.float32)[[k % 4, (k + 1) % 4]]
                txn.add(v, [(f"/k/{{k}}/0.jpg", "{'a' * 64}", 1), (f"/k/{{k}}/1.jpg", "{'b' * 64}", 1)])
            os.kill(os.getpid(), signal.SIGKILL)  # before the run's final checkpoint
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    assert len(log_files(root)) == 9  # the first commit was a checkpoint, the others log entries
    store = FeatureStore.open(root)
    assert store.count == 20 and store.generation == 10
    assert problems(root) == []
    with write_transaction(root) as txn:  # the next writer goes on from there
        txn.begin(FINGERPRINT)
        txn.add(np.eye(4, dtype=np.float32)[:1], [("/after.jpg", "c" * 64, 1)])
    assert FeatureStore.open(root).count == 21 and log_files(root) == []


def test_a_transaction_ends_with_a_complete_checkpoint(tmp_path):
    root = tmp_path / "idx"
    with write_transaction(root, shard_size=1) as txn:
        txn.begin(FINGERPRINT)
        for k in range(5):
            txn.add(np.eye(4, dtype=np.float32)[[k % 4]], [(f"/t/{k}.jpg", "d" * 64, 1)])
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["count"] == 5 and len(manifest["shards"]) == 5 and log_files(root) == []


def test_a_large_stores_run_ends_with_a_checkpoint_only_once_the_log_is_as_large(tmp_path, monkeypatch):
    """Rewriting a 10M-row manifest (~3 MB) at the end of every run made a run cost
    O(collection) (bench/scale.py); past CHECKPOINT_SMALL_BYTES a run checkpoints
    once the log since the last checkpoint is as large as the manifest."""
    from cbir_cli.store import committing

    root = tmp_path / "idx"
    with write_transaction(root, shard_size=1) as txn:
        txn.begin(FINGERPRINT)
        txn.add(np.eye(4, dtype=np.float32)[:1], [("/first.jpg", "a" * 64, 1)])
    monkeypatch.setattr(committing, "CHECKPOINT_SMALL_BYTES", 0)
    size = (root / "manifest.json").stat().st_size
    runs = 0
    while log_files(root) or runs == 0:
        checkpoint = (root / "manifest.json").read_bytes()
        with write_transaction(root, shard_size=1) as txn:
            txn.begin(FINGERPRINT)
            txn.add(np.eye(4, dtype=np.float32)[[runs % 4]], [(f"/run{runs}.jpg", "b" * 64, 1)])
        runs += 1
        logged = sum((root / LOG_DIR / name).stat().st_size for name in log_files(root))
        if log_files(root):  # no checkpoint: the log is still smaller than the manifest
            assert (root / "manifest.json").read_bytes() == checkpoint and logged < size
        assert FeatureStore.open(root).count == 1 + runs  # the state is whole either way
        assert runs < 50
    assert runs > 1  # some runs ended without one
    assert json.loads((root / "manifest.json").read_text())["count"] == 1 + runs and problems(root) == []


def test_an_old_format_store_opens_and_is_migrated_by_its_first_commit(store):
    manifest = json.loads((store.root / "manifest.json").read_text())
    manifest["format"] = 1  # as every store made before the log
    (store.root / "manifest.json").write_text(json.dumps(manifest))
    old = FeatureStore.open(store.root)
    assert old.count == 2 and problems(store.root) == []
    add(old, ["/new.jpg"], 9)
    assert old.commit()
    assert log_files(store.root) == []  # the migration is a checkpoint, not a log entry
    migrated = json.loads((store.root / "manifest.json").read_text())
    assert migrated["format"] == 2 and migrated["count"] == 3
    add(old, ["/newer.jpg"], 10)
    old.commit()
    assert len(log_files(store.root)) == 1 and FeatureStore.open(store.root).count == 4


def test_a_garbled_last_entry_is_ignored_reported_and_repaired(store):
    for k in range(1, 4):
        add(store, [f"/g/{k}.jpg"], k)
        store.commit()
    last = entry_path(store.root, store.generation)
    last.write_bytes(last.read_bytes()[:40])  # torn
    reopened = FeatureStore.open(store.root)
    assert reopened.count == 4 and reopened.generation == store.generation - 1
    assert any(str(last) in p and "never committed" in p for p in problems(store.root))
    repaired = repair_index(store.root)
    assert any(str(last) in line for line in repaired.repairs)
    assert problems(store.root) == [] and not last.exists()
    assert FeatureStore.open(store.root).count == 4


def test_entries_after_a_gap_or_with_a_wrong_count_are_not_replayed(store):
    for k in range(1, 5):
        add(store, [f"/g/{k}.jpg"], k)
        store.commit()
    third = entry_path(store.root, store.generation - 1)
    entry = json.loads(third.read_text())
    entry["set"]["count"] += 1
    third.write_text(json.dumps(entry))
    reopened = FeatureStore.open(store.root)
    assert reopened.generation == store.generation - 2 and reopened.count == 4
    assert len(reopened.log_ignored) == 2  # the inconsistent one and the one after it
    # A writer goes on from the replayed state: the never-committed names are reused.
    add(reopened, ["/h.jpg"], 20)
    assert reopened.commit()
    assert state(FeatureStore.open(store.root)) == state(reopened)


def test_a_lost_manifest_is_recovered_with_the_log_present(store):
    for k in range(1, 4):
        add(store, [f"/g/{k}.jpg"], k)
        store.commit()
    (store.root / "manifest.json").unlink()
    recovery = recover_manifest(store.root, generation=1)
    assert recovery.images == 5
    reopened = FeatureStore.open(store.root)
    assert reopened.count == 5 and reopened.generation > store.generation and log_files(store.root) == []
