"""`cbir evaluate` on awkward collections (issue 10, item 19): undefined metrics are
JSON null with a note, a SOP list naming an image twice or with a non-integer
image_id is a one-line error naming the line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import make_image
from typer.testing import CliRunner

from cbir_cli.cli import app
from cbir_cli.errors import CbirError
from cbir_cli.evaluate.datasets import load_sop

HEADER = "image_id class_id super_class_id path\n"


def test_an_all_singleton_collection_gives_valid_json_and_says_why(tmp_path):
    for i in range(3):
        (tmp_path / "data" / f"class{i}").mkdir(parents=True)
        make_image(i).save(tmp_path / "data" / f"class{i}" / "only.jpg")
    result = CliRunner().invoke(app, ["evaluate", "--dataset", "folder", "--root", str(tmp_path / "data"),
                                      "--features", "hsv", "--features-dir", str(tmp_path / "feats"), "--json"])
    assert result.exit_code == 0, result.output

    def no_nan(token: str):
        raise AssertionError(f"bare {token} in the JSON")

    metrics = json.loads(result.stdout, parse_constant=no_nan)["results"][0]["metrics"]
    assert metrics["map"] is None and metrics["recall@1"] is None and metrics["queries"] == 0
    assert any("each class needs at least 2 images" in note for note in metrics["notes"])


def write_sop(root: Path, rows: str) -> None:
    root.mkdir(exist_ok=True)
    (root / "Ebay_test.txt").write_text(HEADER + rows)
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        make_image(len(name)).save(root / name)


def test_a_sop_list_naming_an_image_twice_is_refused(tmp_path):
    write_sop(tmp_path, "1 1 1 a.jpg\n2 1 1 b.jpg\n3 1 1 a.jpg\n")
    with pytest.raises(CbirError, match=r"Ebay_test.txt: line 4: a.jpg is already listed on line 2"):
        load_sop(tmp_path)


def test_a_non_integer_image_id_is_refused(tmp_path):
    write_sop(tmp_path, "1 1 1 a.jpg\nx2 1 1 b.jpg\n")
    with pytest.raises(CbirError, match=r"line 3: image_id must be an integer \(got 'x2'\)"):
        load_sop(tmp_path)


def test_one_dataset_written_two_ways_shares_one_feature_cache(tmp_path, monkeypatch):
    """``../shared/x`` and ``/work/shared/x`` got two caches: the copies protocol
    embedded the gallery and calibrated int8 again for the same photos."""
    from cbir_cli.evaluate.datasets import load_folder
    from cbir_cli.evaluate.features import dataset_cache_key

    root = tmp_path / "data" / "flowers"
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for i in range(2):
            make_image(i).save(root / label / f"{i}.jpg")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "data")
    monkeypatch.chdir(tmp_path / "elsewhere")
    keys = {dataset_cache_key(load_folder(spelling)) for spelling in
            (root, "../data/flowers", tmp_path / "link" / "flowers", f"{tmp_path}/data/./flowers")}
    assert len(keys) == 1
    other = tmp_path / "data" / "other"
    other.mkdir()
    for label in ("a", "b"):
        (other / label).mkdir()
        make_image(5).save(other / label / "0.jpg")
        make_image(6).save(other / label / "1.jpg")
    assert dataset_cache_key(load_folder(other)) not in keys
