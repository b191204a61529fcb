"""Narrowing results: only images below a folder (``under``), only scores at or
above a minimum (``min_score``) -- still K results whenever K qualify.

A filter is applied after the search, so a search that returns the top K and
then filters could come back short. :func:`filtered_search` searches deeper
instead: first as deep as the share of images that pass the folder filter
suggests, then 4x deeper each time, until every query has K results that pass,
its list falls below ``min_score`` (nothing deeper can pass), or the whole index
was ranked. A re-ranked list (:mod:`.rerank`) is filtered in its re-ranked order;
its scores (cosines to the query) need not decrease, so the minimum score cannot
end it early: it ends once it holds every result that can pass (counted by a
range search of the raw vectors).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import CbirError
from ..paths import common_folder, display_path, normalise_path

if TYPE_CHECKING:
    import numpy as np

    from ..store.feature_store import Row

KnnSearch = Callable[["np.ndarray", int], tuple["np.ndarray", "np.ndarray"]]
RangeSearch = Callable[["np.ndarray", float], tuple["np.ndarray", "np.ndarray", "np.ndarray"]]
# Queries -> how many results each can have that pass the filter.
PassingCount = Callable[["np.ndarray"], "np.ndarray"]
GROWTH = 4


@dataclass(frozen=True)
class ResultFilter:
    """``under``: a folder, absolute (stored-path form) or relative to the indexed
    folder (see :func:`make`); ``min_score``: the lowest cosine similarity kept.

    One rule for the CLI, the library and the web API: a relative folder is read
    from the indexed folder -- the deepest folder holding every indexed image, which
    the results' ``folder`` is relative to (the web has no current directory, and
    a query means the same from anywhere). A folder below which no indexed image
    lies (a typo, or outside the index) is an error, not an empty answer."""

    under: str | None = None
    min_score: float | None = None

    @classmethod
    def make(cls, under: str | os.PathLike[str] | None = None, min_score: float | None = None,
             base: str | os.PathLike[str] | None = None) -> ResultFilter:
        """Validated. ``under``: ``~`` expanded; absolute, it is normalised like stored
        paths; relative, it is kept so and read from the indexed folder at search time
        (``base``: read it from this folder now instead).

        Args:
            under: only results below this folder; None or blank: anywhere.
            min_score: only results scoring at least this cosine similarity.
            base: resolve a relative ``under`` from this folder now.

        Returns:
            The filter.

        Raises:
            CbirError: a minimum score outside [-1, 1].
        """
        if min_score is not None and not -1.0 <= float(min_score) <= 1.0:
            raise CbirError(f"the minimum score is a cosine similarity in [-1, 1] (got {min_score:g})")
        folder = None
        if under is not None and str(under).strip():
            raw = os.path.expanduser(os.fspath(under))
            if base is not None and not os.path.isabs(raw):
                raw = os.path.join(os.fspath(base), raw)
            if os.path.isabs(raw):
                folder = normalise_path(raw).rstrip(os.sep) or os.sep
            else:
                folder = os.path.normpath(raw)
        return cls(folder, None if min_score is None else float(min_score))

    @property
    def active(self) -> bool:
        """Whether it filters anything."""
        return self.under is not None or self.min_score is not None

    def folder_in(self, indexed_folder: str) -> str | None:
        """``under`` as an absolute folder.

        Args:
            indexed_folder: the folder a relative ``under`` is read from.

        Returns:
            The folder, or None (no folder filter).
        """
        if self.under is None or os.path.isabs(self.under):
            return self.under
        return normalise_path(os.path.join(indexed_folder, self.under)).rstrip(os.sep) or os.sep

    def allowed_ids(self, rows: Sequence[Row]) -> np.ndarray | None:
        """Sorted ids of the rows below ``under``.

        Args:
            rows: the index's rows.

        Returns:
            int64 ids, sorted; None when there is no folder filter.

        Raises:
            CbirError: no row lies below ``under``.
        """
        import numpy as np

        if self.under is None:
            return None
        # The indexed folder is worked out (one pass over every path) only where needed.
        indexed = common_folder([r.path for r in rows]) if rows and not os.path.isabs(self.under) else None
        folder = self.folder_in(indexed or os.sep)
        assert folder is not None
        prefix = folder.rstrip(os.sep) + os.sep
        ids = np.sort(np.fromiter((r.id for r in rows if r.path.startswith(prefix)), dtype=np.int64))
        if not len(ids) and rows:
            indexed = indexed or common_folder([r.path for r in rows])
            given = "" if folder == self.under else f" ({display_path(folder)})"
            raise CbirError(f"{display_path(self.under)}{given}: no indexed image below this folder (the indexed "
                            f"folder, which a relative one is read from, is {display_path(indexed)})")
        return ids


NO_FILTER = ResultFilter()


def first_depth(k: int, count: int, allowed: int | None) -> int:
    """How deep to search first: k, or -- when only ``allowed`` of ``count`` images
    pass the folder filter -- twice the depth at which k of them are expected."""
    if allowed is None or allowed >= count:
        return min(k, count)
    return min(count, max(k, 2 * math.ceil(k * count / max(1, allowed))))


def filtered_search(search: KnnSearch, queries: np.ndarray, k: int, count: int, result_filter: ResultFilter,
                    allowed: np.ndarray | None, can_pass: PassingCount | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k ``(scores, ids)`` per query among the results that pass the filter
    (``allowed``: its sorted ids below the folder, see :meth:`ResultFilter.allowed_ids`),
    -1 / -inf padded where fewer pass. See the module docstring. ``can_pass``: for
    a ``search`` whose scores need not decrease (re-ranked), how many results of
    each query pass the filter at most (:func:`passing_counts`); asked only for
    queries still short after the first search."""
    import numpy as np

    out_scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    out_ids = np.full((len(queries), k), -1, dtype=np.int64)
    if allowed is not None and not len(allowed):
        return out_scores, out_ids
    depth = first_depth(k, count, None if allowed is None else len(allowed))
    pending = np.arange(len(queries))
    limits: np.ndarray | None = None  # can_pass's answer, for every query
    while len(pending):
        scores, ids = search(queries[pending], depth)
        passing = ids >= 0
        if allowed is not None:
            passing &= np.isin(ids, allowed)
        if result_filter.min_score is not None:
            passing &= scores >= result_filter.min_score
        found = passing.sum(axis=1)
        enough = found >= k
        if result_filter.min_score is None:
            below = np.zeros(len(pending), dtype=bool)
        elif can_pass is None:
            # Scores come best first: once the last is below the minimum, deeper ones are too.
            below = scores[:, -1] < result_filter.min_score
        else:
            if limits is None and not enough.all():
                limits = np.full(len(queries), count, dtype=np.int64)
                limits[pending] = can_pass(queries[pending])
            below = enough if limits is None else found >= limits[pending]
        done = enough | below | (depth >= count)
        for row in np.flatnonzero(done):
            keep = np.flatnonzero(passing[row])[:k]
            out_scores[pending[row], :len(keep)] = scores[row, keep]
            out_ids[pending[row], :len(keep)] = ids[row, keep]
        pending = pending[~done]
        depth = min(count, depth * GROWTH)
    return out_scores, out_ids


def passing_counts(range_search: RangeSearch, queries: np.ndarray, min_score: float,
                   allowed: np.ndarray | None) -> np.ndarray:
    """How many indexed vectors score ``>= min_score`` against each query (and lie
    below the folder: ``allowed``), from a range search of the raw vectors."""
    import numpy as np

    lims, _scores, ids = range_search(queries, min_score)
    hits = np.ones(len(ids), dtype=np.int64) if allowed is None else np.isin(ids, allowed).astype(np.int64)
    total = np.concatenate([[0], np.cumsum(hits)])
    return total[np.asarray(lims[1:], dtype=np.int64)] - total[np.asarray(lims[:-1], dtype=np.int64)]
