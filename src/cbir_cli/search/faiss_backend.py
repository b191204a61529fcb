"""The embedded search backend: Faiss indexes over a feature store.

Index types: ``flat`` (exact; the oracle), ``hnsw`` (graph, all vectors in RAM),
``ivfpq`` (IVF with 4-bit fast-scan PQ codes, 64 bytes per 2048-d vector; its
shortlist is re-ranked with the exact vectors read from the memory-mapped shards,
so scores are exact), and ``auto`` (flat up to :data:`AUTO_FLAT_MAX` vectors,
then ivfpq). Faiss labels are positions in the store's live-row order; the
backend maps them to row ids. The saved index (``index/index.faiss`` + its meta)
records the store generation it was built from and is rebuilt whenever stale.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CbirError, CorruptStoreError
from ..fsutil import atomic_write_bytes, atomic_write_json, bytes_sha256, read_json_meta
from ..store.feature_store import FeatureStore
from ..store.manifest import INDEX_DIR
from ..store.vectors import ShardVectors, row_table
from ..store.verdicts import file_stamp, verify_file
from .exact import as_queries, empty_results, rerank
from .protocol import BackendBase, BackendCheck

if TYPE_CHECKING:
    import faiss
    import numpy as np

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


def _training_sample(vectors: Any, n: int, lists: int) -> np.ndarray:
    import numpy as np

    # Enough points for the IVF k-means and for PQ's 256 centroids per sub-quantizer;
    # a fixed seed makes a rebuild of the same store give the same index.
    size = min(n, max(lists * TRAIN_POINTS_PER_LIST, 256 * 40))
    picks = np.arange(n) if size == n else np.sort(np.random.default_rng(0).choice(n, size, replace=False))
    return np.ascontiguousarray(vectors[picks], dtype=np.float32)


def build_index(vectors: Any, index_type: str = "flat", add_chunk: int = 16384) -> faiss.Index:
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
        index.add(as_queries(np.asarray(vectors[rows]), dim))
    return index


def search_index(
    index: faiss.Index, queries: np.ndarray, k: int, exact_vectors: Any | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(D, I) for each query; all queries go through one search call.

    ``exact_vectors`` (rows aligned with the index labels): re-rank a shortlist of
    ``max(SHORTLIST_FACTOR * k, SHORTLIST_MIN)`` candidates with exact inner products,
    which makes a compressed (PQ) index return exact scores and near-exact rankings.
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
    return rerank(queries, candidates, exact_vectors, k)



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


INDEX_META_KEYS = {"generation": int, "count": int, "index_type": str, "sha256": str, "dim": int}


def read_index_meta(store: FeatureStore) -> dict[str, Any] | None:
    """The saved index's meta, None when there is none; CorruptStoreError naming the
    file when it is not a JSON object with the keys and types it must have."""
    meta_file = index_paths(store)[1]
    meta = read_json_meta(meta_file)
    if meta is None:
        return None
    if not isinstance(meta, dict) or any(not isinstance(meta.get(k), t) or isinstance(meta.get(k), bool)
                                         for k, t in INDEX_META_KEYS.items()) or meta["index_type"] not in INDEX_TYPES:
        raise CorruptStoreError(f"{meta_file}: not a search index description (damaged)")
    return meta


def saved_index_intact(store: FeatureStore, meta: dict[str, Any]) -> bool:
    """Whether the saved index file still has the checksum its meta recorded."""
    index_file, meta_file = index_paths(store)
    try:
        return bool(verify_file(index_file, meta["sha256"], meta_file.name))
    except CorruptStoreError:
        return False


def load_index(store: FeatureStore, rehash: bool = False) -> tuple[faiss.Index, str] | None:
    """The saved index and its kind (flat | hnsw | ivfpq) if it matches the store's
    committed state, else None (stale or missing). A damaged index file raises: it
    is never served. Its checksum is verified once per change of the file
    (:func:`~cbir_cli.store.verdicts.verify_file`); ``rehash`` (``cbir check``): now."""
    import faiss
    import numpy as np

    meta = read_index_meta(store)
    if meta is None or meta.get("generation") != store.generation:
        return None
    index_file, meta_file = index_paths(store)
    verified = None if rehash else verify_file(index_file, meta["sha256"], meta_file.name)
    try:
        data = index_file.read_bytes()
    except OSError as exc:
        raise CorruptStoreError(f"{index_file}: unreadable ({exc})") from None
    if verified is None and bytes_sha256(data) != meta["sha256"]:
        raise CorruptStoreError(f"{index_file}: checksum mismatch (damaged, or {meta_file.name} is)")
    if verified is not None and file_stamp(index_file) != verified:  # replaced between the check and the read
        raise CorruptStoreError(f"{index_file}: changed while it was read")
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


class _AppendedVectors:
    """Row-addressable ``base`` followed by in-memory ``extra`` rows (after :meth:`FaissBackend.add`)."""

    def __init__(self, base: Any, extra: np.ndarray) -> None:
        self.base, self.extra = base, extra

    def __len__(self) -> int:
        return len(self.base) + len(self.extra)

    def __getitem__(self, positions: np.ndarray) -> np.ndarray:
        import numpy as np

        positions = np.asarray(positions, dtype=np.int64)
        out = np.empty((len(positions), self.extra.shape[1]), dtype=np.float32)
        old = positions < len(self.base)
        out[old] = self.base[positions[old]]
        out[~old] = self.extra[positions[~old] - len(self.base)]
        return out


class FaissBackend(BackendBase):
    """The :class:`~cbir_cli.search.protocol.SearchBackend` on Faiss (see the module docstring)."""

    name = "faiss"
    read_meta = staticmethod(read_index_meta)

    def __init__(self) -> None:
        import numpy as np

        self.index: faiss.Index | None = None
        self.index_type = "none"
        self.ids = np.zeros(0, dtype=np.int64)  # row id of each Faiss label (position)
        # Exact vectors by position, for re-ranking a compressed index's shortlist.
        self.exact: Any = None

    @property
    def count(self) -> int:
        return 0 if self.index is None else int(self.index.ntotal)

    def build(self, store: FeatureStore, index_type: str, persist: bool = True) -> None:
        if persist:
            index = build_store_index(store, index_type)
            kind = resolve_index_type(index_type, int(index.ntotal))
        else:
            index = build_index(ShardVectors(store, verified=True), index_type)
            kind = f"{resolve_index_type(index_type, int(index.ntotal))} (in memory)"
        self._use(store, index, kind)

    def refresh(self, store: FeatureStore, index_type: str | None = None) -> bool:
        """Rebuild and save the index when it is stale, missing, damaged (its meta
        unreadable or its file not matching its checksum) or of another type.
        Returns whether it was rebuilt."""
        try:
            meta = read_index_meta(store)
        except CorruptStoreError:
            meta = None
        if index_type is None:
            index_type = str(meta.get("index_type", "auto")) if meta else "auto"
            if index_type not in INDEX_TYPES:
                index_type = "auto"
        if (meta is None or meta.get("generation") != store.generation or meta.get("index_type") != index_type
                or not saved_index_intact(store, meta)):
            self.build(store, index_type)
            return True
        return False

    def load(self, store: FeatureStore) -> bool:
        loaded = load_index(store)
        if loaded is None:
            return False
        self._use(store, *loaded)
        return True

    def _use(self, store: FeatureStore, index: faiss.Index, kind: str) -> None:

        ids = row_table(store).ids
        if len(ids) != index.ntotal:
            raise CorruptStoreError(f"{store.root}: index has {index.ntotal} vectors but the store {len(ids)}")
        self.index, self.index_type, self.ids = index, kind, ids
        # A compressed (IVF-PQ) index only picks a shortlist; its exact scores come
        # from the shards, memory-mapped.
        self.exact = ShardVectors(store) if needs_rerank(index) else None

    def _require(self) -> faiss.Index:
        if self.index is None:
            raise RuntimeError("build() or load() the backend first")
        return self.index

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        import numpy as np

        scores, positions = search_index(self._require(), queries, k, self.exact)
        return scores, np.where(positions >= 0, self.ids[np.maximum(positions, 0)], -1)

    def positions(self, ids: np.ndarray) -> np.ndarray:
        """Faiss labels of row ``ids`` (ids are increasing in label order: new rows get
        higher ids). An id that is not searchable raises KeyError."""
        import numpy as np

        ids = np.asarray(ids, dtype=np.int64)
        found = np.searchsorted(self.ids, ids)
        bad = (found >= len(self.ids)) | (self.ids[np.minimum(found, len(self.ids) - 1)] != ids) \
            if len(self.ids) else np.ones(len(ids), dtype=bool)
        if bad.any():
            raise KeyError(int(ids[bad][0]))
        return found

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        import numpy as np

        positions = self.positions(ids)
        if self.exact is not None:
            return np.asarray(self.exact[positions], dtype=np.float32)
        index = self._require()
        return np.stack([index.reconstruct(int(p)) for p in positions]) if len(positions) else \
            np.zeros((0, index.d), dtype=np.float32)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Append vectors (to an exact in-memory index, when nothing was built or loaded)."""
        import faiss
        import numpy as np

        if self.index is None:
            dim = np.asarray(vectors).shape[-1]
            self.index, self.index_type = faiss.IndexFlatIP(int(dim)), "flat (in memory)"
        index = self.index
        ids = np.asarray(ids, dtype=np.int64)
        vectors = as_queries(vectors, index.d)
        if len(ids) != len(vectors) or (len(ids) and len(self.ids) and ids.min() <= self.ids[-1]):
            raise ValueError("add() takes one new id per vector, each above every id already added")
        index.add(vectors)
        self.ids = np.concatenate([self.ids, ids])
        if self.exact is not None:
            self.exact = _AppendedVectors(self.exact, vectors)

    def remove(self, ids: np.ndarray) -> None:
        import faiss
        import numpy as np

        index = self._require()
        gone = np.isin(self.ids, np.asarray(ids, dtype=np.int64))
        if not gone.any():
            return
        keep_ids = self.ids[~gone]
        if isinstance(faiss.downcast_index(index), faiss.IndexFlat):
            # Flat removal compacts the labels in order: positions stay aligned with keep_ids.
            index.remove_ids(faiss.IDSelectorBatch(np.flatnonzero(gone).astype(np.int64)))
        else:
            # HNSW cannot remove, and an IVF index keeps sparse labels: rebuild from
            # the exact vectors of what stays.
            kept = self.vectors(keep_ids)
            kind = self.index_type.split(" ")[0]
            self.index = build_index(kept, kind)
            self.exact = kept if needs_rerank(self.index) else None
        self.ids = keep_ids

    def check(self, store: FeatureStore, live_vectors: np.ndarray) -> BackendCheck:
        """A saved index for this generation must hold exactly the live vectors."""
        import faiss
        import numpy as np

        report = BackendCheck()
        try:
            meta = read_index_meta(store)
            if meta is None:
                report.notes.append("no saved search index; queries build one in memory "
                                    "(`cbir index FOLDER` saves it)")
                return report
            loaded = load_index(store, rehash=True)
        except CorruptStoreError as exc:
            report.problems.append(exc.message)
            return report
        if loaded is None:
            report.state = "stale"
            report.notes.append(f"search index is from generation {meta.get('generation')}, the store is at "
                                f"{store.generation}; queries build one in memory (`cbir index FOLDER` saves it)")
            return report
        report.state = "current"
        index, _ = loaded
        # Only indexes that keep the vectors exactly can be compared; a compressed one
        # (IVF-PQ) is checked by count, dim and checksum above.
        if isinstance(faiss.downcast_index(index), (faiss.IndexFlat, faiss.IndexHNSWFlat)) and index.ntotal:
            if not np.allclose(index.reconstruct_n(0, index.ntotal), live_vectors, atol=1e-6):
                report.problems.append(f"{index_paths(store)[0]}: holds other vectors than the shards")
        return report

    def range_search(self, queries: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Exact on a flat index, a k-NN search with a threshold on HNSW/IVF-PQ (:mod:`.range`)."""
        from .range import faiss_range_search

        return faiss_range_search(self._require(), queries, threshold, self.ids, self.search)
