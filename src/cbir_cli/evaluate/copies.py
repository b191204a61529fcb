"""The copy-detection protocol: can a distorted copy of an image find its original?

Any collection of images works (no labels). ``count`` originals are drawn with a
seeded generator; each gets every distortion of :data:`DISTORTIONS`; every copy
queries the collection (the copies themselves are never in it). A copy is found
when its original -- or a file that is pixel-for-pixel the same picture, see
:func:`twin_sets` -- is ranked first (top-1); AP with one relevant item is
``1 / rank``. Scores are reported per distortion and as the mean over distortions.

The pieces are plain functions so that other code can reuse them (choosing a
duplicate threshold, say): :func:`copy_queries` and :func:`render_copy` make the
copies, :func:`twin_sets` says which gallery images count as the original, and
:func:`original_ranks` + :func:`score_copies` score any ranking. Nothing here
embeds or searches; :mod:`.copy_detection` runs the protocol end to end.

Distortions (centre crops keep the middle of the picture; ``crop_side50`` is the
"25 % cut from every side" crop: the central half of each side, a quarter of the
area, shown at twice the scale):

====================  =========================================================
resize50              half size, bilinear
jpeg20                JPEG quality 20
crop_side75           central 75 % of each side (56 % of the area)
crop_area50           central 70.7 % of each side (50 % of the area)
crop_side50           central 50 % of each side (25 % of the area)
hflip                 mirrored left-right
rot90                 rotated 90 degrees counter-clockwise (canvas h x w)
rot10                 rotated 10 degrees on the same canvas, black corners
gray                  greyscale (as RGB)
jitter                brightness x1.3, contrast x0.7, saturation x1.5
blur2                 Gaussian blur, radius 2
border10              a solid frame of 10 % of each side, seeded colour
text                  two white captions with a black outline, 12 % of the height
====================  =========================================================
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import CbirError
from ..imageio.header import image_size

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image as PILImage

    from .intervals import Bootstrap

DISTORTIONS: tuple[str, ...] = ("resize50", "jpeg20", "crop_side75", "crop_area50", "crop_side50", "hflip",
                                "rot90", "rot10", "gray", "jitter", "blur2", "border10", "text")
DEFAULT_COUNT = 200
DEFAULT_SEED = 0
# Two files are the same picture when they have the same size and their 32x32 grey
# thumbnails differ by at most this many grey levels on average (re-encodes of one
# photo; Oxford-17 holds 65 such pairs, which would otherwise cap top-1 near 0.95).
TWIN_THUMBNAIL = 32
TWIN_MAX_MEAN_DIFF = 3.0
# Bump when a distortion changes, so cached copy vectors are not reused.
PROTOCOL_VERSION = 1


@dataclass(frozen=True)
class CopyQuery:
    """One distorted copy: which original (index into the collection), which
    distortion, and the seed of its random choices (border colour, text position)."""

    original: int
    kind: str
    seed: int


@dataclass(frozen=True)
class CopyScores:
    """Top-1 and mAP per distortion (in :data:`DISTORTIONS` order) and their means."""

    top1: dict[str, float]
    map: dict[str, float]
    queries: int
    # Bootstrap intervals over the originals (:func:`copy_intervals`): {"top1": {kind:
    # (low, high)}, "map": {...}, "mean_top1": (low, high), "mean_map": ...}; None: not drawn.
    intervals: dict[str, Any] | None = None

    @property
    def mean_top1(self) -> float:
        return sum(self.top1.values()) / len(self.top1)

    @property
    def mean_map(self) -> float:
        return sum(self.map.values()) / len(self.map)

    def as_dict(self) -> dict[str, object]:
        return {"top1": self.top1, "map": self.map, "mean_top1": self.mean_top1, "mean_map": self.mean_map,
                "queries": self.queries, "intervals": _listed(self.intervals)}

    def interval(self, metric: str, kind: str | None = None) -> tuple[float, float] | None:
        """The interval of ``metric`` ("top1", "map") for distortion ``kind``, or of its
        mean over distortions (``kind`` None); None where none was drawn."""
        if not self.intervals:
            return None
        return self.intervals[f"mean_{metric}"] if kind is None else self.intervals[metric].get(kind)


def _listed(value: Any) -> Any:
    """Intervals as JSON has them: tuples as lists."""
    if isinstance(value, dict):
        return {k: _listed(v) for k, v in value.items()}
    return list(value) if isinstance(value, tuple) else value


def check_distortions(kinds: Sequence[str]) -> tuple[str, ...]:
    unknown = [k for k in kinds if k not in DISTORTIONS]
    if unknown or not kinds:
        raise CbirError(f"unknown distortion(s) {', '.join(unknown) or '(none)'}; "
                        f"choose from: {', '.join(DISTORTIONS)}")
    return tuple(dict.fromkeys(kinds))


def pick_originals(num_images: int, count: int = DEFAULT_COUNT, seed: int = DEFAULT_SEED) -> np.ndarray:
    """Sorted indices of ``count`` originals among ``num_images`` (all of them when
    there are fewer)."""
    import numpy as np

    if count < 1:
        raise CbirError(f"the number of originals must be >= 1 (got {count})")
    if num_images < 2:
        raise CbirError("copy detection needs a collection of at least 2 images")
    take = min(count, num_images)
    return np.sort(np.random.default_rng(seed).choice(num_images, take, replace=False))


def copy_queries(num_images: int, count: int = DEFAULT_COUNT, seed: int = DEFAULT_SEED,
                 kinds: Sequence[str] = DISTORTIONS) -> list[CopyQuery]:
    """Every copy of the protocol, distortion-major (all originals' ``resize50``
    first, ...): a fixed order, so runs and caches line up."""
    kinds = check_distortions(kinds)
    originals = pick_originals(num_images, count, seed)
    return [CopyQuery(int(i), kind, seed * 100_000 + int(i)) for kind in kinds for i in originals]


def centre_crop(img: PILImage.Image, side_fraction: float) -> PILImage.Image:
    w, h = img.size
    cw, ch = max(1, round(w * side_fraction)), max(1, round(h * side_fraction))
    left, top = (w - cw) // 2, (h - ch) // 2
    return img.crop((left, top, left + cw, top + ch))


def distort(img: PILImage.Image, kind: str, seed: int) -> PILImage.Image:
    """``img`` (RGB) with distortion ``kind``; ``seed`` fixes its random choices."""
    import numpy as np
    from PIL import Image, ImageEnhance, ImageFilter, ImageOps

    rng = np.random.default_rng(seed)
    w, h = img.size
    if kind == "resize50":
        return img.resize((max(1, w // 2), max(1, h // 2)), Image.Resampling.BILINEAR)
    if kind == "jpeg20":
        buffer = io.BytesIO()
        img.save(buffer, "JPEG", quality=20)
        return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    if kind in ("crop_side75", "crop_area50", "crop_side50"):
        return centre_crop(img, {"crop_side75": 0.75, "crop_area50": 0.5 ** 0.5, "crop_side50": 0.5}[kind])
    if kind == "hflip":
        return ImageOps.mirror(img)
    if kind == "rot90":
        return img.transpose(Image.Transpose.ROTATE_90)
    if kind == "rot10":
        return img.rotate(10, Image.Resampling.BILINEAR, expand=False, fillcolor=(0, 0, 0))
    if kind == "gray":
        return img.convert("L").convert("RGB")
    if kind == "jitter":
        img = ImageEnhance.Brightness(img).enhance(1.3)
        img = ImageEnhance.Contrast(img).enhance(0.7)
        return ImageEnhance.Color(img).enhance(1.5)
    if kind == "blur2":
        return img.filter(ImageFilter.GaussianBlur(2))
    if kind == "border10":
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        return ImageOps.expand(img, border=(round(0.1 * w), round(0.1 * h)), fill=colour)
    if kind == "text":
        return _caption(img, rng)
    raise CbirError(f"unknown distortion {kind!r}; choose from: {', '.join(DISTORTIONS)}")


def _caption(img: PILImage.Image, rng: np.random.Generator) -> PILImage.Image:
    from PIL import ImageDraw, ImageFont

    img = img.copy()
    w, h = img.size
    size = max(8, round(0.12 * h))
    font = ImageFont.load_default(size=size)
    draw = ImageDraw.Draw(img)
    for line in ("COPYRIGHT", "cbir 2024"):
        x = int(rng.integers(0, max(1, w // 3)))
        y = int(rng.integers(0, max(1, h - 2 * size)))
        draw.text((x, y), line, font=font, fill=(255, 255, 255), stroke_width=max(1, size // 12),
                  stroke_fill=(0, 0, 0))
    return img


def render_copy(query: CopyQuery, load_original: Callable[[int], PILImage.Image]) -> PILImage.Image:
    """The distorted image of ``query``; ``load_original(i)``: collection image i, RGB,
    decoded at full size (a reduced decode would change what a crop shows)."""
    return distort(load_original(query.original), query.kind, query.seed)


# ---------------------------------------------------------------------------
# Which gallery images count as "the original".


def _thumbnail(path: str) -> np.ndarray | None:
    import numpy as np
    from PIL import Image

    from ..errors import ImageError
    from ..imageio.decode import load_image

    try:
        img = load_image(path)
    except ImageError:
        return None
    grey = img.convert("L").resize((TWIN_THUMBNAIL, TWIN_THUMBNAIL), Image.Resampling.BILINEAR)
    return np.asarray(grey, dtype=np.float32).ravel()


def twin_sets(paths: Sequence[str], originals: Sequence[int]) -> dict[int, np.ndarray]:
    """For each original, the gallery indices that count as finding it: itself and
    every file of the same pixel size whose 32x32 grey thumbnail differs from its
    own by <= :data:`TWIN_MAX_MEAN_DIFF` grey levels on average. Decided from
    pixels, never from descriptors, so every descriptor is scored against the same
    truth; only same-size files are decoded (sizes come from the headers)."""
    import numpy as np

    sizes = [image_size(p) for p in paths]
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, size in enumerate(sizes):
        if size is not None:
            by_size.setdefault(size, []).append(i)
    thumbs: dict[int, np.ndarray | None] = {}

    def thumb(i: int) -> np.ndarray | None:
        if i not in thumbs:
            thumbs[i] = _thumbnail(paths[i])
        return thumbs[i]

    out = {}
    for o in (int(i) for i in originals):
        same = [j for j in by_size.get(sizes[o], []) if j != o] if sizes[o] is not None else []
        mine = thumb(o) if same else None
        twins = [j for j in same if mine is not None and (t := thumb(j)) is not None
                 and float(np.abs(t - mine).mean()) <= TWIN_MAX_MEAN_DIFF]
        out[o] = np.array(sorted([o, *twins]), dtype=np.int64)
    return out


# ---------------------------------------------------------------------------
# Scoring a ranking.


def original_ranks(ranked: np.ndarray, originals: Sequence[int], twins: dict[int, np.ndarray]) -> np.ndarray:
    """1-based rank of the first gallery image that counts as each query's
    original (``inf`` when none is in the ranking). ``ranked``: (queries, depth)
    gallery indices, best first, -1 padded; ``originals``: each query's original."""
    import numpy as np

    ranks = np.full(len(ranked), np.inf)
    for q, (row, original) in enumerate(zip(ranked, originals)):
        hits = np.flatnonzero(np.isin(row, twins[int(original)]))
        if hits.size:
            ranks[q] = hits[0] + 1
    return ranks


