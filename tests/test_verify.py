"""Geometric verification of copies (local features + a similarity transform): a
quarter-area crop and a greyscale copy are verified as the original, different
photos are not -- not even two photos of the same kind of flower; ``cbir dedup``
groups a greyscale copy the global descriptor alone scores below its threshold;
the copies protocol moves verified candidates first."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import SHARED, draw_random_shapes, make_image
from PIL import Image
from typer.testing import CliRunner

from cbir_cli.cli import app
from cbir_cli.evaluate.copies import centre_crop, distort
from cbir_cli.imageio.local_features import extract
from cbir_cli.pipeline.options import ExtractOptions
from cbir_cli.pipeline.sync import index_folder
from cbir_cli.search.dedup import find_duplicates
from cbir_cli.search.searcher import Searcher
from cbir_cli.search.verify import MIN_INLIERS, Verification, verified_first, verify, verify_ranked

OXFORD = SHARED / "datasets" / "oxford17flowers"


def textured(seed: int, size: tuple[int, int] = (480, 360)) -> Image.Image:
    """A synthetic photo with many small shapes: corners and blobs for keypoints."""
    img = make_image(seed, size)
    draw_random_shapes(img, np.random.default_rng(seed + 1000), count=120, min_side=6, max_side=(40, 40))
    return img


@pytest.mark.parametrize("kind", ["crop_side50", "gray", "resize50", "rot10", "border10", "text"])
def test_copies_of_a_synthetic_photo_are_verified(kind):
    original = textured(3)
    check = verify(extract(distort(original, kind, 0)), extract(original))
    assert check.same_picture, check
    assert check.inliers >= MIN_INLIERS


def test_different_synthetic_photos_are_not_verified():
    check = verify(extract(textured(3)), extract(textured(4)))
    assert not check.same_picture, check


@pytest.mark.parametrize("kind", ["resize50", "gray", "crop_side75"])
def test_a_mirrored_copy_is_verified_through_the_mirrored_features(kind):
    from PIL import ImageOps

    original = textured(3)
    copy = ImageOps.mirror(distort(original, kind, 0))
    check = verify(extract(copy), extract(original))
    assert check.same_picture and check.mirrored, check
    assert not verify(extract(copy), extract(original), mirror=False).same_picture  # SIFT alone: not a copy
    assert not verify(extract(original), extract(original)).mirrored  # upright first


def test_mirrored_features_are_those_detected_on_the_flipped_picture():
    from PIL import ImageOps

    from cbir_cli.imageio.local_features import mirrored

    photo = textured(7)
    flipped = mirrored(extract(photo))
    detected = extract(ImageOps.mirror(photo))
    check = verify(flipped, detected, mirror=False)
    assert check.same_picture and check.inliers >= 0.7 * len(detected) and check.residual < 0.1, check
    assert mirrored(extract(photo, "orb")) is None


def test_a_different_photo_or_its_mirror_is_not_verified():
    from PIL import ImageOps

    mine = extract(textured(3))
    for other in (textured(4), ImageOps.mirror(textured(4))):
        check = verify(extract(other), mine)
        assert not check.same_picture and not check.mirrored, check


def test_ratio_test_matches_are_those_of_a_full_sort():
    from cbir_cli.search.verify import RATIO, _matches

    a, b = extract(textured(3)), extract(distort(textured(3), "crop_side75", 0))
    src, dst = _matches(a, b, RATIO)
    sims = a.descriptors @ b.descriptors.T
    order = np.argsort(-sims, axis=1)
    two = np.sqrt(np.maximum(0.0, 2.0 - 2.0 * np.take_along_axis(sims, order[:, :2], axis=1)))
    good = two[:, 0] < RATIO * two[:, 1]
    assert good.sum() > MIN_INLIERS
    np.testing.assert_array_equal(src, a.points[good])
    np.testing.assert_array_equal(dst, b.points[order[good, 0]])


def test_verified_first_moves_verified_candidates_ahead_in_search_order():
    yes, more, no = Verification(50, 40, 0.2), Verification(90, 80, 0.2), Verification(50, 5, 1.5)
    assert verified_first([7, 8, 9, 10], [no, yes, no, more]) == [8, 10, 7, 9]


def test_verify_ranked_uses_each_querys_features_and_candidates(monkeypatch):
    import cbir_cli.search.verify as verify_module

    def fake_verify(query, candidate):  # query q's copy is gallery item 10 + q
        return Verification(100, 90, 0.1) if candidate == 10 + query else Verification(100, 2, 2.0)

    monkeypatch.setattr(verify_module, "verify", fake_verify)
    ranked = np.array([[5, 6, 10, 7], [11, 3, -1, -1], [4, 5, 6, 12]])
    out, found = verify_ranked(ranked, lambda q: q, lambda k: k, candidates=3)
    # Query 2's copy is ranked 4th: beyond the 3 candidates, so it stays there.
    assert out.tolist() == [[10, 5, 6, 7], [11, 3, -1, -1], [4, 5, 6, 12]] and found == 2


@pytest.mark.real
def test_oxford_crop_and_grey_copy_verified_two_similar_flowers_rejected():
    daffodils = sorted((OXFORD / "01_daffodil").glob("*.jpg"))
    if len(daffodils) < 2:
        pytest.skip(f"Oxford-17 not found under {OXFORD}")
    photo = Image.open(daffodils[0]).convert("RGB")
    from PIL import ImageOps

    other = Image.open(daffodils[1]).convert("RGB")  # another daffodil photo: similar, not a copy
    mine = extract(photo)
    assert verify(extract(centre_crop(photo, 0.5)), mine).same_picture
    assert verify(extract(photo.convert("L").convert("RGB")), mine).same_picture
    assert verify(extract(ImageOps.mirror(centre_crop(photo, 0.75))), mine).mirrored
    assert not verify(extract(other), mine).same_picture
    assert not verify(extract(ImageOps.mirror(other)), mine).same_picture


def test_dedup_groups_a_grey_copy_the_global_descriptor_scores_below_its_threshold(tmp_path, tiny_embedder):
    folder, index_dir = tmp_path / "photos", tmp_path / "index"
    folder.mkdir()
    # The random test model ranks the grey copy last among its original's 6
    # neighbours: beyond the 5 nearest; the colour-blind second look finds it.
    for i in range(6):
        textured(10 + i).save(folder / f"img_{i}.png")
    textured(12).convert("L").convert("RGB").save(folder / "img_2_grey.png")
    index_folder(folder, index_dir, options=ExtractOptions(workers=0), embedder=tiny_embedder)
    searcher = Searcher.open(index_dir)
    grey = searcher.id_of_path(folder / "img_2_grey.png")
    original = searcher.id_of_path(folder / "img_2.png")
    cosine = float(searcher.backend.vectors(np.array([grey]))[0] @ searcher.backend.vectors(np.array([original]))[0])
    # The tiny model scores distinct synthetic images <= 0.996 (test_dedup.py); the
    # grey copy scores below the threshold too: the global descriptor alone misses it.
    threshold = 0.9975
    assert cosine < threshold
    assert find_duplicates(searcher, threshold).groups == []
    out = CliRunner().invoke(app, ["dedup", "--index", str(index_dir), "--threshold", str(threshold),
                                   "--json"])
    assert out.exit_code == 0, out.output
    groups = [{m["id"] for m in g["members"]} for g in json.loads(out.stdout)["groups"]]
    assert groups == [{grey, original}]
    out = CliRunner().invoke(app, ["dedup", "--index", str(index_dir), "--threshold", str(threshold),
                                   "--no-verify", "--json"])
    assert out.exit_code == 0 and {grey, original} not in [{m["id"] for m in g["members"]}
                                                             for g in json.loads(out.stdout)["groups"]]


def test_query_verify_puts_the_original_of_a_crop_first(tmp_path, tiny_embedder):
    folder, index_dir = tmp_path / "photos", tmp_path / "index"
    folder.mkdir()
    for i in range(4):
        textured(20 + i).save(folder / f"img_{i}.png")
    index_folder(folder, index_dir, options=ExtractOptions(workers=0), embedder=tiny_embedder)
    query = tmp_path / "crop.png"
    centre_crop(textured(22).convert("L").convert("RGB"), 0.5).save(query)  # grey and a quarter of the area
    out = CliRunner().invoke(app, ["query", str(query), "--index", str(index_dir), "-k", "1", "--verify", "--json"])
    assert out.exit_code == 0, out.output
    answer = json.loads(out.stdout)[0]
    original = Searcher.open(index_dir).id_of_path(folder / "img_2.png")
    assert answer["verified"] == [original]
    assert [(r["rank"], r["id"]) for r in answer["results"]] == [(1, original)]


def test_grey_signature_is_colour_blind_and_detects_grey_pictures():
    from cbir_cli.imageio.grey_signature import grey_signature

    photo = textured(5)
    mine, mine_grey = grey_signature(photo)
    copy, copy_grey = grey_signature(photo.convert("L").convert("RGB"))
    other, _ = grey_signature(textured(6))
    assert copy_grey and not mine_grey
    assert float(mine @ copy) > 0.99 > float(mine @ other)


def test_copies_protocol_verifies_candidates_crops_and_grey_copies_find_their_original(tmp_path):
    from cbir_cli.evaluate.copy_detection import CopyProtocol, evaluate_copies
    from cbir_cli.evaluate.run import EvaluationOptions

    root = tmp_path / "photos"
    root.mkdir()
    for i in range(5):  # the random test model ranks anything anywhere: all 5 are candidates
        textured(30 + i).save(root / f"p{i}.png")
    options = EvaluationOptions(model="test_tiny", features_dir=tmp_path / "feats",
                                extract=ExtractOptions(workers=0, progress=False))
    kinds = ("crop_side50", "gray")
    plain = evaluate_copies(root, options, CopyProtocol(4, 0, kinds, verify=0)).results[0]
    verified = evaluate_copies(root, options, CopyProtocol(4, 0, kinds)).results[0]
    assert plain.verification is None
    assert verified.verification["verified_pairs"] >= 8 and verified.as_dict()["verification"]["candidates"] == 20
    assert verified.scores.top1 == {"crop_side50": 1.0, "gray": 1.0}
    assert all(verified.scores.top1[k] >= plain.scores.top1[k] for k in kinds)
