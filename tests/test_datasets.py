"""Dataset loaders: the SOP list files and the one-folder-per-class layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cbir_cli.errors import CbirError
from cbir_cli.evaluate.datasets import limit_mask, load_collection, load_folder, load_sop

HEADER = "image_id class_id super_class_id path\n"


def write_sop_lists(root: Path, test_rows: list[tuple[int, int, str]], train_rows: list[tuple[int, int, str]]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for name, rows in (("Ebay_test.txt", test_rows), ("Ebay_train.txt", train_rows)):
        lines = [f"{i + 1} {c} {s} {p}\n" for i, (c, s, p) in enumerate(rows)]
        (root / name).write_text(HEADER + "".join(lines))


def touch_images(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"not decoded by the loader")


# --------------------------------------------------------------------------- sop


def test_sop_reads_labels_super_labels_and_absolute_paths(tmp_path: Path) -> None:
    write_sop_lists(
        tmp_path,
        test_rows=[(11, 1, "chair_final/a.JPG"), (11, 1, "chair_final/b.JPG"), (12, 2, "sofa_final/c.JPG")],
        train_rows=[(3, 1, "chair_final/d.JPG")],
    )
    test = load_sop(tmp_path, "test")
    assert test.paths == [str(tmp_path / "chair_final/a.JPG"), str(tmp_path / "chair_final/b.JPG"),
                          str(tmp_path / "sofa_final/c.JPG")]
    assert test.labels.tolist() == [11, 11, 12]
    assert test.super_labels.tolist() == [1, 1, 2]
    assert test.num_classes == 2

    train = load_sop(tmp_path, "train")
    assert train.labels.tolist() == [3]
    both = load_sop(tmp_path, "all")
    assert both.labels.tolist() == [11, 11, 12, 3]
    assert load_collection("sop", tmp_path).split == "test"  # the standard protocol


def test_sop_errors_name_the_file_and_line(tmp_path: Path) -> None:
    tmp_path.joinpath("Ebay_test.txt").write_text("id class super path\n1 1 1 a.jpg\n")
    with pytest.raises(CbirError, match=r"Ebay_test.txt: line 1: expected the header"):
        load_sop(tmp_path)
    tmp_path.joinpath("Ebay_test.txt").write_text(HEADER + "1 1 1 a.jpg\n2 1 b.jpg\n")
    with pytest.raises(CbirError, match=r"Ebay_test.txt: line 3: expected 4 fields, found 3"):
        load_sop(tmp_path)
    tmp_path.joinpath("Ebay_test.txt").write_text(HEADER + "1 x 1 a.jpg\n")
    with pytest.raises(CbirError, match=r"line 2: class ids must be integers"):
        load_sop(tmp_path)
    tmp_path.joinpath("Ebay_test.txt").write_text(HEADER + "1 1 1 ../outside.jpg\n")
    with pytest.raises(CbirError, match=r"line 2: path must stay inside"):
        load_sop(tmp_path)
    with pytest.raises(CbirError, match=r"Ebay_train.txt: not found"):
        load_sop(tmp_path, "train")
    with pytest.raises(CbirError, match=r"unknown split 'val'"):
        load_sop(tmp_path, "val")


# --------------------------------------------------------------------------- folder


def test_folder_labels_follow_sorted_class_folders(tmp_path: Path) -> None:
    touch_images(tmp_path / "b_tulip", ["2.jpg", "1.png"])
    touch_images(tmp_path / "a_daisy", ["x.jpg"])
    touch_images(tmp_path / "a_daisy" / "more", ["y.jpg"])  # nested: still class a_daisy
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("not an image")
    coll = load_folder(tmp_path)
    assert coll.class_names == {0: "a_daisy", 1: "b_tulip"}
    assert coll.labels.tolist() == [0, 0, 1, 1]
    assert coll.paths[:2] == [str(tmp_path / "a_daisy" / "x.jpg"), str(tmp_path / "a_daisy" / "more" / "y.jpg")]
    assert all(Path(p).is_absolute() for p in coll.paths)
    assert coll.super_labels is None


def test_folder_rejects_loose_images_and_bad_roots(tmp_path: Path) -> None:
    touch_images(tmp_path / "cls", ["a.jpg"])
    touch_images(tmp_path, ["loose.jpg"])
    with pytest.raises(CbirError, match=r"loose.jpg: image outside a class sub-folder"):
        load_folder(tmp_path)
    with pytest.raises(CbirError, match=r"missing: dataset folder does not exist"):
        load_folder(tmp_path / "missing")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(CbirError, match=r"no class sub-folders with images"):
        load_folder(tmp_path / "empty")
    with pytest.raises(CbirError, match=r"unknown split 'test' for the folder layout"):
        load_folder(tmp_path, "test")
    with pytest.raises(CbirError, match=r"unknown dataset layout 'coco'"):
        load_collection("coco", tmp_path)


# --------------------------------------------------------------------------- limit


def test_limit_keeps_whole_classes_and_nests() -> None:
    labels = np.repeat(np.arange(20), 5)  # 20 classes of 5
    masks = {n: limit_mask(labels, n) for n in (12, 25, 50, 99)}
    for n, mask in masks.items():
        kept = labels[mask]
        assert mask.sum() == (n // 5) * 5  # stops before the class that would overflow
        assert np.all(np.unique(kept, return_counts=True)[1] == 5)  # whole classes only
    # A smaller limit selects a subset of a larger one (so cached features are shared).
    assert np.all(masks[25] <= masks[50]) and np.all(masks[12] <= masks[25])
    # Seeded class order, not simply the first classes.
    assert set(labels[masks[25]]) != set(range(5))
    assert np.array_equal(limit_mask(labels, 25), masks[25])
    with pytest.raises(CbirError, match="a limit of 3 images is smaller than the first class"):
        limit_mask(labels, 3)


def test_limit_applies_to_loaded_collections(tmp_path: Path) -> None:
    for c in range(6):
        touch_images(tmp_path / f"c{c}", [f"{i}.jpg" for i in range(c + 1)])  # class c has c+1 images
    full = load_folder(tmp_path)
    assert len(full) == 21
    small = load_folder(tmp_path, limit=10)
    assert small.limit == 10 and len(small) <= 10
    sizes = dict(zip(*np.unique(small.labels, return_counts=True)))
    assert all(n == label + 1 for label, n in sizes.items())  # every kept class is complete
    assert small.paths == [p for p, keep in zip(full.paths, np.isin(full.labels, small.labels)) if keep]
    assert load_folder(tmp_path, limit=1000).limit is None  # no-op when the limit covers everything
