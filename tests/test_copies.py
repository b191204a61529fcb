"""The copy-detection protocol: its pieces (originals, distortions, twins, scoring)
by hand, and `cbir evaluate --dataset copies` end to end with the tiny model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import make_image
from PIL import Image
from typer.testing import CliRunner

from cbir_cli.cli import app
from cbir_cli.errors import CbirError
from cbir_cli.evaluate.copies import (
    DISTORTIONS,
    copy_queries,
    distort,
    original_ranks,
    pick_originals,
    score_copies,
    twin_sets,
)


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch_home = os.environ.get("TORCH_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "torch")
    monkeypatch.setenv("TORCH_HOME", os.path.expanduser(torch_home))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))


def test_originals_are_seeded_sorted_and_capped_and_copies_are_distortion_major():
    a, b = pick_originals(100, 10, seed=3), pick_originals(100, 10, seed=3)
    np.testing.assert_array_equal(a, b)
    assert list(a) == sorted(a) and len(set(a)) == 10
    assert not np.array_equal(a, pick_originals(100, 10, seed=4))
    assert len(pick_originals(5, 10)) == 5
    queries = copy_queries(100, 10, seed=3, kinds=("hflip", "gray"))
    assert [q.kind for q in queries] == ["hflip"] * 10 + ["gray"] * 10
    assert [q.original for q in queries[:10]] == list(a) == [q.original for q in queries[10:]]
    assert queries[0].seed == 3 * 100_000 + queries[0].original
    with pytest.raises(CbirError, match="unknown distortion"):
        copy_queries(100, kinds=("sepia",))
    with pytest.raises(CbirError, match="at least 2 images"):
        pick_originals(1)


def test_distortions_change_the_image_as_documented():
    img = make_image(1, (200, 100))
    sizes = {kind: distort(img, kind, seed=7).size for kind in DISTORTIONS}
    assert sizes["resize50"] == (100, 50) and sizes["rot90"] == (100, 200)
    assert sizes["crop_side50"] == (100, 50) and sizes["crop_side75"] == (150, 75)
    assert sizes["crop_area50"] == (141, 71) and sizes["border10"] == (240, 120)
    for kind in ("jpeg20", "hflip", "rot10", "gray", "jitter", "blur2", "text"):
        assert sizes[kind] == (200, 100), kind
    gray = np.asarray(distort(img, "gray", 0)).astype(int)
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    # The centre crop keeps the centre.
    np.testing.assert_array_equal(np.asarray(distort(img, "crop_side50", 0)), np.asarray(img)[25:75, 50:150])
    np.testing.assert_array_equal(np.asarray(distort(img, "hflip", 0)), np.asarray(img)[:, ::-1])
    # Seeded parts are reproducible, and differ between seeds.
    for kind in ("border10", "text"):
        assert np.array_equal(np.asarray(distort(img, kind, 1)), np.asarray(distort(img, kind, 1)))
        assert not np.array_equal(np.asarray(distort(img, kind, 1)), np.asarray(distort(img, kind, 2)))
    for kind in DISTORTIONS:
        assert not np.array_equal(np.asarray(distort(img, kind, 0).resize(img.size)), np.asarray(img)), kind


def test_twins_are_same_size_near_identical_files(tmp_path: Path):
    make_image(1).save(tmp_path / "a.jpg", quality=95)
    make_image(1).save(tmp_path / "a_again.jpg", quality=80)  # the same picture, re-encoded
    make_image(2).save(tmp_path / "b.jpg", quality=95)  # same size, another picture
    make_image(1, (170, 128)).save(tmp_path / "a_bigger.jpg", quality=95)  # another size
    paths = [str(tmp_path / n) for n in ("a.jpg", "a_again.jpg", "b.jpg", "a_bigger.jpg")]
    twins = twin_sets(paths, [0, 2, 3])
    assert list(twins[0]) == [0, 1] and list(twins[2]) == [2] and list(twins[3]) == [3]


def test_ranks_and_scores_by_hand():
    ranked = np.array([[4, 1, 2], [0, 9, 3], [5, 6, -1], [7, 3, 8]])
    twins = {3: np.array([3]), 0: np.array([0, 9]), 7: np.array([7])}
    ranks = original_ranks(ranked, [3, 0, 3, 7], twins)
    np.testing.assert_array_equal(ranks, [np.inf, 1, np.inf, 1])
    ranked[0] = [4, 3, 2]
    ranks = original_ranks(ranked, [3, 0, 3, 7], twins)
    scores = score_copies(ranks, ["gray", "gray", "hflip", "hflip"])
    assert scores.top1 == {"gray": 0.5, "hflip": 0.5}
    assert scores.map == {"gray": 0.75, "hflip": 0.5}
    assert scores.mean_top1 == 0.5 and scores.mean_map == 0.625 and scores.queries == 4


def test_intervals_by_hand_over_the_originals():
    from cbir_cli.evaluate.intervals import Bootstrap

    # 4 originals (ids 10..13), 2 distortions, queries in no particular order.
    # gray ranks by original: 1, 2, inf, 1; hflip: 1, 1, 1, 4.
    kinds = ["hflip", "gray", "gray", "hflip", "gray", "hflip", "hflip", "gray"]
    originals = [13, 12, 10, 11, 11, 12, 10, 13]
    ranks = np.array([4, np.inf, 1, 1, 2, 1, 1, 1])
    bootstrap = Bootstrap(resamples=200, seed=7)
    scores = score_copies(ranks, kinds, originals, bootstrap)
    assert scores.top1 == {"hflip": 0.75, "gray": 0.5}
    # By hand: the draws resampled_means makes (rows of original positions 0..3 =
    # ids 10..13), and each original's values.
    draws = np.random.default_rng(7).integers(0, 4, size=(200, 4))
    gray_hit, hflip_hit = np.array([1.0, 0, 0, 1]), np.array([1.0, 1, 1, 0])
    gray_inv, hflip_inv = np.array([1.0, 0.5, 0, 1]), np.array([1.0, 1, 1, 0.25])

    def interval(per_original):
        return tuple(np.quantile(per_original[draws].mean(axis=1), [0.025, 0.975]))

    assert scores.interval("top1", "gray") == pytest.approx(interval(gray_hit))
    assert scores.interval("map", "hflip") == pytest.approx(interval(hflip_inv))
    assert scores.interval("top1") == pytest.approx(interval((gray_hit + hflip_hit) / 2))
    assert scores.interval("map") == pytest.approx(interval((gray_inv + hflip_inv) / 2))
    low, high = scores.interval("top1")
    assert low <= scores.mean_top1 <= high and low < high
    assert scores.as_dict()["intervals"]["top1"]["gray"] == list(scores.interval("top1", "gray"))
    # No bootstrap (or no originals): no intervals, the figures unchanged.
    plain = score_copies(ranks, kinds, originals, Bootstrap(resamples=0))
    assert plain.intervals is None and plain.interval("top1") is None and plain.top1 == scores.top1
    # The enumerated bootstrap of [0, 0, 0, 1] is (0, 0.75) (tests/test_intervals.py).
    one = score_copies(np.array([1, 3, 2, 5]), ["gray"] * 4, [0, 1, 2, 3], Bootstrap(resamples=10_000, seed=0))
    assert one.interval("top1", "gray") == (0.0, 0.75)


def run_copies(*args: str) -> dict:
    result = CliRunner().invoke(app, ["evaluate", "--dataset", "copies", *args, "--model", "test_tiny",
                                      "--workers", "0", "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_cli_end_to_end_counts_twins_and_caches_the_copies(tmp_path: Path):
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    for i in range(12):
        make_image(40 + i, (160, 120)).save(root / f"p{i:02d}.jpg", quality=92)
    # A re-encoded twin of every photo: without twin handling half the copies would
    # "miss" their original (the twin ties with it).
    for i in range(12):
        Image.open(root / f"p{i:02d}.jpg").save(root / "sub" / f"p{i:02d}_twin.jpg", quality=85)
    args = ("--root", str(root), "--copies", "6", "--distortions", "resize50,jpeg20,gray",
            "--features-dir", str(tmp_path / "feats"))
    first = run_copies(*args)
    assert first["originals"] == 6 and first["distortions"] == ["resize50", "jpeg20", "gray"]
    assert first["originals_with_twins"] == 6 and any("twins" in n for n in first["notes"])
    (deep,) = first["results"]
    assert deep["queries"] == 18 and deep["copies_embedded"] == 18 and deep["embedded"] == 24
    assert deep["top1"]["resize50"] == 1.0 and deep["top1"]["jpeg20"] == 1.0
    assert 0 <= deep["top1"]["gray"] <= deep["map"]["gray"] <= 1
    low, high = deep["intervals"]["top1"]["gray"]
    assert low <= deep["top1"]["gray"] <= high and deep["intervals"]["mean_map"][0] <= deep["mean_map"]
    assert any("bootstrap over the 6 originals" in n for n in first["notes"])
    second = run_copies(*args)
    assert second["results"][0]["copies_embedded"] == 0 and second["results"][0]["embedded"] == 0
    assert second["results"][0]["top1"] == deep["top1"]
    for bootstrap, shown in (("1000", True), ("0", False)):
        table = CliRunner().invoke(app, ["evaluate", "--dataset", "copies", *args, "--model", "test_tiny",
                                         "--workers", "0", "--bootstrap", bootstrap])
        assert table.exit_code == 0, table.output
        # resize50: every copy finds its original, whatever the resample
        assert ("1.000 [1.000, 1.000] / 1.000 [1.000, 1.000]" in table.output) is shown, table.output


def test_cli_copies_errors_are_one_line(tmp_path: Path):
    result = CliRunner().invoke(app, ["evaluate", "--dataset", "copies", "--root", str(tmp_path / "nope"),
                                      "--model", "test_tiny"])
    assert result.exit_code == 1 and "does not exist" in result.output and "Traceback" not in result.output
    (tmp_path / "one").mkdir()
    make_image(1).save(tmp_path / "one" / "a.jpg")
    result = CliRunner().invoke(app, ["evaluate", "--dataset", "copies", "--root", str(tmp_path / "one"),
                                      "--model", "test_tiny", "--distortions", "sepia"])
    assert result.exit_code == 1 and "unknown distortion(s) sepia" in result.output
