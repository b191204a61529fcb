"""Adopting shards that workers wrote themselves (store/staging.py): the result is
byte-for-byte the store ``add_shard`` makes, checksums included; the live run's
parts survive intermediate commits; a killed run leaves only leftovers that the
next commit collects; a damaged part is refused before anything is registered."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cbir_cli.errors import CorruptStoreError
from cbir_cli.search.check import check_index
from cbir_cli.store.adoption import adopt_part, staging_run
from cbir_cli.store.feature_store import FeatureStore
from cbir_cli.store.integrity import shard_problems
from cbir_cli.store.manifest import STAGING_DIR
from cbir_cli.store.staging import write_part
from cbir_cli.store.transaction import write_transaction

FP = {"model": "synthetic", "weights": "none", "dim": 4, "preprocessing": {}}


def unit_rows(n: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, 4)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def items(start: int, n: int, tag: str = "") -> list[tuple[str, str, int]]:
    return [(f"/img/{i:03d}.jpg", f"{tag}{i:063x}".rjust(64, "0"), 1) for i in range(start, start + n)]


def shard_entries(root) -> list[dict]:
    return [dict(s) for s in json.loads((root / "manifest.json").read_text())["shards"]]


def test_an_adopted_part_is_exactly_the_shard_add_shard_writes(tmp_path):
    vectors, rows = unit_rows(5), items(0, 5)
    direct = FeatureStore.create(tmp_path / "direct", FP)
    direct.add_shard(vectors, rows)
    direct.commit()

    with write_transaction(tmp_path / "adopted") as txn:
        txn.begin(FP)
        with txn.staging() as folder:
            name = write_part(folder, vectors, rows)  # what a worker does
            assert txn.adopt(folder, name) == 5
        assert not (tmp_path / "adopted" / STAGING_DIR).exists()  # the run folder is gone
    assert shard_entries(tmp_path / "direct") == shard_entries(tmp_path / "adopted")
    for suffix in (".npy", ".rows.json"):
        assert (tmp_path / "direct" / "shards" / f"shard-000001{suffix}").read_bytes() == \
               (tmp_path / "adopted" / "shards" / f"shard-000001{suffix}").read_bytes()
    store = FeatureStore.open(tmp_path / "adopted")
    problems: list[str] = []
    assert shard_problems(store, problems) is not None and problems == [] and store.leftover_files() == []


def test_adoption_replaces_live_rows_of_the_same_paths_and_ids_come_from_the_store(tmp_path):
    root = tmp_path / "store"
    with write_transaction(root) as txn:
        txn.begin(FP)
        txn.add(unit_rows(4), items(0, 4))
        txn.flush()
        with txn.staging() as folder:
            name = write_part(folder, unit_rows(2, seed=1), items(2, 2, tag="b"))  # img 2, 3 changed
            txn.adopt(folder, name)
    store = FeatureStore.open(root)
    assert store.count == 4
    by_path = store.rows_by_path()
    assert [by_path[f"/img/{i:03d}.jpg"].id for i in range(4)] == [0, 1, 4, 5]
    np.testing.assert_allclose(store.vectors_for([by_path["/img/003.jpg"]])[5], unit_rows(2, seed=1)[1])


def test_the_live_runs_parts_survive_intermediate_commits_and_a_killed_runs_are_collected(tmp_path):
    root = tmp_path / "store"
    with write_transaction(root) as txn:
        txn.begin(FP)
        with txn.staging() as folder:
            first = write_part(folder, unit_rows(2), items(0, 2))
            second = write_part(folder, unit_rows(2, seed=1), items(2, 2))
            txn.adopt(folder, first)  # commits, which collects garbage...
            assert (folder / f"{second}.npy").exists()  # ...but not the parts of this run
            txn.adopt(folder, second)
    assert FeatureStore.open(root).count == 4
    # A killed run: a run folder nobody removed, with a part never adopted and a
    # half-written temporary.
    killed = root / STAGING_DIR / "run-killed"
    killed.mkdir(parents=True)
    write_part(killed, unit_rows(1), items(9, 1))
    (killed / ".part-x.npy.tmp-123").write_bytes(b"half")
    report = check_index(root)  # (its only problem: the synthetic model is not in the registry)
    assert len(report.problems) == 1 and len(report.leftovers) == 3 and "leftover" in report.notes[0]

    with write_transaction(root) as txn:  # the next writer's commit collects them
        store = txn.begin(FP)
        store.remove_paths(["/img/000.jpg"])
    assert not (root / STAGING_DIR).exists() and FeatureStore.open(root).leftover_files() == []


def test_a_part_moved_but_never_committed_is_a_leftover(tmp_path):
    root = tmp_path / "store"
    store = FeatureStore.create(root, FP)
    store.add_shard(unit_rows(1), items(0, 1))
    store.commit()
    with staging_run(store) as folder:
        adopt_part(store, folder, write_part(folder, unit_rows(2), items(1, 2)))
        # the writer dies here: no commit
    reopened = FeatureStore.open(root)
    assert reopened.count == 1
    assert [p.name for p in reopened.leftover_files()] == ["shard-000002.npy", "shard-000002.rows.json"]


@pytest.mark.parametrize("damage", ["truncated", "wrong dim", "items unreadable"])
def test_a_damaged_part_is_refused_before_anything_is_registered(tmp_path, damage):
    store = FeatureStore.create(tmp_path / "store", FP)
    with staging_run(store) as folder:
        if damage == "wrong dim":
            name = write_part(folder, np.eye(3, dtype=np.float32)[:2], items(0, 2))
        else:
            name = write_part(folder, unit_rows(2), items(0, 2))
        npy, items_file = folder / f"{name}.npy", folder / f"{name}.items.json"
        if damage == "truncated":
            npy.write_bytes(npy.read_bytes()[:-4])
        elif damage == "items unreadable":
            items_file.write_text("{")
        with pytest.raises(CorruptStoreError, match=name):
            adopt_part(store, folder, name)
    assert store.manifest["shards"] == [] and store.manifest["next_id"] == 0


def test_a_worker_cannot_stage_a_vector_the_store_would_refuse(tmp_path):
    with pytest.raises(ValueError, match="refusing to store 1 invalid vector"):
        write_part(tmp_path, np.array([[1, 0, 0, 0], [np.nan, 0, 0, 0]], dtype=np.float32), items(0, 2))
    assert list(tmp_path.iterdir()) == []
