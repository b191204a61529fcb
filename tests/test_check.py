"""`cbir check` finds every kind of damage, and opening a damaged index fails
loudly instead of serving an empty or partial one."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cbir_cli.cli import app
from cbir_cli.errors import CbirError, CorruptStoreError
from cbir_cli.pipeline.options import ExtractOptions
from cbir_cli.pipeline.sync import index_folder
from cbir_cli.search.check import check_index
from cbir_cli.search.searcher import Searcher
from cbir_cli.store.feature_store import FeatureStore

OPTIONS = ExtractOptions(workers=0, batch_size=2, shard_size=2)
N_IMAGES = 6
REPAIR = ("repair with `cbir check --repair`, then `cbir index FOLDER` embeds again what was lost "
          "(or start over with `cbir index FOLDER --rebuild`)")


@pytest.fixture
def built(image_folder, tmp_path, tiny_embedder) -> Path:
    """A healthy index of 6 images in 3 shards, with its saved search index."""
    index_dir = tmp_path / "index"
    index_folder(image_folder(N_IMAGES), index_dir, embedder=tiny_embedder, options=OPTIONS)
    return index_dir


def flip_byte(path: Path, offset: int = -5) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def edit_manifest(index_dir: Path, change: Callable[[dict], None]) -> None:
    path = index_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def first_shard(index_dir: Path) -> Path:
    return index_dir / "shards" / "shard-000001"


# name -> (damage, text the problem line must contain)
DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "truncated shard": (lambda d: first_shard(d).with_suffix(".npy").write_bytes(
        first_shard(d).with_suffix(".npy").read_bytes()[:100]), "shard-000001.npy: 100 bytes, manifest says"),
    "deleted shard": (lambda d: first_shard(d).with_suffix(".npy").unlink(), "shard-000001.npy: missing"),
    "deleted rows": (lambda d: Path(f"{first_shard(d)}.rows.json").unlink(), "shard-000001.rows.json: missing"),
    "edited rows": (lambda d: Path(f"{first_shard(d)}.rows.json").write_text(
        Path(f"{first_shard(d)}.rows.json").read_text().replace("img_000", "img_00X")), "checksum mismatch"),
    "garbage manifest": (lambda d: (d / "manifest.json").write_text('{"format": 1, "shards'),
                         "manifest.json: unreadable"),
    "manifest count": (lambda d: edit_manifest(d, lambda m: m.update(count=m["count"] + 1)),
                       f"manifest count {N_IMAGES + 1} but its shards hold {N_IMAGES} live rows"),
    "manifest tombstone": (lambda d: edit_manifest(d, lambda m: m["shards"][0].update(removed=[7])),
                           "tombstones out of range"),
    "damaged search index": (lambda d: flip_byte(d / "index" / "index.faiss"), "index.faiss: checksum mismatch"),
}


def test_a_healthy_index_checks_ok(built):
    report = check_index(built)
    assert report.ok and report.problems == [] and report.repair is None
    assert (report.count, report.shards, report.model, report.dim, report.search_index) == (
        N_IMAGES, 3, "test_tiny", 256, "current")
    result = CliRunner().invoke(app, ["check", "--index", str(built)])
    assert result.exit_code == 0 and "search index current" in result.output


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damage_is_reported_one_line_each_and_opening_fails_loudly(built, damage, tiny_embedder):
    do_damage, expected = DAMAGE[damage]
    do_damage(built)

    report = check_index(built)
    assert not report.ok and report.repair == "rebuild"  # the library names the remedy; the CLI words it
    assert any(expected in p for p in report.problems), report.problems

    result = CliRunner().invoke(app, ["check", "--index", str(built)])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert [ln for ln in lines if ln.startswith("problem: ")] == [f"problem: {p}" for p in report.problems]
    assert lines[-1].endswith(REPAIR)
    as_json = json.loads(CliRunner().invoke(app, ["check", "--index", str(built), "--json"]).stdout)
    assert as_json["ok"] is False and as_json["problems"] == report.problems and as_json["repair"] == REPAIR

    with pytest.raises(CorruptStoreError):
        # Opening checks files and sizes; a rows file is read (checksum-verified)
        # when a result first names one of its rows: either way nothing is served.
        searcher = Searcher.open(built, embedder=tiny_embedder)
        searcher.search_paths([built.parent / "images" / "img_001.jpg"], k=N_IMAGES)
    query = CliRunner().invoke(app, ["query", str(built.parent / "images" / "img_001.jpg"), "--index", str(built)])
    assert query.exit_code == 1 and query.stderr.startswith("error: ") and len(query.stderr.splitlines()) == 1


def test_a_flipped_bit_in_a_shard_is_found_and_never_served(built, tiny_embedder):
    flip_byte(first_shard(built).with_suffix(".npy"))
    assert any("shard-000001.npy: unreadable shard (checksum mismatch" in p for p in check_index(built).problems)
    # The saved index is intact and is what queries read; once it is gone, the
    # shards are read (and verified) instead, and the damage stops the open.
    (built / "index" / "index.faiss").unlink()
    (built / "index" / "index.json").unlink()
    with pytest.raises(CorruptStoreError, match="checksum mismatch"):
        Searcher.open(built, embedder=tiny_embedder)
    with pytest.raises(CorruptStoreError):
        FeatureStore.open(built).load_vectors()


def test_stale_search_index_and_leftovers_are_notes_not_problems(built, tiny_embedder):
    store = FeatureStore.open(built)
    store.remove_paths([store.live_rows()[0].path])
    store.commit()  # the saved index is now one generation behind
    (built / "shards" / ".shard-000009.npy.tmp-123").write_bytes(b"half a write")
    report = check_index(built)
    assert report.ok, report.problems
    assert report.search_index == "stale" and len(report.leftovers) == 1
    # Queries serve the committed state, in memory.
    assert Searcher.open(built, embedder=tiny_embedder).count == N_IMAGES - 1


def test_no_index_is_a_problem_and_an_empty_index_is_not_served(tmp_path, tiny_embedder):
    report = check_index(tmp_path / "nothing")
    assert not report.ok and "no index here" in report.problems[0]
    result = CliRunner().invoke(app, ["check", "--index", str(tmp_path / "nothing")])
    assert result.exit_code == 1

    # An index whose every image was removed is committed, and empty.
    empty = FeatureStore.create(tmp_path / "empty", tiny_embedder.fingerprint())
    empty.add_shard(np.ones((1, 256), dtype=np.float32) / 16.0, [("/gone.jpg", "0" * 64, 1)])
    empty.commit()
    empty.remove_paths(["/gone.jpg"])
    empty.commit()
    with pytest.raises(CbirError, match="the index is empty"):
        Searcher.open(tmp_path / "empty", embedder=tiny_embedder)
