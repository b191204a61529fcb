"""Labelled image collections for evaluation: which images, and which class each is.

Two layouts are understood:

* ``sop`` -- Stanford Online Products: ``Ebay_test.txt`` / ``Ebay_train.txt`` under
  ROOT, each a header line ``image_id class_id super_class_id path`` then one line
  per image, ``path`` relative to ROOT. Class ids are kept as written (products),
  super-class ids likewise (bicycle, chair, ...).
* ``folder`` -- one sub-folder of ROOT per class (``oxford17flowers/01_daffodil/``,
  ``ukbench_mini/group_0000/``); images anywhere below a class folder belong to it.
  Labels are 0, 1, ... in sorted folder-name order.

``limit`` makes a deterministic subset for quick runs. It keeps *whole classes*
(a query needs its positives): the classes are shuffled with a fixed seed and taken
in that order while the total stays within ``limit`` images. The seeded order
spreads a subset over the super-classes (SOP lists its test products grouped by
super-class, so "the first classes" would be all bicycles), and a smaller limit
always selects a subset of what a larger one selects, so the cached features of a
bigger run serve every smaller one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import CbirError
from ..imageio.files import is_image_name, iter_image_files
from ..paths import display_path

if TYPE_CHECKING:
    import numpy as np

DATASET_KINDS = ("sop", "folder")
# What counts as relevant to a query: the same class, or (SOP) the same super-class.
RELEVANCE_KINDS = ("product", "superclass")
SOP_SPLITS = ("test", "train", "all")
FOLDER_SPLITS = ("all",)
SOP_HEADER = ("image_id", "class_id", "super_class_id", "path")
LIMIT_SEED = 0


@dataclass
class LabelledCollection:
    """Images with class labels, in a fixed order (the row order of every array)."""

    kind: str
    root: Path
    split: str
    paths: list[str]  # absolute
    labels: np.ndarray  # int64 (n,), >= 0
    super_labels: np.ndarray | None = None  # int64 (n,), SOP only
    class_names: dict[int, str] = field(default_factory=dict)
    limit: int | None = None

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_classes(self) -> int:
        import numpy as np

        return int(np.unique(self.labels).size)

    def class_sizes(self) -> np.ndarray:
        """Images per class, one entry per distinct label."""
        import numpy as np

        return np.unique(self.labels, return_counts=True)[1]

    def subset(self, keep: np.ndarray) -> LabelledCollection:
        """The rows where the boolean mask ``keep`` is True, order preserved."""
        import numpy as np

        keep = np.asarray(keep, dtype=bool)
        return LabelledCollection(
            kind=self.kind,
            root=self.root,
            split=self.split,
            paths=[p for p, k in zip(self.paths, keep) if k],
            labels=self.labels[keep],
            super_labels=None if self.super_labels is None else self.super_labels[keep],
            class_names=self.class_names,
            limit=self.limit,
        )

    def describe(self) -> str:
        limit = f", limit {self.limit}" if self.limit is not None else ""
        return (f"{self.kind} {display_path(self.root)} (split {self.split}{limit}): "
                f"{len(self)} images, {self.num_classes} classes")


def limit_mask(labels: np.ndarray, limit: int, seed: int = LIMIT_SEED) -> np.ndarray:
    """Boolean mask selecting whole classes, in a seeded random class order, while
    the running total stays <= ``limit`` (stops at the first class that does not
    fit, so smaller limits select prefixes of the same class order)."""
    import numpy as np

    if limit < 1:
        raise CbirError(f"the image limit must be >= 1 (got {limit})")
    classes, counts = np.unique(labels, return_counts=True)
    order = np.random.default_rng(seed).permutation(classes.size)
    totals = np.cumsum(counts[order])
    chosen = classes[order[totals <= limit]]
    if chosen.size == 0:
        raise CbirError(
            f"a limit of {limit} images is smaller than the first class of the subset order "
            f"({int(counts[order[0]])} images); use a larger limit"
        )
    return np.isin(labels, chosen)


def _apply_limit(collection: LabelledCollection, limit: int | None) -> LabelledCollection:
    if limit is None or limit >= len(collection):
        return collection
    subset = collection.subset(limit_mask(collection.labels, limit))
    subset.limit = limit
    return subset


# Where a missing sop dataset comes from and what its folder holds (said when it is not there).
SOP_ORIGIN = ("Stanford Online Products (Song et al., CVPR 2016: Stanford_Online_Products.zip from "
              "https://cvgl.stanford.edu/projects/lifted_struct/) unpacks into a folder holding Ebay_test.txt and "
              "Ebay_train.txt (a header line `image_id class_id super_class_id path`, then one line per image) "
              "and the images at those paths (bicycle_final/..., chair_final/...); give that folder as the root")


def _check_root(root: str | os.PathLike[str], origin: str | None = None) -> Path:
    path = Path(root).expanduser().absolute()
    if not path.exists():
        raise CbirError(f"{display_path(path)}: dataset folder does not exist" + (f"; {origin}" if origin else ""))
    if not path.is_dir():
        raise CbirError(f"{display_path(path)}: not a folder")
    return path


# ---------------------------------------------------------------------------
# Stanford Online Products.


def read_sop_file(list_file: Path, root: Path) -> tuple[list[str], list[int], list[int]]:
    """Parse one ``Ebay_*.txt``: (absolute paths, class ids, super-class ids)."""
    try:
        lines = list_file.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise CbirError(f"{display_path(list_file)}: cannot read ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise CbirError(f"{display_path(list_file)}: not a UTF-8 text file") from None
    if not lines or tuple(lines[0].split()) != SOP_HEADER:
        raise CbirError(
            f"{display_path(list_file)}: line 1: expected the header '{' '.join(SOP_HEADER)}'"
        )
    paths, labels, supers = [], [], []
    first_line: dict[str, int] = {}
    for number, line in enumerate(lines[1:], start=2):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 4:
            raise CbirError(f"{display_path(list_file)}: line {number}: expected 4 fields, found {len(fields)}")
        try:
            int(fields[0])
        except ValueError:
            raise CbirError(f"{display_path(list_file)}: line {number}: image_id must be an integer "
                            f"(got {fields[0][:40]!r})") from None
        try:
            class_id, super_id = int(fields[1]), int(fields[2])
        except ValueError:
            raise CbirError(f"{display_path(list_file)}: line {number}: class ids must be integers") from None
        if fields[3] in first_line:
            # The same image twice would be its own relevant neighbour.
            raise CbirError(f"{display_path(list_file)}: line {number}: {fields[3]} is already listed on line "
                            f"{first_line[fields[3]]}")
        first_line[fields[3]] = number
        if class_id < 0 or super_id < 0:
            raise CbirError(f"{display_path(list_file)}: line {number}: class ids must be >= 0")
        rel = Path(fields[3])
        if rel.is_absolute() or ".." in rel.parts:
            raise CbirError(f"{display_path(list_file)}: line {number}: path must stay inside the dataset root")
        paths.append(str(root / rel))
        labels.append(class_id)
        supers.append(super_id)
    if not paths:
        raise CbirError(f"{display_path(list_file)}: lists no images")
    return paths, labels, supers


def load_sop(root: str | os.PathLike[str], split: str = "test", limit: int | None = None) -> LabelledCollection:
    """Stanford Online Products (``Ebay_{test,train}.txt`` under ``root``).
    ``split``: test (the standard protocol), train, or all (both lists)."""
    import numpy as np

    if split not in SOP_SPLITS:
        raise CbirError(f"unknown split {split!r} for the sop layout; choose one of: {', '.join(SOP_SPLITS)}")
    root_path = _check_root(root, SOP_ORIGIN)
    files = ["Ebay_test.txt", "Ebay_train.txt"] if split == "all" else [f"Ebay_{split}.txt"]
    paths: list[str] = []
    labels: list[int] = []
    supers: list[int] = []
    for name in files:
        list_file = root_path / name
        if not list_file.is_file():
            raise CbirError(f"{display_path(list_file)}: not found; {SOP_ORIGIN}")
        p, c, s = read_sop_file(list_file, root_path)
        twice = set(paths) & set(p)
        if twice:
            raise CbirError(f"{display_path(list_file)}: {display_path(min(twice))} is also listed in the other split")
        paths += p
        labels += c
        supers += s
    collection = LabelledCollection(
        kind="sop", root=root_path, split=split, paths=paths,
        labels=np.asarray(labels, dtype=np.int64), super_labels=np.asarray(supers, dtype=np.int64),
    )
    return _apply_limit(collection, limit)


# ---------------------------------------------------------------------------
# One sub-folder per class.


def load_folder(root: str | os.PathLike[str], split: str = "all", limit: int | None = None) -> LabelledCollection:
    """One class per sub-folder of ``root`` (sorted names -> labels 0, 1, ...);
    sub-folders without images are ignored, an image directly in ``root`` is an error."""
    import numpy as np

    if split not in FOLDER_SPLITS:
        raise CbirError(f"unknown split {split!r} for the folder layout; choose one of: {', '.join(FOLDER_SPLITS)}")
    root_path = _check_root(root)
    entries = sorted(root_path.iterdir(), key=lambda p: p.name)
    loose = [p for p in entries if p.is_file() and is_image_name(p.name)]
    if loose:
        raise CbirError(
            f"{display_path(loose[0])}: image outside a class sub-folder (the folder layout wants "
            "one sub-folder per class, images inside)"
        )
    paths: list[str] = []
    labels: list[int] = []
    names: dict[int, str] = {}
    for folder in (p for p in entries if p.is_dir()):
        images = [str(p.absolute()) for p in iter_image_files(folder)]
        if not images:
            continue
        label = len(names)
        names[label] = folder.name
        paths += images
        labels += [label] * len(images)
    if not paths:
        raise CbirError(f"{display_path(root_path)}: no class sub-folders with images found")
    collection = LabelledCollection(
        kind="folder", root=root_path, split=split, paths=paths,
        labels=np.asarray(labels, dtype=np.int64), class_names=names,
    )
    return _apply_limit(collection, limit)


def load_collection(
    kind: str, root: str | os.PathLike[str], split: str | None = None, limit: int | None = None
) -> LabelledCollection:
    """Dispatch on the layout; ``split`` None = the layout's standard split."""
    if kind == "sop":
        return load_sop(root, split or "test", limit)
    if kind == "folder":
        return load_folder(root, split or "all", limit)
    raise CbirError(f"unknown dataset layout {kind!r}; choose one of: {', '.join(DATASET_KINDS)}")
