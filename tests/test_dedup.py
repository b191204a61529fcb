"""``cbir dedup``: planted near-duplicates (re-encoded, resized, cropped copies among
distinct images) are grouped, best first, and no distinct pair is; ``--move-to``
lists without changing anything, ``--yes`` moves and the index follows; the report;
the measured default threshold."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED, make_image, mobilenet_weights_path, store_of_vectors
from PIL import Image
from typer.testing import CliRunner

from cbir_cli.cli import app
from cbir_cli.evaluate.copies import centre_crop
from cbir_cli.pipeline.options import ExtractOptions
from cbir_cli.pipeline.sync import index_folder
from cbir_cli.search.dedup import (
    LEGACY_DESCRIPTOR,
    MEASURED_THRESHOLDS,
    best_f1_threshold,
    connected_groups,
    default_descriptor_key,
    default_threshold,
    descriptor_key,
    find_duplicates,
)
from cbir_cli.search.searcher import Searcher
from tests.fakes import FakeBackend

# The tiny random model with the default descriptor (GeM over whole images: a random
# trunk's pooled channels are alike for every image): distinct synthetic images score
# <= 0.9960, these copies >= 0.9987.
TINY_THRESHOLD = 0.9975
N_DISTINCT = 14
ORIGINALS = (1, 4, 7, 10)


def reencoded(img: Image.Image, quality: int = 50) -> Image.Image:
    buffer = io.BytesIO()
    img.save(buffer, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def plant(folder: Path, originals: list[Image.Image], names: list[str]) -> dict[str, set[str]]:
    """Save each original (JPEG 95) and, in a sub-folder, a re-encoded (quality 50),
    a half-size and a 90 % centre-crop copy of some; returns {original: its copies}."""
    (folder / "copies").mkdir(parents=True, exist_ok=True)
    expected = {}
    for i, (img, name) in enumerate(zip(originals, names)):
        img.save(folder / name, quality=95)
        if i in ORIGINALS:
            stem = Path(name).stem
            copies = {f"copies/{stem}_q50.jpg": reencoded(img),
                      f"copies/{stem}_half.jpg": img.resize((img.width // 2, img.height // 2), Image.BILINEAR),
                      f"copies/{stem}_crop.jpg": centre_crop(img, 0.9)}
            for rel, copy in copies.items():
                copy.save(folder / rel, quality=90)
            expected[name] = set(copies)
    return expected


@pytest.fixture
def planted(tmp_path, tiny_embedder):
    """(images folder, index dir, {original: copies}) indexed with the tiny model."""
    folder, index_dir = tmp_path / "photos", tmp_path / "index"
    names = [f"img_{i:03d}.jpg" for i in range(N_DISTINCT)]
    expected = plant(folder, [make_image(i, size=(320, 240)) for i in range(N_DISTINCT)], names)
    index_folder(folder, index_dir, options=ExtractOptions(workers=0), embedder=tiny_embedder)
    return folder, index_dir, expected


def relative_groups(result, folder: Path) -> list[list[str]]:
    return [[str(Path(m.path).relative_to(folder.resolve())) for m in g.members] for g in result.groups]


@pytest.mark.parametrize("backend", [None, FakeBackend], ids=["faiss", "fake"])
def test_planted_duplicates_are_grouped_best_first_and_distinct_images_are_not(planted, backend):
    folder, index_dir, expected = planted
    searcher = Searcher.open(index_dir, backend=backend() if backend else None)
    result = find_duplicates(searcher, TINY_THRESHOLD)
    groups = relative_groups(result, folder)
    # Exactly the planted groups, the original (largest picture; larger file than
    # its re-encode of the same size) first.
    assert sorted(groups) == sorted([name, *sorted(copies, key=lambda c: ("q50" not in c, "crop" not in c))]
                                    for name, copies in expected.items())
    assert result.duplicates == 3 * len(ORIGINALS) and result.images == N_DISTINCT + 3 * len(ORIGINALS)
    for group in result.groups:
        assert (group.best.width, group.best.height) == (320, 240)
        assert next(m.score_to_best for m in group.members) == pytest.approx(1.0, abs=1e-5)
        ids = {m.id for m in group.members}
        # Every linked pair is in the group, scores at or above the threshold, best first.
        assert group.links and all(a in ids and b in ids and a < b and s >= TINY_THRESHOLD for a, b, s in group.links)
        assert [s for _, _, s in group.links] == sorted((s for _, _, s in group.links), reverse=True)
        # The links connect the whole group.
        assert connected_groups(np.array([a for a, _, _ in group.links]),
                                np.array([b for _, b, _ in group.links])) == [sorted(ids)]


def test_connected_groups_follow_chains():
    assert connected_groups(np.array([1, 2, 7, 9]), np.array([2, 3, 8, 1])) == [[1, 2, 3, 9], [7, 8]]
    assert connected_groups(np.zeros(0, np.int64), np.zeros(0, np.int64)) == []


def test_cli_json_and_csv_list_every_group_and_pair(planted):
    _folder, index_dir, expected = planted
    runner = CliRunner()
    out = runner.invoke(app, ["dedup", "--index", str(index_dir), "--threshold", str(TINY_THRESHOLD), "--json"])
    assert out.exit_code == 0, out.output
    payload = json.loads(out.stdout)
    assert payload["threshold"] == TINY_THRESHOLD and len(payload["groups"]) == len(expected)
    for group in payload["groups"]:
        assert group["best"] == group["members"][0]["id"] and len(group["members"]) == 4
        assert {p["a"] for p in group["pairs"]} | {p["b"] for p in group["pairs"]} == \
            {m["id"] for m in group["members"]}

    out = runner.invoke(app, ["dedup", "--index", str(index_dir), "--threshold", str(TINY_THRESHOLD), "--csv"])
    assert out.exit_code == 0, out.output
    rows = list(csv.DictReader(io.StringIO(out.stdout)))
    assert len(rows) == 4 * len(expected) and sum(r["keep"] == "1" for r in rows) == len(expected)
    assert {Path(r["path"]).name for r in rows if r["keep"] == "1"} == set(expected)

    bad = runner.invoke(app, ["dedup", "--index", str(index_dir), "--json", "--csv"])
    assert bad.exit_code == 1 and "choose one of --json and --csv" in bad.output


def test_move_to_dry_run_changes_nothing_and_yes_moves_and_the_index_follows(planted, tmp_path):
    folder, index_dir, expected = planted
    runner = CliRunner()
    manifest = (index_dir / "manifest.json").read_bytes()
    files_before = sorted(p.relative_to(folder) for p in folder.rglob("*.jpg"))
    args = ["dedup", "--index", str(index_dir), "--threshold", str(TINY_THRESHOLD)]
    aside = tmp_path / "aside"

    dry = runner.invoke(app, [*args, "--move-to", str(aside)])
    assert dry.exit_code == 0, dry.output
    assert "dry run: 12 files would move" in dry.output and "would move" in dry.output
    assert sorted(p.relative_to(folder) for p in folder.rglob("*.jpg")) == files_before
    assert (index_dir / "manifest.json").read_bytes() == manifest and not aside.exists()

    # A duplicate that changed since it was indexed stays where it is.
    changed = folder / "copies" / "img_004_half.jpg"
    make_image(99, size=(160, 120)).save(changed, quality=90)
    moved = runner.invoke(app, [*args, "--move-to", str(aside), "--yes", "--json"])
    assert moved.exit_code == 0, moved.output
    plan = json.loads(moved.stdout)["move"]
    assert plan["dry_run"] is False and len(plan["moved"]) == 11
    assert plan["skipped"] == [{"path": str(changed.resolve()), "reason": "changed since it was indexed"}]
    moved_rel = sorted(str(Path(m["from"]).relative_to(folder.resolve())) for m in plan["moved"])
    assert moved_rel == sorted(c for copies in expected.values() for c in copies
                               if c != "copies/img_004_half.jpg")
    for rel in moved_rel:  # relative paths kept below the destination
        assert (aside / rel).is_file() and not (folder / rel).exists()
    assert changed.is_file() and all((folder / name).is_file() for name in expected)

    # The index follows in the same commit: moved rows gone, saved search index current.
    searcher = Searcher.open(index_dir)
    assert searcher.count == N_DISTINCT + 1
    assert not any(r.path.endswith(tuple(moved_rel)) for r in searcher.rows)
    check = runner.invoke(app, ["check", "--index", str(index_dir), "--json"])
    assert check.exit_code == 0 and json.loads(check.stdout)["search_index"] == "current", check.output
    # Left: the changed file, whose stored vector is still the duplicate's until it is re-indexed.
    again = json.loads(runner.invoke(app, [*args, "--json"]).stdout)["groups"]
    assert [[Path(m["path"]).name for m in g["members"]] for g in again] == [["img_004.jpg", "img_004_half.jpg"]]


def test_move_to_refuses_a_folder_inside_the_indexed_one(planted):
    folder, index_dir, _ = planted
    out = CliRunner().invoke(app, ["dedup", "--index", str(index_dir), "--threshold", str(TINY_THRESHOLD),
                                   "--move-to", str(folder / "dups"), "--yes"])
    assert out.exit_code == 1 and "outside the indexed folder" in out.output
    assert not (folder / "dups").exists()


def test_report_shows_every_group_with_thumbnails_and_scores(planted, tmp_path):
    _folder, index_dir, expected = planted
    report = tmp_path / "report"
    out = CliRunner().invoke(app, ["dedup", "--index", str(index_dir), "--threshold", str(TINY_THRESHOLD),
                                   "--report", str(report)])
    assert out.exit_code == 0, out.output
    page = (report / "index.html").read_text()
    assert page.count("<h3>group ") == len(expected) and page.count("class='keep'") == len(expected)
    for name in (s.split("'")[0] for s in page.split("src='thumbs/")[1:]):
        assert (report / "thumbs" / name).is_file()
    from cbir_cli.imageio.thumbnails import CAPTION_HEIGHT, FRAME, GAP
    from cbir_cli.search.gallery import THUMB

    side = THUMB + 2 * FRAME  # one row per group: the kept image, then its three copies
    assert Image.open(report / "groups.png").size == (4 * side + 5 * GAP,
                                                      len(expected) * (side + CAPTION_HEIGHT + GAP) + GAP)


def test_default_threshold_is_looked_up_by_model_and_descriptor():
    legacy = {"model": "mobilenet_v2", "weights": "x", "dim": 1280, "preprocessing": {}}
    assert descriptor_key(legacy) == LEGACY_DESCRIPTOR
    choice = default_threshold(legacy)
    assert choice.measured is MEASURED_THRESHOLDS["mobilenet_v2", LEGACY_DESCRIPTOR] and choice.note is None
    gem = {**legacy, "descriptor": {"pooling": "gem", "gem_p": 3.0, "input": "full", "scales": [1.0, 1.4]}}
    assert descriptor_key(gem) == "gem3-full-1+1.4" == default_descriptor_key()
    default = default_threshold(gem)
    assert default.measured is MEASURED_THRESHOLDS["mobilenet_v2", "gem3-full-1+1.4"] and default.note is None
    assert default.threshold != choice.threshold  # measured again for the new descriptor
    # Unmeasured: the same descriptor's measurement stands in, else the default descriptor's.
    resnet = default_threshold({**gem, "model": "resnet50"})
    assert resnet.measured is None and resnet.threshold == default.threshold
    assert "resnet50" in resnet.note and "bench/dedup_threshold.py" in resnet.note
    assert default_threshold({**legacy, "model": "resnet50"}).threshold == choice.threshold
    mac = default_threshold({**legacy, "descriptor": {"pooling": "mac", "input": "crop", "scales": [1.0]}})
    assert mac.measured is None and mac.threshold == default.threshold and "mac-crop-1" in mac.note


def test_a_clip_index_is_not_taken_for_the_legacy_cnn_descriptor():
    # A CLIP index records its family and no descriptor (its vectors are CLIP's own
    # projection): its note must not call that the CNNs' GAP-over-a-centre-crop, nor
    # borrow that descriptor's threshold.
    from cbir_cli.models.clip_config import FAMILY

    clip = {"model": "clip_vit_b32", "weights": "x", "dim": 512, "preprocessing": {}, "family": FAMILY,
            "pretrained": "openai"}
    assert descriptor_key(clip) == "clip-own"
    choice = default_threshold(clip)
    default = MEASURED_THRESHOLDS["mobilenet_v2", default_descriptor_key()]
    assert choice.measured is None and choice.threshold == default.threshold
    assert LEGACY_DESCRIPTOR not in choice.note and "clip_vit_b32" in choice.note
    assert f"{default.threshold:g}" in choice.note and default_descriptor_key() in choice.note


def test_best_f1_threshold_separates_scores():
    positive = np.array([0.99, 0.97, 0.95, 0.93, 0.80])
    negative = np.concatenate([np.linspace(0.1, 0.85, 1000), [0.94]])
    best = best_f1_threshold(positive, negative, step=0.01)
    # >= 0.93 keeps 4 of 5 copies and one distinct pair (0.94): F1 = 0.8.
    assert best.threshold == pytest.approx(0.93) and best.true_pairs == 4 and best.false_pairs == 1
    assert best.precision == pytest.approx(0.8) and best.recall == pytest.approx(0.8)


@pytest.mark.real
def test_real_model_groups_planted_copies_of_photos_at_the_default_threshold(tmp_path):
    """MobileNetV2 at its measured default threshold, on Oxford-17 photos (one per
    class, so no two are the same picture) with planted copies."""
    if mobilenet_weights_path() is None:
        pytest.skip("MobileNetV2 weights are not installed (cbir weights install mobilenet_v2)")
    flowers = SHARED / "datasets" / "oxford17flowers"
    if not flowers.is_dir():
        pytest.skip(f"{flowers} not found")
    photos = [sorted(d.glob("*.jpg"))[0] for d in sorted(p for p in flowers.iterdir() if p.is_dir())]
    folder = tmp_path / "photos"
    names = [p.name for p in photos]
    expected = plant(folder, [Image.open(p).convert("RGB") for p in photos], names)
    index_dir = tmp_path / "index"
    index_folder(folder, index_dir, model="mobilenet_v2", options=ExtractOptions(workers=0))
    searcher = Searcher.open(index_dir)
    result = find_duplicates(searcher, default_threshold(searcher.store.fingerprint).threshold)
    assert sorted(sorted(g) for g in relative_groups(result, folder)) == \
        sorted(sorted([name, *copies]) for name, copies in expected.items())


def test_a_chain_of_look_alikes_is_one_group_but_only_duplicates_of_the_kept_image_move(tmp_path):
    """A ~ B ~ C with A and C below the threshold: one group (connected components),
    but --move-to moves only B, a duplicate of the image kept (A, the largest)."""
    from cbir_cli.pipeline.dedup_moves import plan_moves

    folder = tmp_path / "photos"
    folder.mkdir()
    angles = {"a.jpg": (0.0, (320, 240)), "b.jpg": (0.26, (300, 200)), "c.jpg": (0.52, (200, 100)),
              "far.jpg": (1.5, (320, 240))}
    for i, (name, (_, size)) in enumerate(angles.items()):
        make_image(i, size=size).save(folder / name)
    vectors = np.asarray([[np.cos(a), np.sin(a), 0, 0] for a, _ in angles.values()], dtype=np.float32)
    store_of_vectors(tmp_path / "index", vectors, [str((folder / name).resolve()) for name in angles])
    searcher = Searcher.open(tmp_path / "index")
    result = find_duplicates(searcher, 0.95)  # cos 0.26 rad = 0.966, cos 0.52 rad = 0.868
    assert [[Path(m.path).name for m in g.members] for g in result.groups] == [["a.jpg", "b.jpg", "c.jpg"]]
    plan = plan_moves(searcher, result, tmp_path / "aside")
    assert [Path(m.source).name for m in plan.moves] == ["b.jpg"]
    assert [(Path(p).name, "only through other images" in r) for p, r in plan.skipped] == [("c.jpg", True)]
