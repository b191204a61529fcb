"""What a stored vector must be: finite, and unit length (the embedders L2-normalise
every row) or exactly zero (a hand-crafted descriptor that found nothing in an
image, e.g. no SIFT keypoints on a blank picture: it scores 0 against everything).

Anything else is damage or a bug, and is never written (:meth:`FeatureStore.add_shard`
refuses it) nor reused from a shard (:meth:`FeatureStore.vectors_for` leaves it
out, so the file is embedded again): a single 5e34-long vector would otherwise come
first in every search.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

UNIT_NORM_TOLERANCE = 1e-3
INVALID_VECTOR = "the model produced an invalid vector (not finite, or neither unit length nor zero)"


def invalid_rows(vectors: np.ndarray) -> np.ndarray:
    """Boolean mask of the rows of a float (n, d) array that may not be stored."""
    import numpy as np

    vectors = np.asarray(vectors)
    with np.errstate(over="ignore", invalid="ignore"):
        finite = np.isfinite(vectors).all(axis=1)
        norms = np.linalg.norm(np.where(np.isfinite(vectors), vectors, 0).astype(np.float64), axis=1)
    unit_or_zero = (np.abs(norms - 1.0) <= UNIT_NORM_TOLERANCE) | (norms == 0.0)
    return ~(finite & unit_or_zero)
