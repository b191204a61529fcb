"""Faiss indexes over a feature store.

Array contract (as faiss): float32 (n, d) in; ``(D, I)`` out, each (nq, k), scores
are inner products (= cosine for unit vectors), ``I == -1`` where fewer than k
results exist. Exact flat search is the default and the oracle every approximate
index is tested against. The index is derived data: it records the store
generation it was built from and is rebuilt whenever it is stale or missing.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import CbirError, CorruptStoreError
from .store import REPAIR_HINT, FeatureStore, atomic_write_bytes, atomic_write_json, bytes_sha256

if TYPE_CHECKING:
    import faiss
    import numpy as np

    # Row-addressable float32 (n, d) vectors: an array, a memory map or ShardVectors.
    VectorSource = np.ndarray | "ShardVectors"

    from .extract import ExtractOptions, ExtractSummary, SkipCallback
    from .models import Embedder

INDEX_DIR = "index"
INDEX_FILE = "index.faiss"
INDEX_META = "index.json"
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


def _as_queries(x: np.ndarray, d: int) -> np.ndarray:
    import numpy as np

    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2 or x.shape[1] != d:
        raise ValueError(f"expected float32 array of shape (n, {d}), got {x.shape}")
    return x


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

    try:
        faiss.extract_index_ivf(index)
    except RuntimeError:
        return False
    return True


def _training_sample(vectors: VectorSource, n: int, lists: int) -> np.ndarray:
    import numpy as np

    # Enough points for the IVF k-means and for PQ's 256 centroids per sub-quantizer;
    # a fixed seed makes a rebuild of the same store give the same index.
    size = min(n, max(lists * TRAIN_POINTS_PER_LIST, 256 * 40))
    picks = np.arange(n) if size == n else np.sort(np.random.default_rng(0).choice(n, size, replace=False))
    return np.ascontiguousarray(vectors[picks], dtype=np.float32)


def build_index(vectors: VectorSource, index_type: str = "flat", add_chunk: int = 65536) -> faiss.Index:
    """An inner-product Faiss index holding ``vectors`` (row i gets label i).

    ``vectors``: an (n, d) array, a memory map, or anything indexable by an array of
    row numbers (:class:`ShardVectors`); rows are added in chunks, so an IVF-PQ index
    over memory-mapped shards is built without loading every vector at once.
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
    for start in range(0, n, add_chunk):
        rows = np.arange(start, min(n, start + add_chunk))
        index.add(_as_queries(np.asarray(vectors[rows]), dim))
    return index