def score_copies(ranks: np.ndarray, kinds: Sequence[str], originals: Sequence[int] | None = None,
                 bootstrap: Bootstrap | None = None) -> CopyScores:
    """Top-1 (rank 1) and mAP (mean 1/rank) per distortion, from each query's rank
    of its original and its distortion; with ``originals`` (each query's) and
    ``bootstrap``, their intervals too (:func:`copy_intervals`)."""
    import numpy as np

    kinds_array = np.asarray(kinds)
    ranks = np.asarray(ranks, dtype=np.float64)
    top1, mean_ap = {}, {}
    for kind in dict.fromkeys(kinds):
        mine = ranks[kinds_array == kind]
        top1[kind] = float(np.mean(mine == 1))
        mean_ap[kind] = float(np.mean(1.0 / mine))
    intervals = None
    if originals is not None and bootstrap is not None and bootstrap.resamples:
        intervals = copy_intervals(ranks, kinds, originals, bootstrap)
    return CopyScores(top1, mean_ap, len(ranks), intervals)


def copy_intervals(ranks: np.ndarray, kinds: Sequence[str], originals: Sequence[int],
                   bootstrap: Bootstrap) -> dict[str, Any]:
    """Percentile bootstrap intervals of every figure of :func:`score_copies`, over
    the originals: a resample draws originals with replacement, each bringing all
    its copies, so the per-distortion figures and their means move together (the
    copies of one photo are not independent draws). Every original has one copy per
    distortion, so each mean over distortions is the mean over originals of that
    original's own mean."""
    import numpy as np

    from .intervals import bootstrap_intervals

    kinds_array, originals_array = np.asarray(kinds), np.asarray(originals)
    ranks = np.asarray(ranks, dtype=np.float64)
    photos = np.unique(originals_array)
    order = list(dict.fromkeys(kinds))
    rank_of = np.full((len(order), len(photos)), np.nan)
    for k, kind in enumerate(order):
        mine = kinds_array == kind
        rank_of[k, np.searchsorted(photos, originals_array[mine])] = ranks[mine]
    if np.isnan(rank_of).any():
        raise ValueError("every original needs exactly one copy per distortion")
    hits, inverse = (rank_of == 1).astype(np.float64), 1.0 / rank_of
    values = {**{f"top1/{kind}": hits[k] for k, kind in enumerate(order)},
              **{f"map/{kind}": inverse[k] for k, kind in enumerate(order)},
              "mean_top1": hits.mean(axis=0), "mean_map": inverse.mean(axis=0)}
    found = bootstrap_intervals(values, bootstrap)
    return {"top1": {kind: found[f"top1/{kind}"] for kind in order},
            "map": {kind: found[f"map/{kind}"] for kind in order},
            "mean_top1": found["mean_top1"], "mean_map": found["mean_map"]}
