"""Near-duplicate groups over a whole index (``cbir dedup``).

Every indexed vector is a query of a range search on the index's search backend
(:meth:`~cbir_cli.search.protocol.SearchBackend.range_search`): each pair of images
at or above the threshold (cosine similarity) is a link, and a group is a
connected component of links. Each group is sorted best first -- the largest
picture (pixels, from the file's header), then the largest file -- and keeps the
exact score of each of its links and of each member against the best.

The default threshold is measured, not guessed (:data:`MEASURED_THRESHOLDS`):
per model and descriptor, the threshold with the best F1 at telling distorted
copies from distinct images (``bench/dedup_threshold.py``, the copy-detection
protocol of :mod:`cbir_cli.evaluate.copies`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import CbirError
from ..imageio.header import image_size
from ..paths import json_path
from ..store.vectors import ShardVectors

if TYPE_CHECKING:
    import numpy as np

    from .dedup_verify import DedupVerification
    from .searcher import Searcher

ProgressCallback = Callable[[int, int], None]  # (images done, total)
QUERY_CHUNK = 1024
# Links beyond this mean the threshold groups unrelated images, not duplicates
# (and would need gigabytes): refused with advice instead.
MAX_LINKS = 20_000_000


# ---------------------------------------------------------------------------
# The default threshold, per model and descriptor.


@dataclass(frozen=True)
class MeasuredThreshold:
    """A threshold and how well it told copies from distinct images where measured."""

    threshold: float
    precision: float
    recall: float
    f1: float
    measured_on: str

    def describe(self) -> str:
        return (f"{self.threshold:g} (precision {self.precision:.3f}, recall {self.recall:.3f} on "
                f"{self.measured_on})")


LEGACY_DESCRIPTOR = "gap-crop"
# (model, descriptor key) -> measurement. Re-measure after changing a model or its
# descriptor: python bench/dedup_threshold.py --model NAME (prints the entry).
MEASURED_THRESHOLDS: dict[tuple[str, str], MeasuredThreshold] = {
    # python bench/dedup_threshold.py --root ../shared/datasets/oxford17flowers --model mobilenet_v2
    # (1,360 images + 2,600 copies: 2,938 duplicate pairs, 4,457,182 distinct pairs).
    # The descriptor before issue 11 (fp32, as indexes were then):
    ("mobilenet_v2", LEGACY_DESCRIPTOR): MeasuredThreshold(
        0.915, 0.839, 0.633, 0.722, "Oxford-17 copies, 200 originals x 13 distortions"),
    # The default descriptor (GeM p=3, whole image, scales 1 and 1.4), int8 as new
    # mobilenet_v2 indexes on the CPU are:
    ("mobilenet_v2", "gem3-full-1+1.4"): MeasuredThreshold(
        0.945, 0.838, 0.727, 0.778, "Oxford-17 copies, 200 originals x 13 distortions"),
}
# Stands in for a model without a measurement: its descriptor's, else the default's.
FALLBACK_MODEL = "mobilenet_v2"


def descriptor_key(fingerprint: dict[str, Any]) -> str:
    """A short name of how an index's vectors were pooled, from its fingerprint:
    ``gap-crop`` (global average of a centre crop: stores without a ``descriptor``
    record), else e.g. ``gem3-full-1+1.4`` (pooling, input, scales)."""
    record = fingerprint.get("descriptor")
    if not record:
        return LEGACY_DESCRIPTOR
    if not isinstance(record, dict):
        return str(record)
    pooling = str(record.get("pooling", "?"))
    if pooling == "gem":
        pooling += f"{float(record.get('gem_p', 3)):g}"
    scales = "+".join(f"{float(s):g}" for s in record.get("scales", [1]))
    return f"{pooling}-{record.get('input', '?')}-{scales}"


@dataclass(frozen=True)
class ThresholdChoice:
    threshold: float
    measured: MeasuredThreshold | None  # for exactly this model and descriptor
    note: str | None = None  # why another measurement stands in


def default_threshold(fingerprint: dict[str, Any]) -> ThresholdChoice:
    """The measured threshold of the index's model and descriptor; where none was
    measured, the fallback's, with a note saying so."""
    key = (str(fingerprint.get("model")), descriptor_key(fingerprint))
    measured = MEASURED_THRESHOLDS.get(key)
    if measured is not None:
        return ThresholdChoice(measured.threshold, measured)
    fallback_key = (FALLBACK_MODEL, key[1])
    if fallback_key not in MEASURED_THRESHOLDS:
        fallback_key = (FALLBACK_MODEL, default_descriptor_key())
    fallback = MEASURED_THRESHOLDS[fallback_key]
    return ThresholdChoice(fallback.threshold, None, (
        f"no duplicate threshold was measured for model {key[0]} with descriptor {key[1]}; using "
        f"{fallback.threshold:g}, measured for {fallback_key[0]} ({fallback_key[1]}) -- measure it with "
        f"bench/dedup_threshold.py --model {key[0]}"))


