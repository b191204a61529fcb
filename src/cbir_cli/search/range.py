"""Range search: every indexed vector within a similarity threshold of each query
(what ``cbir dedup`` links pairs with), in Faiss's packed layout.

Two ways, one result shape ``(lims, scores, ids)``: the results of query ``i`` are
``scores[lims[i]:lims[i + 1]]`` / ``ids[...]``, best first, every score
``>= threshold``:

* :func:`exact_range_search` -- a flat Faiss index's own range search: exact;
* :func:`knn_range_search` -- for approximate indexes (HNSW, IVF-PQ), whose range
  search is missing or approximate in Faiss: a k-NN search whose (exact, re-ranked)
  scores are cut at the threshold; a query whose k-th neighbour still passes it is
  searched again with 4x the k, until its list ends below the threshold or holds
  the whole index. Its recall is the k-NN search's recall (tested against the exact
  oracle in ``tests/test_range_search.py``).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import faiss
    import numpy as np

RangeResult = tuple["np.ndarray", "np.ndarray", "np.ndarray"]  # (lims, scores, ids)
KnnSearch = Callable[["np.ndarray", int], tuple["np.ndarray", "np.ndarray"]]
# First k of the k-NN approach: near-duplicate groups are small, so almost every
# query is answered by one search of this depth; larger groups search again.
FIRST_K = 16
GROWTH = 4


def pack_ranges(per_query: list[tuple[np.ndarray, np.ndarray]]) -> RangeResult:
    """``[(scores, ids), ...]`` per query -> ``(lims, scores, ids)``, each query's
    results sorted best first."""
    import numpy as np

    lims = np.zeros(len(per_query) + 1, dtype=np.int64)
    lims[1:] = np.cumsum([len(s) for s, _ in per_query])
    if not lims[-1]:
        return lims, np.zeros(0, dtype=np.float32), np.zeros(0, dtype=np.int64)
    scores = np.concatenate([s for s, _ in per_query]).astype(np.float32, copy=False)
    ids = np.concatenate([i for _, i in per_query]).astype(np.int64, copy=False)
    for q in range(len(per_query)):
        a, b = lims[q], lims[q + 1]
        order = np.argsort(-scores[a:b], kind="stable")
        scores[a:b], ids[a:b] = scores[a:b][order], ids[a:b][order]
    return lims, scores, ids


def exact_range_search(index: faiss.Index, queries: np.ndarray, threshold: float,
                       labels: np.ndarray) -> RangeResult:
    """Faiss's exact range search on a flat inner-product ``index``; its labels
    (positions) are mapped to ``labels[position]`` (row ids)."""
    import numpy as np

    # Faiss keeps scores strictly above the radius; one float32 step below the
    # threshold makes the test ">= threshold", then it is applied exactly.
    radius = float(np.nextafter(np.float32(threshold), np.float32(-np.inf)))
    lims, scores, positions = index.range_search(queries, radius)
    ids = labels[positions]
    keep = scores >= threshold
    per_query = [(scores[a:b][keep[a:b]], ids[a:b][keep[a:b]]) for a, b in itertools.pairwise(lims)]
    return pack_ranges(per_query)


def knn_range_search(search: KnnSearch, queries: np.ndarray, threshold: float, total: int,
                     first_k: int = FIRST_K) -> RangeResult:
    """Range search through a k-NN ``search(queries, k) -> (scores, ids)`` whose
    scores are exact and sorted best first; ``total``: vectors in the index (the
    deepest search ever needed). See the module docstring."""
    import numpy as np

    per_query: list[tuple[np.ndarray, np.ndarray]] = [(np.zeros(0, np.float32), np.zeros(0, np.int64))] * len(queries)
    pending = np.arange(len(queries))
    k = max(1, min(first_k, total))
    while len(pending) and total:
        scores, ids = search(queries[pending], k)
        passing = (ids >= 0) & (scores >= threshold)
        # The list may go on above the threshold beyond k: search deeper.
        deeper = passing[:, -1] & (k < total)
        for row in np.flatnonzero(~deeper):
            per_query[int(pending[row])] = (scores[row][passing[row]], ids[row][passing[row]])
        pending = pending[deeper]
        k = min(total, k * GROWTH)
    return pack_ranges(per_query)


def faiss_range_search(index: faiss.Index, queries: np.ndarray, threshold: float, labels: np.ndarray,
                       search: KnnSearch) -> RangeResult:
    """:meth:`FaissBackend.range_search <cbir_cli.search.faiss_backend.FaissBackend.range_search>`:
    Faiss's exact range search on a flat ``index`` (positions mapped to ``labels``),
    else :func:`knn_range_search` through the backend's k-NN ``search``."""
    import faiss

    from .exact import as_queries

    queries = as_queries(queries, index.d)
    if isinstance(faiss.downcast_index(index), faiss.IndexFlat):
        return exact_range_search(index, queries, threshold, labels)
    return knn_range_search(search, queries, threshold, int(index.ntotal))
