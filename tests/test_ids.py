"""Ids are never reused: a manifest whose ``next_id`` was lowered (still valid JSON
of the right shape) is repaired by every writer before it gives out ids, found by
``cbir check`` and fixed by ``cbir check --repair`` (issue 20, item 3)."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import make_image
from typer.testing import CliRunner

from cbir_cli.cli import app
from cbir_cli.pipeline.options import ExtractOptions
from cbir_cli.pipeline.sync import index_folder
from cbir_cli.search.check import check_index
from cbir_cli.store.feature_store import FeatureStore
from cbir_cli.store.transaction import write_transaction

runner = CliRunner()
OPTIONS = ExtractOptions(workers=0, batch_size=2, shard_size=2)


def lower_next_id(index_dir: Path, value: int = 0) -> None:
    manifest_path = index_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["next_id"] = value
    manifest_path.write_text(json.dumps(manifest))


def all_ids(index_dir: Path) -> list[int]:
    return [r.id for r in FeatureStore.open(index_dir).live_rows()]


def cli(*args: str):
    return runner.invoke(app, [*args])


def test_lowered_next_id_cli_end_to_end(image_folder, tmp_path):
    folder, index_dir = image_folder(5), tmp_path / "index"
    base = ["--index", str(index_dir)]
    assert cli("index", str(folder), *base, "--model", "test_tiny", "--workers", "0").exit_code == 0
    lower_next_id(index_dir)

    check = cli("check", *base, "--json")
    assert check.exit_code == 1
    report = json.loads(check.stdout)
    assert any("next_id" in p for p in report["problems"]), report["problems"]

    # A writer repairs it before it gives out ids: no collision.
    make_image(99).save(folder / "new.jpg", quality=90)
    result = cli("index", str(folder), *base, "--model", "test_tiny", "--workers", "0")
    assert result.exit_code == 0, result.output
    assert "next_id" in result.output  # said what it repaired
    ids = all_ids(index_dir)
    assert len(ids) == len(set(ids)) == 6
    query = cli("query", str(folder / "new.jpg"), *base, "--no-rerank", "--json", "-k", "1")
    assert query.exit_code == 0, query.output
    assert Path(json.loads(query.stdout)[0]["results"][0]["path"]).name == "new.jpg"
    assert cli("check", *base).exit_code == 0


def test_check_repair_fixes_a_lowered_next_id(image_folder, tmp_path):
    folder, index_dir = image_folder(5), tmp_path / "index"
    base = ["--index", str(index_dir)]
    assert cli("index", str(folder), *base, "--model", "test_tiny", "--workers", "0").exit_code == 0
    (folder / "img_004.jpg").unlink()  # a tombstoned row keeps its id: it is never reused
    assert cli("index", str(folder), *base, "--model", "test_tiny", "--workers", "0").exit_code == 0
    lower_next_id(index_dir, 2)
    repaired = cli("check", *base, "--repair")
    assert repaired.exit_code == 0, repaired.output
    assert "next_id" in repaired.output
    assert json.loads((index_dir / "manifest.json").read_text())["next_id"] == 5  # 1 + id 4 (removed)
    assert cli("check", *base).exit_code == 0
    assert cli("check", *base, "--repair").exit_code == 0


def test_check_finds_it_from_the_manifest_alone(image_folder, tmp_path, tiny_embedder):
    """New shards record their highest id; check compares it with next_id before
    reading any rows file, and verifies the recorded value against the rows."""
    folder, index_dir = image_folder(4), tmp_path / "index"
    index_folder(folder, index_dir, embedder=tiny_embedder, options=OPTIONS)
    manifest = json.loads((index_dir / "manifest.json").read_text())
    assert [s["max_id"] for s in manifest["shards"]] == [1, 3]
    lower_next_id(index_dir, 3)
    for rows in (index_dir / "shards").glob("*.rows.json"):
        rows.unlink()  # no rows to read: only the manifest can tell
    assert any("next_id 3" in p for p in check_index(index_dir).problems)


def test_every_writer_path_repairs_before_writing(image_folder, tmp_path, tiny_embedder):
    """The transaction (local sync, Ray adoption, dedup moves all begin through it)."""
    import numpy as np

    folder, index_dir = image_folder(3), tmp_path / "index"
    index_folder(folder, index_dir, embedder=tiny_embedder, options=OPTIONS)
    lower_next_id(index_dir)
    store = FeatureStore.open(index_dir)
    vector = np.zeros((1, store.dim), dtype=np.float32)
    vector[0, 0] = 1.0
    with write_transaction(index_dir) as txn:
        txn.begin(store.fingerprint)
        assert any("next_id" in note for note in txn.repairs)
        txn.add(vector, [("/elsewhere/x.jpg", "0" * 64, 1)])
    ids = all_ids(index_dir)
    assert len(ids) == len(set(ids)) == 4 and max(ids) == 3


def test_a_wrong_recorded_max_id_is_found_and_corrected(image_folder, tmp_path, tiny_embedder):
    folder, index_dir = image_folder(4), tmp_path / "index"
    index_folder(folder, index_dir, embedder=tiny_embedder, options=OPTIONS)
    manifest_path = index_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["shards"][0]["max_id"] = 10**6
    manifest_path.write_text(json.dumps(manifest))
    problems = check_index(index_dir).problems
    assert any("the manifest says 1000000" in p for p in problems), problems
    assert cli("check", "--index", str(index_dir), "--repair").exit_code == 0
    assert check_index(index_dir).ok
    assert json.loads(manifest_path.read_text())["next_id"] == 4  # the rows are the truth, not the key