def default_descriptor_key() -> str:
    """:func:`descriptor_key` of the descriptor new indexes get."""
    from ..models.registry import DEFAULT_DESCRIPTOR

    return descriptor_key({"descriptor": DEFAULT_DESCRIPTOR.fingerprint()})


def check_threshold(threshold: float) -> float:
    if not 0.0 < threshold <= 1.0:
        raise CbirError(f"the duplicate threshold is a cosine similarity in (0, 1] (got {threshold:g})")
    return float(threshold)


@dataclass(frozen=True)
class ThresholdScore:
    threshold: float
    precision: float
    recall: float
    f1: float
    true_pairs: int
    false_pairs: int


def score_threshold(positive: np.ndarray, negative_sorted: np.ndarray, threshold: float) -> ThresholdScore:
    """Pairwise precision/recall/F1 of calling ``>= threshold`` a duplicate, given
    the scores of true duplicate pairs and (sorted ascending) of distinct pairs."""
    import numpy as np

    tp = int(np.count_nonzero(positive >= threshold))
    fp = int(len(negative_sorted) - np.searchsorted(negative_sorted, threshold, side="left"))
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / len(positive) if len(positive) else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return ThresholdScore(threshold, precision, recall, f1, tp, fp)


def best_f1_threshold(positive: np.ndarray, negative: np.ndarray, step: float = 0.005,
                      lowest: float = 0.3) -> ThresholdScore:
    """The threshold (on a grid of ``step``) with the best F1; ties go to the higher
    threshold (fewer false groups)."""
    import numpy as np

    positive = np.asarray(positive, dtype=np.float64)
    negative_sorted = np.sort(np.asarray(negative, dtype=np.float64))
    grid = np.round(np.arange(1.0, lowest - 1e-9, -step), 6)
    scores = [score_threshold(positive, negative_sorted, float(t)) for t in grid]
    return max(scores, key=lambda s: (round(s.f1, 9), s.threshold))


# ---------------------------------------------------------------------------
# Groups.


@dataclass(frozen=True)
class Member:
    id: int
    path: str  # as stored (display_path() to print it)
    width: int  # 0 when the file is gone or unreadable now
    height: int
    bytes: int
    score_to_best: float  # cosine similarity with the group's best member (1 for itself)

    @property
    def pixels(self) -> int:
        return self.width * self.height

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, **json_path(self.path), "width": self.width, "height": self.height,
                "bytes": self.bytes, "score_to_best": round(self.score_to_best, 6)}


@dataclass
class DuplicateGroup:
    """Members best first; ``links``: (id, id, score) of every pair at or above the
    threshold (the group is their connected component)."""

    members: list[Member]
    links: list[tuple[int, int, float]]

    @property
    def best(self) -> Member:
        return self.members[0]

    @property
    def others(self) -> list[Member]:
        return self.members[1:]

    def as_dict(self) -> dict[str, Any]:
        return {"best": self.best.id, "members": [m.as_dict() for m in self.members],
                "pairs": [{"a": a, "b": b, "score": round(s, 6)} for a, b, s in self.links]}


@dataclass
class DedupResult:
    threshold: float
    images: int
    groups: list[DuplicateGroup]
    index_type: str
    seconds: float
    notes: list[str] = field(default_factory=list)

    @property
    def duplicates(self) -> int:
        """Images that are not the best of their group."""
        return sum(len(g.others) for g in self.groups)

    @property
    def duplicate_bytes(self) -> int:
        return sum(m.bytes for g in self.groups for m in g.others)

    def as_dict(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "images": self.images, "groups": [g.as_dict() for g in self.groups],
                "duplicates": self.duplicates, "duplicate_bytes": self.duplicate_bytes,
                "index_type": self.index_type, "seconds": round(self.seconds, 3), "notes": self.notes}


