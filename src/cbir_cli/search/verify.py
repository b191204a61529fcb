"""Geometric verification: do two pictures show the same pixels?

A copy of a photo -- resized, re-encoded, cropped, rotated, turned grey, framed,
captioned -- keeps the photo's local features (:mod:`cbir_cli.imageio.local_features`)
where they are, up to one similarity transform (scale, rotation, shift). Two
photos of the same kind of flower, or of the same object from another viewpoint,
share few features, and those they share do not agree on one transform to within
a few pixels. So: match descriptors (nearest neighbour, Lowe's ratio test), fit a
similarity transform with RANSAC, count the matches it explains (inliers) and
how closely they fit it.

SIFT is not mirror-invariant, so a pair that fails is tried once more with the
first picture's features mirrored (:func:`~cbir_cli.imageio.local_features.mirrored`:
a permutation of the descriptors, no second detection): a left-right mirrored copy
is a copy too. Only pairs that fail pay for it (one more match).

A similarity, not a homography (MAGSAC or otherwise): a copy is one, and a
homography would also explain a planar object photographed again from another
angle -- exactly what UKBench's groups are and a copy detector must not merge.

The decision (:data:`MIN_INLIERS`, :data:`MIN_INLIER_RATIO`, :data:`MAX_RESIDUAL_PX`)
was measured on the copies protocol (distorted copies against their originals)
and on hard negatives (Oxford-17 photos of the same species, and the UKBench
groups: four photos of one object): ``bench/verify_copies.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from ..imageio.local_features import MAX_SIDE, mirrored

if TYPE_CHECKING:
    import numpy as np

    from ..imageio.local_features import LocalFeatures

# Lowe's ratio test: a match counts only if its nearest neighbour is clearly
# nearer than the second nearest.
RATIO = 0.8
# RANSAC's inlier distance, in pixels of the larger picture reduced to 640 px
# (a copy's features land within a pixel or two; a re-photographed scene's do not).
REPROJECTION_PX = 2.0
# A pair is the same picture with at least this many inliers making at least this
# share of the ratio-test matches (bench/verify_copies.py: copies of 30 originals
# have >= 55 inliers, of 15 originals ratios >= 0.69 -- margins of 2.75x and 1.4x;
# same-species photos and UKBench objects have ratios mostly below 0.4).
MIN_INLIERS = 20
MIN_INLIER_RATIO = 0.5
# A copy's inliers land where the transform puts them to within a fraction of a
# pixel (measured: median residual <= 0.56 px for every distortion, blur the
# highest); a scene photographed again, even from nearly the same place, leaves
# >= 0.72 px wherever its inlier ratio reaches MIN_INLIER_RATIO.
MAX_RESIDUAL_PX = 0.6


@dataclass(frozen=True)
class Verification:
    matches: int  # ratio-test matches
    inliers: int  # of them, explained by the fitted transform
    residual: float = float("inf")  # median distance of the inliers from where the transform puts them (px at 640)
    mirrored: bool = False  # verified only with one picture mirrored left-right

    @property
    def ratio(self) -> float:
        return self.inliers / self.matches if self.matches else 0.0

    @property
    def same_picture(self) -> bool:
        return (self.inliers >= MIN_INLIERS and self.ratio >= MIN_INLIER_RATIO
                and self.residual <= MAX_RESIDUAL_PX)


NOT_VERIFIED = Verification(0, 0)


def _matches(a: LocalFeatures, b: LocalFeatures, ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """(points of ``a``, their matches in ``b``) passing the ratio test."""
    import cv2
    import numpy as np

    if a.descriptors.dtype == np.float32:
        # RootSIFT rows are unit vectors: squared distance = 2 - 2 x dot product,
        # so one matrix product finds every nearest and second-nearest neighbour.
        # OpenCV's, on the one thread verify() allows it: numpy's BLAS starts a
        # thread per core for each pair, which costs more than it saves here.
        # The nearest and second nearest by two row maxima, the nearest masked out
        # in between: a tenth of the time of a partial sort of each row, which was
        # most of a pair's cost (ties fail the ratio test either way).
        sims = cv2.gemm(a.descriptors, b.descriptors, 1.0, None, 0.0, flags=cv2.GEMM_2_T)
        rows = np.arange(len(sims))
        nearest = sims.argmax(axis=1)
        best = sims[rows, nearest]
        sims[rows, nearest] = -np.inf
        second = sims.max(axis=1)
        good = np.sqrt(np.maximum(0.0, 2.0 - 2.0 * best)) < ratio * np.sqrt(np.maximum(0.0, 2.0 - 2.0 * second))
        return a.points[good], b.points[nearest[good]]
    pairs = cv2.BFMatcher(cv2.NORM_HAMMING).knnMatch(a.descriptors, b.descriptors, k=2)
    good = [p[0] for p in pairs if len(p) == 2 and p[0].distance < ratio * p[1].distance]
    src = np.array([a.points[m.queryIdx] for m in good], dtype=np.float32).reshape(-1, 2)
    dst = np.array([b.points[m.trainIdx] for m in good], dtype=np.float32).reshape(-1, 2)
    return src, dst


def verify(a: LocalFeatures, b: LocalFeatures, ratio: float = RATIO, reprojection_px: float = REPROJECTION_PX,
           mirror: bool = True) -> Verification:
    """How many of ``a``'s features match ``b``'s through one similarity transform;
    with ``mirror``, when that is not the same picture, how many of the mirrored
    ``a``'s do (the result says ``mirrored`` if only they verify)."""
    upright = _verify_upright(a, b, ratio, reprojection_px)
    if upright.same_picture or not mirror:
        return upright
    flipped = mirrored(a)
    if flipped is None:
        return upright
    check = _verify_upright(flipped, b, ratio, reprojection_px)
    return replace(check, mirrored=True) if check.same_picture else upright


