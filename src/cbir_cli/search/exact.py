"""Exact inner-product search: the oracle every faster path is tested against, and
the re-ranking that makes a compressed index's shortlist exact.

Array contract (as faiss): float32 (n, d) in; ``(D, I)`` out, each (nq, k), scores
are inner products (= cosine for unit vectors), ``I == -1`` (score ``-inf``) where
fewer than k results exist.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

def as_queries(x: np.ndarray, d: int) -> np.ndarray:
    import numpy as np

    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2 or x.shape[1] != d:
        raise ValueError(f"expected float32 array of shape (n, {d}), got {x.shape}")
    return x


def empty_results(nq: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    import numpy as np

    return np.full((nq, k), -np.inf, dtype=np.float32), np.full((nq, k), -1, dtype=np.int64)


def rerank(
    queries: np.ndarray, candidates: np.ndarray, vectors: Any, k: int, chunk_size: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k among each query's ``candidates`` (-1 = no candidate). Each
    distinct candidate vector is read once per chunk of queries, in row order (so a
    memory-mapped source reads forward)."""
    import numpy as np

    D, I = empty_results(len(queries), k)
    for start in range(0, len(queries), chunk_size):
        q = queries[start:start + chunk_size]
        cand = candidates[start:start + chunk_size]
        valid = cand >= 0
        unique = np.unique(cand[valid])
        if not len(unique):
            continue
        table = np.asarray(vectors[unique], dtype=np.float32)
        # A few queries: numpy's own loop. A threaded BLAS call this small took 6-20 ms
        # instead of 0.3 on the shared 2-core machine (its threads wait for a core).
        products = np.einsum("qd,nd->qn", q, table) if len(q) <= 8 else q @ table.T
        scores = np.take_along_axis(products, np.searchsorted(unique, np.where(valid, cand, unique[0])), axis=1)
        scores[~valid] = -np.inf
        kk = min(k, cand.shape[1])
        order = np.argsort(-scores, axis=1, kind="stable")[:, :kk]
        top_scores = np.take_along_axis(scores, order, axis=1)
        top_ids = np.where(np.isfinite(top_scores), np.take_along_axis(cand, order, axis=1), -1)
        D[start:start + len(q), :kk] = top_scores
        I[start:start + len(q), :kk] = top_ids
    return D, I


def exact_search(
    gallery: np.ndarray, queries: np.ndarray, k: int, chunk_size: int = 2048
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k inner-product search, in query chunks so an all-vs-all over 60k
    images never holds the 60k x 60k score matrix (faiss.knn does the top-k
    selection per block)."""
    import faiss
    import numpy as np

    gallery = as_queries(gallery, gallery.shape[1])
    queries = as_queries(queries, gallery.shape[1])
    D = np.full((len(queries), k), -np.inf, dtype=np.float32)
    I = np.full((len(queries), k), -1, dtype=np.int64)
    kk = min(k, len(gallery))
    if kk == 0:
        return D, I
    for start in range(0, len(queries), chunk_size):
        stop = start + chunk_size
        d, i = faiss.knn(queries[start:stop], gallery, kk, metric=faiss.METRIC_INNER_PRODUCT)
        D[start:stop, :kk] = d
        I[start:stop, :kk] = i
    return D, I
