"""The embedded search backend: Faiss indexes over a feature store.

Which index for which collection, building and searching it: :mod:`.faiss_index`;
the store's saved index and its meta: :mod:`.saved_index`; bringing it up to date
with what changed: :mod:`.index_upkeep`. Faiss labels are positions in the
store's live-row order (flat, HNSW) or the rows' ids (a saved IVF index); the
backend maps them to row ids. The saved index records the store generation it is
current for; a writer brings a stale one up to date (or rebuilds it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import CorruptStoreError
from ..store.feature_store import FeatureStore
from ..store.vectors import ShardVectors, row_table
from .exact import as_queries
from .faiss_index import (  # noqa: F401 (re-exported: callers import them from here)
    AUTO_FLAT_MAX,
    HNSW_EF_SEARCH,
    INDEX_TYPES,
    IVF_NPROBE,
    IVFPQ_MIN_VECTORS,
    SHORTLIST_FACTOR,
    SHORTLIST_MIN,
    build_index,
    factory_string,
    ivf_lists,
    needs_rerank,
    resolve_index_type,
    search_index,
)
from .protocol import BackendBase, BackendCheck
from .saved_index import (  # noqa: F401 (re-exported)
    INDEX_FILE,
    INDEX_META,
    build_labelled,
    build_store_index,
    first_ids_of,
    index_paths,
    label_positions,
    load_index,
    load_saved,
    read_index_meta,
    save_index,
    saved_index_intact,
)

if TYPE_CHECKING:
    import faiss
    import numpy as np


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
        # Whether the index's labels are row ids (a saved IVF index), not positions.
        self.id_labels = False
        self.tombstones = 0  # entries of removed rows the index still holds (see .index_upkeep)
        self._rows: Any = None  # the store's RowTable, while the index is its
        # A store whose saved index was brought up to date without reading it (a new
        # segment: .index_upkeep): loaded from there when first used.
        self._unread: FeatureStore | None = None

    @property
    def count(self) -> int:
        self._load_unread()
        return 0 if self.index is None else int(self.index.ntotal) - self.tombstones

    def _load_unread(self) -> None:
        if self._unread is not None and self.index is None:
            store, self._unread = self._unread, None
            if not self.load(store):
                raise CorruptStoreError(f"{store.root}: the saved search index changed while in use")

    def build(self, store: FeatureStore, index_type: str, persist: bool = True) -> None:
        if persist:
            index = build_store_index(store, index_type)
            kind = resolve_index_type(index_type, int(index.ntotal))
        else:
            index = build_index(ShardVectors(store, verified=True), index_type)
            kind = f"{resolve_index_type(index_type, int(index.ntotal))} (in memory)"
        # A saved IVF index is labelled with row ids (see .saved_index).
        self._use(store, index, kind, persist and needs_rerank(index))

    def refresh(self, store: FeatureStore, index_type: str | None = None) -> bool:
        """Bring the saved index up to date when it is stale: with what changed
        (:mod:`.index_upkeep`) where it can, else rebuilt, as it is when missing,
        damaged (its meta unreadable or its file not matching its checksum) or of
        another type. Returns whether it was changed."""
        from .index_upkeep import update_saved_index

        try:
            meta = read_index_meta(store)
        except CorruptStoreError:
            meta = None
        if index_type is None:
            index_type = str(meta.get("index_type", "auto")) if meta else "auto"
            if index_type not in INDEX_TYPES:
                index_type = "auto"
        if meta is not None and meta.get("index_type") == index_type and meta.get("generation") != store.generation:
            try:
                updated = update_saved_index(store, meta, index_type)
            except CorruptStoreError:  # the saved index is damaged: rebuilt below
                updated = None
            if updated is not None:
                index, id_labels, tombstones = updated
                if index is None:  # not read: the work was what changed, not the collection
                    self.index, self._rows, self._unread = None, None, store
                    return True
                first_ids = first_ids_of(read_index_meta(store) or {})
                self._use(store, index, resolve_index_type(index_type, store.count), id_labels, tombstones, first_ids)
                return True
        if (meta is None or meta.get("generation") != store.generation or meta.get("index_type") != index_type
                or not saved_index_intact(store, meta)):
            self.build(store, index_type)
            return True
        return False

    def load(self, store: FeatureStore) -> bool:
        loaded = load_saved(store)
        if loaded is None:
            return False
        self._use(store, *loaded)
        return True

    def _use(self, store: FeatureStore, index: faiss.Index, kind: str, id_labels: bool = False,
             tombstones: int = 0, first_ids: dict[str, int] | None = None) -> None:
        # Kept: the Searcher shares this table (row_table's cache holds it weakly).
        self._unread = None
        self._rows = row_table(store, first_ids)
        ids = self._rows.ids
        if len(ids) != index.ntotal - tombstones:
            raise CorruptStoreError(f"{store.root}: index has {index.ntotal} vectors but the store {len(ids)}")
        self.index, self.index_type, self.ids = index, kind, ids
        self.id_labels, self.tombstones = id_labels, tombstones
        # A compressed (IVF-PQ) index only picks a shortlist; its exact scores come
        # from the shards, memory-mapped.
        self.exact = ShardVectors(store) if needs_rerank(index) else None

    def _require(self) -> faiss.Index:
        self._load_unread()
        if self.index is None:
            raise RuntimeError("build() or load() the backend first")
        return self.index

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        import numpy as np

        index = self._require()
        positions_of = label_positions(self.ids) if self.id_labels else None
        scores, positions = search_index(index, queries, k, self.exact, positions_of)
        return scores, np.where(positions >= 0, self.ids[np.maximum(positions, 0)], -1)

    def positions(self, ids: np.ndarray) -> np.ndarray:
        """Faiss labels of row ``ids`` (ids are increasing in label order: new rows get
        higher ids). An id that is not searchable raises KeyError."""
        import numpy as np

        ids = np.asarray(ids, dtype=np.int64)
        self._load_unread()
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

        self._load_unread()
        if self.index is None:
            dim = np.asarray(vectors).shape[-1]
            self.index, self.index_type = faiss.IndexFlatIP(int(dim)), "flat (in memory)"
        index = self.index
        ids = np.asarray(ids, dtype=np.int64)
        vectors = as_queries(vectors, index.d)
        if len(ids) != len(vectors) or (len(ids) and len(self.ids) and ids.min() <= self.ids[-1]):
            raise ValueError("add() takes one new id per vector, each above every id already added")
        if self.id_labels:
            index.add_with_ids(vectors, ids)
        else:
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
            self.id_labels, self.tombstones = False, 0  # built from positions
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