def _verify_upright(a: LocalFeatures, b: LocalFeatures, ratio: float, reprojection_px: float) -> Verification:
    import cv2
    import numpy as np

    if len(a) < 2 or len(b) < 2 or a.detector != b.detector:
        return NOT_VERIFIED
    cv2.setNumThreads(1)  # callers parallelise over pairs
    src, dst = _matches(a, b, ratio)
    if len(src) < 3:
        return Verification(len(src), 0)
    # The threshold is in pixels of b's picture at the detection scale (640 px).
    scale = max(b.size) / MAX_SIDE if max(b.size) > MAX_SIDE else 1.0
    transform, mask = cv2.estimateAffinePartial2D(src, dst, method=cv2.RANSAC,
                                                  ransacReprojThreshold=reprojection_px * scale,
                                                  maxIters=2000, confidence=0.995)
    inliers = int(np.count_nonzero(mask)) if mask is not None else 0
    if transform is None or inliers < 3:
        return Verification(len(src), inliers)
    keep = mask.ravel().astype(bool)
    moved = src[keep] @ transform[:, :2].T + transform[:, 2]
    residual = float(np.median(np.linalg.norm(moved - dst[keep], axis=1))) / scale
    return Verification(len(src), inliers, residual)


FeatureSource = Callable[[int], "LocalFeatures | None"]


class FeatureCache:
    """Local features of pictures by key, extracted once per run (``load(key)``)."""

    def __init__(self, load: FeatureSource) -> None:
        self._load = load
        self._cache: dict[int, LocalFeatures | None] = {}

    def __call__(self, key: int) -> LocalFeatures | None:
        if key not in self._cache:
            self._cache[key] = self._load(key)
        return self._cache[key]

    def __len__(self) -> int:
        return len(self._cache)


def verify_keys(features: FeatureSource, pairs: Iterable[tuple[int, int]]) -> list[Verification]:
    """:func:`verify` of each pair of keys (``features(key)``: a picture's features,
    ``None`` if unreadable)."""
    out = []
    for x, y in pairs:
        fx, fy = features(x), features(y)
        out.append(verify(fx, fy) if fx is not None and fy is not None else NOT_VERIFIED)
    return out


def verified_first(candidates: Sequence[int], checks: Sequence[Verification]) -> list[int]:
    """``candidates`` (best first) with the verified ones moved to the front; each
    part keeps the search's order (several verified candidates are all copies: the
    search's best of them stays first)."""
    verified = [i for i, c in enumerate(checks) if c.same_picture]
    rest = [i for i, c in enumerate(checks) if not c.same_picture]
    return [candidates[i] for i in verified + rest]


# Candidates verified per query: the measured copies protocol finds a crop's or a
# grey copy's original within the global descriptor's top 5 almost always
# (bench/verify_copies.py and `cbir evaluate --dataset copies`), and each one
# costs a feature extraction and a match.
CANDIDATES = 5


def verify_ranked(ranked: np.ndarray, query_features: FeatureSource, gallery_features: FeatureSource,
                  candidates: int = CANDIDATES,
                  more: Callable[[int], Sequence[int]] | None = None) -> tuple[np.ndarray, int]:
    """``ranked`` ((queries, depth) gallery keys, best first, -1 padded) with each
    query's verified candidates -- its first ``candidates``, then ``more(q)``'s
    (a second look's) -- moved to the front in that order; also how many pairs
    were verified as copies."""
    import numpy as np

    out = ranked.copy()
    found = 0
    for q in range(len(ranked)):
        mine = query_features(q)  # first: it may be what ``more`` looks with
        if mine is None:
            continue
        head = list(dict.fromkeys([int(i) for i in ranked[q, :candidates] if i >= 0]
                                  + [int(i) for i in (more(q) if more is not None else ())]))
        checks = []
        for key in head:
            theirs = gallery_features(key)
            checks.append(verify(mine, theirs) if theirs is not None else NOT_VERIFIED)
        verified = [head[i] for i, c in enumerate(checks) if c.same_picture]
        found += len(verified)
        if verified:
            rest = [int(i) for i in ranked[q] if int(i) not in set(verified)]
            row = (verified + rest)[:ranked.shape[1]]
            out[q] = np.asarray(row + [-1] * (ranked.shape[1] - len(row)), dtype=ranked.dtype)
    return out, found
