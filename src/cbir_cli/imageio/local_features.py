"""Local features of a picture's grey levels: keypoint positions and descriptors
(SIFT, or ORB), for verifying that two images show the same pixels
(:mod:`cbir_cli.search.verify`).

Grey levels on purpose: a greyscale copy of a colour photo has the same keypoints
and descriptors as the photo, and a crop keeps those of the part it shows, where
a global descriptor of either changes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image as PILImage

# The longer side a picture is reduced to before detection: keypoints of a 500 px
# photo and of its crops survive; bigger photos cost more and match no better.
MAX_SIDE = 640
# Strongest keypoints kept per picture (SIFT): enough for a quarter-area crop to
# keep ~100 of them; matching time grows with the product of the two counts.
MAX_KEYPOINTS = 800
DETECTORS = ("sift", "orb")
DEFAULT_DETECTOR = "sift"


@dataclass(frozen=True)
class LocalFeatures:
    """``points``: (n, 2) float32 keypoint positions in pixels of the original
    picture; ``descriptors``: (n, d) float32 (RootSIFT) or uint8 (ORB);
    ``size``: the original (width, height)."""

    detector: str
    points: np.ndarray
    descriptors: np.ndarray
    size: tuple[int, int]

    def __len__(self) -> int:
        return len(self.points)


# SIFT's descriptor: a 4 x 4 grid of cells (rows, columns in the keypoint's own frame,
# its dominant orientation along x) times 8 gradient-orientation bins.
_SIFT_CELLS, _SIFT_BINS = 4, 8


def mirrored(features: LocalFeatures) -> LocalFeatures | None:
    """The features the left-right mirror of the picture has, without detecting
    again (SIFT only; ``None`` for ORB, whose sampling pattern is not symmetric).

    Mirroring maps a keypoint at angle t to one at 180 - t; in the keypoint's own
    frame that is a flip of the rows and every gradient angle a -> -a. So the
    descriptor's row r becomes row 3 - r and orientation bin o becomes bin -o mod 8
    (bin o is centred on o x 45 degrees). ``points`` are where the keypoints are in
    the mirrored picture (x -> width - x), so a mirrored copy of a photo matches
    these through a similarity transform, as an upright copy matches the photo's
    own. Checked against detecting on the flipped picture: 748 of 751 matches
    agree to within 0.01 px (tests/test_verify.py checks a mirrored copy verifies)."""
    import numpy as np

    if features.detector != "sift":
        return None
    cells = np.arange(_SIFT_CELLS * _SIFT_CELLS * _SIFT_BINS).reshape(_SIFT_CELLS, _SIFT_CELLS, _SIFT_BINS)
    order = cells[::-1][:, :, (-np.arange(_SIFT_BINS)) % _SIFT_BINS].reshape(-1)
    points = features.points.copy()
    points[:, 0] = np.float32(features.size[0]) - points[:, 0]
    return LocalFeatures(features.detector, points, np.ascontiguousarray(features.descriptors[:, order]),
                         features.size)


def grey_array(img: PILImage.Image, max_side: int = MAX_SIDE) -> tuple[np.ndarray, float]:
    """The picture's grey levels (uint8), reduced so that its longer side is at
    most ``max_side``, and the factor from reduced to original pixels."""
    import numpy as np
    from PIL import Image

    grey = img.convert("L")
    scale = max(grey.size) / max_side if max(grey.size) > max_side else 1.0
    if scale > 1.0:
        grey = grey.resize((max(1, round(grey.width / scale)), max(1, round(grey.height / scale))),
                           Image.Resampling.BILINEAR)
    return np.asarray(grey, dtype=np.uint8), scale


def extract(img: PILImage.Image, detector: str = DEFAULT_DETECTOR, max_keypoints: int = MAX_KEYPOINTS,
            max_side: int = MAX_SIDE) -> LocalFeatures:
    """The local features of ``img`` (any mode; its grey levels are used)."""
    import cv2
    import numpy as np

    cv2.setNumThreads(1)  # one picture is small; callers parallelise over pictures
    grey, scale = grey_array(img, max_side)
    if detector == "sift":
        found, desc = cv2.SIFT_create(nfeatures=max_keypoints).detectAndCompute(grey, None)
        if desc is not None:
            # RootSIFT (Arandjelovic & Zisserman 2012): L1-normalise, square root;
            # Euclidean distances then compare as the Hellinger kernel does.
            desc = np.sqrt(desc / np.maximum(desc.sum(axis=1, keepdims=True), 1e-7)).astype(np.float32)
    elif detector == "orb":
        found, desc = cv2.ORB_create(nfeatures=max_keypoints).detectAndCompute(grey, None)
    else:
        raise ValueError(f"unknown local feature detector {detector!r}; choose from {', '.join(DETECTORS)}")
    width = 128 if detector == "sift" else 32
    if desc is None or not found:
        points = np.zeros((0, 2), np.float32)
        desc = np.zeros((0, width), np.float32 if detector == "sift" else np.uint8)
    else:
        points = np.array([k.pt for k in found], dtype=np.float32) * np.float32(scale)
    return LocalFeatures(detector, points, desc, img.size)


def extract_file(path: str | os.PathLike[str], detector: str = DEFAULT_DETECTOR) -> LocalFeatures | None:
    """:func:`extract` of an image file (upright, as everywhere else); ``None`` when
    it cannot be read."""
    from ..errors import ImageError
    from .decode import load_image

    try:
        img = load_image(str(path))
    except ImageError:
        return None
    return extract(img, detector)