def _empty_results(nq: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    import numpy as np

    return np.full((nq, k), -np.inf, dtype=np.float32), np.full((nq, k), -1, dtype=np.int64)


def search_index(
    index: faiss.Index, queries: np.ndarray, k: int, exact_vectors: VectorSource | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(D, I) for each query; all queries go through one search call.

    ``exact_vectors`` (rows aligned with the index labels): re-rank a shortlist of
    ``max(SHORTLIST_FACTOR * k, SHORTLIST_MIN)`` candidates with exact inner products,
    which makes a compressed (PQ) index return exact scores and near-exact rankings.
    """
    queries = _as_queries(queries, index.d)
    if k < 1:
        raise ValueError(f"k must be >= 1 (got {k})")
    if index.ntotal == 0:
        return _empty_results(len(queries), k)
    if exact_vectors is None:
        return index.search(queries, k)
    shortlist = min(index.ntotal, max(SHORTLIST_FACTOR * k, SHORTLIST_MIN))
    _, candidates = index.search(queries, shortlist)
    return rerank(queries, candidates, exact_vectors, k)


def rerank(
    queries: np.ndarray, candidates: np.ndarray, vectors: VectorSource, k: int, chunk_size: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k among each query's ``candidates`` (-1 = no candidate). Each
    distinct candidate vector is read once per chunk of queries, in row order (so a
    memory-mapped source reads forward)."""
    import numpy as np

    D, I = _empty_results(len(queries), k)
    for start in range(0, len(queries), chunk_size):
        q = queries[start:start + chunk_size]
        cand = candidates[start:start + chunk_size]
        valid = cand >= 0
        unique = np.unique(cand[valid])
        if not len(unique):
            continue
        table = np.asarray(vectors[unique], dtype=np.float32)
        scores = np.take_along_axis(q @ table.T, np.searchsorted(unique, np.where(valid, cand, unique[0])), axis=1)
        scores[~valid] = -np.inf
        kk = min(k, cand.shape[1])
        order = np.argsort(-scores, axis=1, kind="stable")[:, :kk]
        top_scores = np.take_along_axis(scores, order, axis=1)
        top_ids = np.where(np.isfinite(top_scores), np.take_along_axis(cand, order, axis=1), -1)
        D[start:start + len(q), :kk] = top_scores
        I[start:start + len(q), :kk] = top_ids
    return D, I


class ShardVectors:
    """The store's live vectors, by position (the order of ``store.live_rows()``),
    read on demand from memory-mapped shards: only the rows asked for are paged in.

    ``shard_vectors[positions]`` -> float32 (len(positions), dim).

    ``verified``: read every shard in full and check its checksum (used to build an
    index, which must never be made from damaged data) instead of memory-mapping."""

    def __init__(self, store: FeatureStore, verified: bool = False) -> None:
        import numpy as np

        self.dim = store.dim
        self._arrays: list[np.ndarray] = []
        self._live: list[np.ndarray] = []  # per shard: its live row numbers
        starts = [0]
        for shard in store.manifest["shards"]:
            self._arrays.append(store.read_shard(shard, mmap=not verified))
            live = np.setdiff1d(np.arange(shard["rows"]), np.asarray(shard["removed"], dtype=np.int64))
            self._live.append(live)
            starts.append(starts[-1] + len(live))
        self._starts = np.asarray(starts, dtype=np.int64)

    def __len__(self) -> int:
        return int(self._starts[-1])

    @property
    def shape(self) -> tuple[int, int]:
        return len(self), self.dim

    def __getitem__(self, positions: np.ndarray) -> np.ndarray:
        import numpy as np

        positions = np.asarray(positions, dtype=np.int64)
        if positions.size and (positions.min() < 0 or positions.max() >= len(self)):
            raise IndexError(f"row positions out of range 0..{len(self) - 1}")
        out = np.empty((len(positions), self.dim), dtype=np.float32)
        shard_of = np.searchsorted(self._starts, positions, side="right") - 1
        for shard in np.unique(shard_of):
            sel = shard_of == shard
            out[sel] = self._arrays[shard][self._live[shard][positions[sel] - self._starts[shard]]]
        return out


def exact_search(
    gallery: np.ndarray, queries: np.ndarray, k: int, chunk_size: int = 2048
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k inner-product search, in query chunks so an all-vs-all over 60k
    images never holds the 60k x 60k score matrix (faiss.knn does the top-k
    selection per block)."""
    import faiss
    import numpy as np

    gallery = _as_queries(gallery, gallery.shape[1])
    queries = _as_queries(queries, gallery.shape[1])
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


# ---------------------------------------------------------------------------
# Persistence.


def index_paths(store: FeatureStore) -> tuple[Path, Path]:
    folder = store.root / INDEX_DIR
    return folder / INDEX_FILE, folder / INDEX_META


def save_index(store: FeatureStore, index: faiss.Index, index_type: str) -> None:
    import faiss

    data = faiss.serialize_index(index).tobytes()
    index_file, meta_file = index_paths(store)
    index_file.parent.mkdir(parents=True, exist_ok=True)
    # Index first, then its meta: a meta always describes a complete index file.
    atomic_write_bytes(index_file, data)
    atomic_write_json(
        meta_file,
        {"generation": store.generation, "count": int(index.ntotal), "index_type": index_type,
         "factory": factory_string(index_type, int(index.ntotal), store.dim),
         "sha256": bytes_sha256(data), "dim": store.dim},
    )


def read_index_meta(store: FeatureStore) -> dict[str, Any] | None:
    _, meta_file = index_paths(store)
    try:
        return json.loads(meta_file.read_text(encoding="ascii"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise CorruptStoreError(f"{meta_file}: unreadable ({exc}); {REPAIR_HINT}") from None


def load_index(store: FeatureStore) -> tuple[faiss.Index, str] | None:
    """The saved index and its kind (flat | hnsw | ivfpq) if it matches the store's
    committed state, else None (stale or missing). A damaged index file raises: it
    is never served."""
    import faiss
    import numpy as np

    meta = read_index_meta(store)
    if meta is None or meta.get("generation") != store.generation:
        return None
    index_file, _ = index_paths(store)
    try:
        data = index_file.read_bytes()
    except OSError as exc:
        raise CorruptStoreError(f"{index_file}: unreadable ({exc}); {REPAIR_HINT}") from None
    if bytes_sha256(data) != meta.get("sha256"):
        raise CorruptStoreError(f"{index_file}: checksum mismatch (damaged); {REPAIR_HINT}")
    index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
    if index.ntotal != store.count or index.d != store.dim:
        raise CorruptStoreError(
            f"{index_file}: holds {index.ntotal} vectors of dim {index.d}, store has {store.count} of dim {store.dim}"
        )
    # The concrete kind (``auto`` and a too-small ``ivfpq`` are really flat, say).
    return index, resolve_index_type(str(meta.get("index_type", "flat")), int(index.ntotal))


def build_store_index(store: FeatureStore, index_type: str = "flat") -> faiss.Index:
    """(Re)build the search index from the store's (memory-mapped) shards and save it."""
    index = build_index(ShardVectors(store, verified=True), index_type)
    save_index(store, index, index_type)
    return index


def remove_index(store: FeatureStore) -> None:
    for path in index_paths(store):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def index_folder(
    root: str | os.PathLike[str],
    index_dir: str | os.PathLike[str] | None = None,
    model: str | None = None,
    weights: str | os.PathLike[str] | None = None,
    options: ExtractOptions | None = None,
    index_type: str | None = None,
    rebuild: bool = False,
    embedder: Embedder | None = None,
    on_skip: SkipCallback | None = None,
    on_notice: Callable[[str], None] | None = None,
) -> ExtractSummary:
    """``cbir index``: sync the folder into the store, then (re)build its search index,
    all under the store's writer lock. ``rebuild`` starts the store from scratch.
    ``index_type``: see :data:`INDEX_TYPES`; default: the saved index's type, else auto."""
    from .extract import resolve_model, sync_folder
    from .locking import writer_lock
    from .paths import resolve_index_dir

    if index_type is not None:
        resolve_index_type(index_type, 0)  # validate before any work
    store_dir = resolve_index_dir(index_dir)
    with writer_lock(store_dir):
        if embedder is None:
            model, weights = resolve_model(store_dir, model, weights, on_notice, damaged_ok=rebuild)
        summary = sync_folder(root, store_dir, model, weights, options, embedder, on_skip, lock=False,
                              rebuild=rebuild)
        store = FeatureStore.open(store_dir)
        meta = read_index_meta(store)
        if index_type is None:
            index_type = str(meta.get("index_type", "auto")) if meta else "auto"
        if meta is None or meta.get("generation") != store.generation or meta.get("index_type") != index_type:
            build_store_index(store, index_type)
    return summary