def find_links(searcher: Searcher, threshold: float, chunk: int = QUERY_CHUNK,
               on_progress: ProgressCallback | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair of indexed images scoring ``>= threshold``, once each: ``(a, b,
    score)`` arrays of row ids with ``a < b``. Each image's stored vector queries the
    search backend's range search, a chunk of images at a time."""
    import numpy as np

    threshold = check_threshold(threshold)
    ids = np.fromiter((r.id for r in searcher.rows), dtype=np.int64, count=len(searcher.rows))
    vectors = ShardVectors(searcher.store)  # positions in live-row order, as searcher.rows
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    links = 0
    for start in range(0, len(ids), chunk):
        positions = np.arange(start, min(len(ids), start + chunk))
        lims, scores, found = searcher.backend.range_search(vectors[positions], threshold)
        queries = np.repeat(ids[positions], np.diff(lims))
        other = found != queries
        a, b = np.minimum(queries, found)[other], np.maximum(queries, found)[other]
        parts.append((a, b, scores[other]))
        links += len(a)
        if links > 2 * MAX_LINKS:  # each pair is usually found from both sides
            raise CbirError(f"similarity {threshold:g} links more than {MAX_LINKS:,} pairs of images: that groups "
                            "unrelated images, not duplicates; use a higher threshold")
        if on_progress is not None:
            on_progress(int(positions[-1]) + 1, len(ids))
    if not parts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    a, b, s = (np.concatenate(x) for x in zip(*parts))
    # One entry per pair (found from both sides, or from one by an approximate index).
    order = np.lexsort((-s, b, a))
    a, b, s = a[order], b[order], s[order]
    first = np.ones(len(a), dtype=bool)
    first[1:] = (a[1:] != a[:-1]) | (b[1:] != b[:-1])
    return a[first], b[first], s[first]


def connected_groups(a: np.ndarray, b: np.ndarray) -> list[list[int]]:
    """Connected components (of two or more ids) of the links ``a[i] - b[i]``, each
    sorted, largest first."""
    parent: dict[int, int] = {}

    def root(x: int) -> int:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for x, y in zip(a.tolist(), b.tolist()):
        rx, ry = root(x), root(y)
        if rx != ry:
            parent[max(rx, ry)] = min(rx, ry)
    components: dict[int, list[int]] = {}
    for x in parent:
        components.setdefault(root(x), []).append(x)
    return sorted((sorted(c) for c in components.values()), key=lambda c: (-len(c), c[0]))


def find_duplicates(searcher: Searcher, threshold: float, on_progress: ProgressCallback | None = None,
                    chunk: int = QUERY_CHUNK, verification: DedupVerification | None = None) -> DedupResult:
    """The groups of near-duplicate images of the index ``searcher`` has open (see
    the module docstring); with ``verification``, also the pairs between its floor
    and ``threshold`` that :mod:`.dedup_verify` verifies as the same picture.
    Nothing is changed.

    Args:
        searcher: the open index.
        threshold: cosine similarity at or above which two images are linked.
        on_progress: called with (images compared, images in all) as the work goes.
        chunk: stored vectors searched per batch.
        verification: the second look below ``threshold`` (None: none).

    Returns:
        The groups, each best image first, with counts, bytes and notes.
    """
    import numpy as np

    started = time.perf_counter()
    notes = []
    a, b, s = find_links(searcher, threshold, chunk, on_progress)
    if verification is not None and verification.floor < threshold:
        from .dedup_verify import candidate_pairs, verify_pairs

        ca, cb, cs = candidate_pairs(searcher, verification, threshold, chunk)
        verified = verify_pairs(searcher, ca, cb, verification.workers)
        a, b, s = (np.concatenate(x) for x in ((a, ca[verified]), (b, cb[verified]), (s, cs[verified])))
        notes.append(f"{len(ca)} pairs below {threshold:g} checked, {int(verified.sum())} verified as the same "
                     f"picture ({verification.describe()})")
    by_group: dict[int, list[tuple[int, int, float]]] = {}
    components = connected_groups(a, b)
    group_of = {i: g for g, members in enumerate(components) for i in members}
    for x, y, score in zip(a.tolist(), b.tolist(), s.tolist()):
        by_group.setdefault(group_of[x], []).append((x, y, score))
    groups = []
    for g, ids in enumerate(components):
        members = sorted((_member(searcher, i) for i in ids), key=lambda m: (-m.pixels, -m.bytes, m.path))
        vectors = searcher.backend.vectors(np.asarray([m.id for m in members], dtype=np.int64))
        to_best = vectors @ vectors[0]
        members = [Member(m.id, m.path, m.width, m.height, m.bytes, float(t)) for m, t in zip(members, to_best)]
        groups.append(DuplicateGroup(members, sorted(by_group[g], key=lambda link: -link[2])))
    if not searcher.index_type.startswith(("flat", "exact")):
        notes.append(f"the {searcher.index_type} index is approximate: a pair its nearest-neighbour search misses "
                     "is not linked")
    return DedupResult(threshold, searcher.count, groups, searcher.index_type, time.perf_counter() - started, notes)


def _member(searcher: Searcher, image_id: int) -> Member:
    row = searcher.row(image_id)
    width, height = image_size(row.path) or (0, 0)
    return Member(row.id, row.path, width, height, row.size, 0.0)
