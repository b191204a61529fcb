"""Faiss indexes of vectors: which kind for a collection (flat, HNSW, IVF-PQ),
building and training one, and searching it with exact re-ranking.

Index types: ``flat`` (exact; the oracle), ``hnsw`` (graph, all vectors in RAM),
``ivfpq`` (IVF with 4-bit fast-scan PQ codes, 64 bytes per 2048-d vector; its
shortlist is re-ranked with the exact vectors read from the memory-mapped shards,
so scores are exact), and ``auto`` (flat up to :data:`AUTO_FLAT_MAX` vectors,
then ivfpq). Persistence and upkeep of a store's saved index: :mod:`.saved_index`;
the search backend on top: :mod:`.faiss_backend`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..errors import CbirError
from .exact import as_queries, empty_results, rerank

if TYPE_CHECKING:
    import faiss
    import numpy as np

INDEX_TYPES = ("flat", "hnsw", "ivfpq", "auto")

# `auto` keeps exact search up to this many vectors. bench/query.py on 2 CPU cores,
# 2048-d: a single-query flat scan costs ~18 ms at 10k and ~120 ms at 100k (memory
# bound, linear in n), while IVF-PQ + exact re-ranking answers in < 1 ms with
# recall@10 0.97-0.995 and ~1/80 of the RAM (full vectors stay on disk,
# memory-mapped). 50k keeps exact answers under ~60 ms; above it, IVF-PQ.
AUTO_FLAT_MAX = 50_000
# Below this, IVF-PQ saves nothing worth its approximation (and k-means needs
# enough points): `ivfpq` builds an exact index instead, and says so in its meta.
IVFPQ_MIN_VECTORS = 1_000
# Lists scanned per query (of ~sqrt(n)): 32 gave recall@10 >= 0.99 after re-ranking
# on the synthetic bench data at 10k (16 gave 0.94).
IVF_NPROBE = 32
HNSW_EF_SEARCH = 64
# Points per IVF centroid used for k-means training (faiss warns below 39).
TRAIN_POINTS_PER_LIST = 64
# Shortlist of the compressed search that is re-ranked exactly: SHORTLIST_FACTOR * k,
# at least SHORTLIST_MIN.
SHORTLIST_FACTOR = 10
SHORTLIST_MIN = 100


def resolve_index_type(index_type: str, n: int) -> str:
    """The concrete index kind (flat | hnsw | ivfpq) for a requested type and size."""
    if index_type not in INDEX_TYPES:
        raise CbirError(f"unknown index type {index_type!r}; choose one of: {', '.join(INDEX_TYPES)}")
    if index_type == "auto":
        return "flat" if n <= AUTO_FLAT_MAX else "ivfpq"
    if index_type == "ivfpq" and n < IVFPQ_MIN_VECTORS:
        return "flat"
    return index_type


def ivf_lists(n: int) -> int:
    """IVF list count: about sqrt(n), a power of two, with enough training points per list."""
    lists = 1
    while lists * 2 <= max(1, int(n**0.5)) and (lists * 2) * 39 <= n:
        lists *= 2
    return lists


def factory_string(index_type: str, n: int, dim: int = 2048) -> str:
    """Faiss index_factory string for an index type, collection size and dimension."""
    kind = resolve_index_type(index_type, n)
    if kind == "flat":
        return "Flat"
    if kind == "hnsw":
        return "HNSW32,Flat"
    # 4-bit fast-scan PQ, one sub-quantizer per 16 dimensions (at least 32 for small
    # dimensions, whose codes would otherwise be too coarse to shortlist): 2048-d ->
    # 64 bytes per vector, 128x less than float32. 8-bit PQ with as many
    # sub-quantizers took minutes to train on 2 cores for 10k vectors; 4-bit trains
    # in seconds, and the exact re-ranking recovers the ranking either way.
    # Fast-scan packs two codes per byte (even count); other dimensions get SQ8.
    subquantizers = max(dim // 16, min(dim // 2, 32))
    if dim % subquantizers == 0 and subquantizers % 2 == 0:
        return f"IVF{ivf_lists(n)},PQ{subquantizers}x4fs"
    return f"IVF{ivf_lists(n)},SQ8"


def needs_rerank(index: faiss.Index) -> bool:
    """Whether the index holds compressed codes (the IVF kinds: PQ or SQ8), whose
    scores must be re-ranked with the exact vectors."""
    import faiss

    downcast = faiss.downcast_index(index)
    if isinstance(downcast, faiss.IndexShards):  # a saved IVF index with its segments (.index_segments)
        index = downcast.at(0)
    try:
        faiss.extract_index_ivf(index)
    except RuntimeError:
        return False
    return True


def _training_sample(vectors: Any, n: int, lists: int) -> np.ndarray:
    import numpy as np

    # Enough points for the IVF k-means and for PQ's 256 centroids per sub-quantizer;
    # a fixed seed makes a rebuild of the same store give the same index.
    size = min(n, max(lists * TRAIN_POINTS_PER_LIST, 256 * 40))
    picks = np.arange(n) if size == n else np.sort(np.random.default_rng(0).choice(n, size, replace=False))
    return np.ascontiguousarray(vectors[picks], dtype=np.float32)


def build_index(vectors: Any, index_type: str = "flat", add_chunk: int = 16384,
                labels: np.ndarray | None = None) -> faiss.Index:
    """An inner-product Faiss index holding ``vectors`` (row i gets label i).

    ``vectors``: an (n, d) array, a memory map, or anything indexable by an array of
    row numbers (:class:`ShardVectors`); rows are added in chunks, so an IVF-PQ index
    over memory-mapped shards is built without loading every vector at once.
    ``labels`` (an IVF index only, whose lists keep any label): row i gets
    ``labels[i]`` instead -- a store's row ids, so that rows can later be removed
    and added without renumbering the rest (:mod:`.index_upkeep`).
    """
    import faiss
    import numpy as np

    n, dim = len(vectors), int(vectors.shape[1])
    factory = factory_string(index_type, n, dim)
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        pq = getattr(faiss.downcast_index(index), "pq", None)
        if pq is not None:
            # A small collection trains PQ on fewer than 39 points per centroid; that
            # is expected (codes only pick the shortlist), so skip faiss's warning.
            pq.cp.min_points_per_centroid = 1
        index.train(_training_sample(vectors, n, faiss.extract_index_ivf(index).nlist))
        faiss.extract_index_ivf(index).nprobe = IVF_NPROBE
    hnsw = getattr(faiss.downcast_index(index), "hnsw", None)
    if hnsw is not None:
        # faiss's default (16) loses recall on 2048-d features; saved with the index.
        hnsw.efSearch = HNSW_EF_SEARCH
    add_rows(index, vectors, np.arange(n), None if labels is None else np.asarray(labels, dtype=np.int64), add_chunk)
    return index


def add_rows(index: faiss.Index, vectors: Any, rows: np.ndarray, labels: np.ndarray | None,
             chunk: int = 16384) -> None:
    """Add ``vectors[rows]`` to ``index`` in chunks (labelled ``labels``, aligned with
    ``rows``, or else by their order of addition)."""
    import numpy as np

    for start in range(0, len(rows), chunk):
        part = as_queries(np.asarray(vectors[rows[start:start + chunk]]), index.d)
        if labels is None:
            index.add(part)
        else:
            index.add_with_ids(part, labels[start:start + chunk])


def search_index(
    index: faiss.Index, queries: np.ndarray, k: int, exact_vectors: Any | None = None,
    positions_of: Callable[[np.ndarray], np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(D, I) for each query; all queries go through one search call.

    ``exact_vectors`` (rows aligned with the index labels): re-rank a shortlist of
    ``max(SHORTLIST_FACTOR * k, SHORTLIST_MIN)`` candidates with exact inner products,
    which makes a compressed (PQ) index return exact scores and near-exact rankings.
    ``positions_of``: the index's labels are not rows of ``exact_vectors`` (they are
    row ids): this maps the shortlist's labels to them (-1 stays -1).
    """
    queries = as_queries(queries, index.d)
    if k < 1:
        raise ValueError(f"k must be >= 1 (got {k})")
    if index.ntotal == 0:
        return empty_results(len(queries), k)
    if exact_vectors is None:
        return index.search(queries, k)
    shortlist = min(index.ntotal, max(SHORTLIST_FACTOR * k, SHORTLIST_MIN))
    _, candidates = index.search(queries, shortlist)
    if positions_of is not None:
        candidates = positions_of(candidates)
    return rerank(queries, candidates, exact_vectors, k)
