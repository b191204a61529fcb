"""``cbir dedup``'s second look: pairs the global descriptor scores below the
threshold but above a floor are checked with local features and geometry
(:mod:`.verify`); a pair verified as the same picture is linked whatever its
cosine. This is what finds greyscale copies and heavy crops, which a global
descriptor scores like merely similar photos. Grey images also get a colour-blind
second look (:func:`grey_pairs`): a greyscale copy's original can be far down
its CNN neighbours.

Cost: a reduced decode of every image (the grey signatures), one local-feature
extraction per image that has a candidate pair (on the fly, from the files; in
parallel) and one match per pair; at most
:data:`NEIGHBOURS` candidate pairs per image keep that linear in the index size.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import CbirError

if TYPE_CHECKING:
    import numpy as np

    from .searcher import Searcher

# Candidate pairs need at least this cosine: the copies protocol's greyscale and
# quarter-area crops score above it with the default descriptor, while most
# pairs of unrelated photos score below it (bench/dedup_peers.py).
FLOOR = 0.5
# Candidates per image, its nearest first: a copy is among its original's
# nearest few images even when their cosine is low.
NEIGHBOURS = 5


@dataclass(frozen=True)
class DedupVerification:
    floor: float = FLOOR
    neighbours: int = NEIGHBOURS
    workers: int = 0  # 0: one per core
    grey_look: bool = True  # the colour-blind second look for grey images

    def __post_init__(self) -> None:
        if not 0.0 < self.floor <= 1.0:
            raise CbirError(f"the verification floor is a cosine similarity in (0, 1] (got {self.floor:g})")
        if self.neighbours < 1:
            raise CbirError(f"verify at least 1 neighbour per image (got {self.neighbours})")

    def describe(self) -> str:
        look = ", and grey images' look-alikes in grey levels," if self.grey_look else ""
        return (f"pairs from similarity {self.floor:g} (each image's {self.neighbours} nearest){look} verified "
                "with local features and geometry")


def nearest_pairs(searcher: Searcher, neighbours: int, floor: float, below: float,
                  chunk: int = 1024) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each indexed image's ``neighbours`` nearest other images scoring in
    ``[floor, below)``, once per pair: ``(a, b, score)`` with ``a < b``. A k-NN
    search, not a range search: the candidates grow with the index, not with the
    square of it."""
    import numpy as np

    from ..store.vectors import ShardVectors

    ids = np.fromiter((r.id for r in searcher.rows), dtype=np.int64, count=len(searcher.rows))
    vectors = ShardVectors(searcher.store)  # positions in live-row order, as searcher.rows
    parts = []
    k = min(neighbours + 1, len(ids))
    for start in range(0, len(ids), chunk):
        positions = np.arange(start, min(len(ids), start + chunk))
        scores, found = searcher.backend.search(vectors[positions], k)
        queries = np.repeat(ids[positions], scores.shape[1])
        scores, found = scores.ravel(), found.ravel()
        keep = (found >= 0) & (found != queries) & (scores >= floor) & (scores < below)
        parts.append((np.minimum(queries, found)[keep], np.maximum(queries, found)[keep], scores[keep]))
    if not parts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    a, b, s = (np.concatenate(x) for x in zip(*parts))
    _, first = np.unique(np.stack([a, b], axis=1), axis=0, return_index=True)
    first = np.sort(first)
    return a[first], b[first], s[first]


def grey_pairs(searcher: Searcher, below: float, k: int = 0,
               workers: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The colour-blind second look (:mod:`.colour_blind`): each grey image with the
    ``k`` images whose grey levels look most like it, as ``(a, b, cosine)`` with
    ``a < b``, pairs scoring ``>= below`` left out (linked already). One reduced
    decode per indexed image."""
    import numpy as np

    from .colour_blind import GREY_CANDIDATES, GreySignatures

    ids = np.fromiter((r.id for r in searcher.rows), dtype=np.int64, count=len(searcher.rows))
    signatures = GreySignatures([r.path for r in searcher.rows], workers)
    matrix = signatures.matrix()
    pairs = set()
    for position in np.flatnonzero(signatures.grey).tolist():
        for other in signatures.nearest(matrix[position], k or GREY_CANDIDATES, exclude=position):
            x, y = int(ids[position]), int(ids[other])
            pairs.add((min(x, y), max(x, y)))
    if not pairs:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    a, b = (np.array(x, dtype=np.int64) for x in zip(*sorted(pairs)))
    scores = np.einsum("ij,ij->i", searcher.backend.vectors(a), searcher.backend.vectors(b))
    keep = scores < below
    return a[keep], b[keep], scores[keep].astype(np.float32)


def verify_pairs(searcher: Searcher, a: np.ndarray, b: np.ndarray, workers: int = 0) -> np.ndarray:
    """Mask of the pairs of image ids ``(a[i], b[i])`` whose files are verified as the
    same picture (:func:`.verify.verify`); an unreadable file verifies nothing."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from ..imageio.local_features import extract_file
    from .verify import verify_keys

    ids = sorted(set(a.tolist()) | set(b.tolist()))
    workers = workers or os.cpu_count() or 1
    # OpenCV's detection releases the GIL: threads extract in parallel.
    with ThreadPoolExecutor(workers) as pool:
        features = dict(zip(ids, pool.map(lambda i: extract_file(searcher.row(i).path), ids)))
        pairs = list(zip(a.tolist(), b.tolist()))
        step = max(1, len(pairs) // (4 * workers) + 1)
        chunks = [pairs[i:i + step] for i in range(0, len(pairs), step)]
        checks = [c for part in pool.map(lambda chunk: verify_keys(features.get, chunk), chunks) for c in part]
    return np.array([c.same_picture for c in checks], dtype=bool)


def candidate_pairs(searcher: Searcher, verification: DedupVerification, below: float,
                    chunk: int = 1024) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs worth verifying, once each: :func:`nearest_pairs` and, unless
    ``verification.grey_look`` is off, :func:`grey_pairs`."""
    import numpy as np

    a, b, s = nearest_pairs(searcher, verification.neighbours, verification.floor, below, chunk)
    if verification.grey_look:
        ga, gb, gs = grey_pairs(searcher, below, workers=verification.workers)
        a, b, s = np.concatenate([a, ga]), np.concatenate([b, gb]), np.concatenate([s, gs])
        _, first = np.unique(np.stack([a, b], axis=1), axis=0, return_index=True)
        first = np.sort(first)
        a, b, s = a[first], b[first], s[first]
    return a, b, s
