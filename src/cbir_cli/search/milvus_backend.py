"""Milvus as the search backend: one collection per index, primary key = the
store's row id, one FLOAT_VECTOR field, metric IP (cosine for our unit vectors).

The shards stay the source of truth. A writer mirrors the committed store into
the collection after each run (:meth:`MilvusBackend.refresh`: the ids missing from
the collection are upserted, the ids the store no longer has are deleted, so
additions, changes -- a changed file gets a new id -- and removals all follow)
and records the store generation it mirrored in ``index/milvus.json``. A reader
uses the collection only when that record is current; otherwise (a run killed
between its commit and the mirror) it answers exactly from the shards in memory,
like the Faiss backend does for a stale saved index. ``check`` compares the
collection's ids and count with the store; :meth:`build` re-populates a lost or
empty collection from the shards, without re-embedding anything.

Milvus Lite specifics. A database that opens but cannot read its collections
(damaged files) makes a writer set the collection -- or, if the database still
fails, the whole database -- aside into ``<database>.damaged/`` and make it again
from the shards: a rebuild never needs to read what it replaces. A database open
in another process (one process at a time) is busy, not damaged: ``check`` says
which process holds it and reports no problem.

Index types: ``auto`` = HNSW (M=32, efConstruction=40, search ef = max(64, k))
up to :data:`AUTO_HNSW_MAX` vectors, IVF_PQ above (servers only); ``flat`` = FLAT,
``hnsw`` = HNSW, ``ivfpq`` = IVF_PQ. Milvus Lite builds only FLAT, HNSW, IVF_FLAT
and IVF_SQ8 (other types are accepted and then silently searched brute force),
so an IVF_PQ request against Lite is refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CbirError
from ..fsutil import atomic_write_json
from ..store.feature_store import FeatureStore
from ..store.manifest import FINGERPRINT_KEYS, INDEX_DIR
from ..store.vectors import ShardVectors
from .exact import as_queries, empty_results
from .faiss_backend import FaissBackend, ivf_lists
from .milvus_client import (
    LiteDamagedError,
    LiteInUseError,
    import_pymilvus,
    is_lite,
    milvus_errors,
    open_client,
    release_lite,
    set_aside_lite,
)
from .protocol import BackendCheck

if TYPE_CHECKING:
    import numpy as np

META_FILE = "milvus.json"
FINGERPRINT_PROPERTY = "cbir.fingerprint"
INDEX_TYPES = {"flat": "FLAT", "hnsw": "HNSW", "ivfpq": "IVF_PQ"}
LITE_BUILDS = ("FLAT", "HNSW", "IVF_FLAT", "IVF_SQ8")
AUTO_HNSW_MAX = 5_000_000
# The graph the Faiss backend builds (HNSW32, faiss's efConstruction 40), so the
# two backends answer alike (bench/milvus_backend.py compares them).
HNSW_BUILD = {"M": 32, "efConstruction": 40}
HNSW_EF = 64
IVF_NPROBE = 32
WRITE_BATCH = 1000  # rows per upsert/delete request
SEARCH_BATCH = 1024  # queries per search request
MAX_TOPK = 16384  # the most results Milvus returns for one query
CHECK_SAMPLE = 64  # vectors compared with the shards by check


def milvus_index_type(index_type: str, n: int, lite: bool) -> str:
    """The Milvus index type for a requested cbir index type and collection size."""
    if index_type == "auto":
        kind = "HNSW" if lite or n <= AUTO_HNSW_MAX else "IVF_PQ"
    elif index_type in INDEX_TYPES:
        kind = INDEX_TYPES[index_type]
    else:
        raise CbirError(f"unknown index type {index_type!r} for Milvus; choose one of: auto, "
                        f"{', '.join(INDEX_TYPES)}")
    if lite and kind not in LITE_BUILDS:
        raise CbirError(f"Milvus Lite cannot build {kind} indexes (it builds {', '.join(LITE_BUILDS)}); use hnsw "
                        "or flat, or a Milvus server")
    return kind


def _fingerprint_key(fingerprint: dict[str, Any]) -> str:
    return json.dumps({k: fingerprint.get(k) for k in FINGERPRINT_KEYS}, sort_keys=True)


class MilvusBackend:
    """The :class:`~cbir_cli.search.protocol.SearchBackend` on Milvus (see the module docstring)."""

    name = "milvus"

    def __init__(self, uri: str, collection: str) -> None:
        self.uri, self.collection = uri, collection
        self.lite = is_lite(uri)
        self.index_type = "none"
        self._client: Any = None
        self._loaded = False
        self._count = 0
        self._dim = 0
        self._store: FeatureStore | None = None
        self._positions: dict[int, int] | None = None
        self._exact: FaissBackend | None = None  # a reader's in-memory answer while the collection is stale

    # -- connection ----------------------------------------------------------------

    @property
    def where(self) -> str:
        return f"Milvus collection {self.collection} at {self.uri}"

    def client(self) -> Any:
        if self._client is None:
            self._client = open_client(self.uri)
        return self._client

    def close(self) -> None:
        """Disconnect (and let other processes open a Milvus Lite database again)."""
        if self._client is not None:
            self._client.close()
            self._client, self._loaded = None, False
            if self.lite:
                release_lite(self.uri)

    def _exists(self) -> bool:
        """Whether the collection exists; if so it is loaded (searchable), which a
        Milvus Lite database reopened by a new process is not. A Lite database that
        opens but fails here is damaged (:class:`LiteDamagedError`)."""
        client = self.client()
        try:
            with milvus_errors(self.where):
                if not client.has_collection(self.collection):
                    return False
                if not self._loaded:
                    state = client.get_load_state(self.collection).get("state")
                    if getattr(state, "name", str(state)) != "Loaded":
                        client.load_collection(self.collection)
                    self._loaded = True
        except CbirError as exc:
            if self.lite:
                raise LiteDamagedError(exc.message) from None
            raise
        return True

    def _exists_for_writer(self) -> bool:
        """:meth:`_exists` for a writer about to (re)make the collection from the
        shards: a damaged Lite collection is set aside first, then the whole
        database if that was not enough (never read, never deleted)."""
        for collection in (self.collection, None):
            try:
                return self._exists()
            except LiteDamagedError:
                self.close()
                if collection is None or (Path(self.uri) / "collections" / collection).exists():
                    set_aside_lite(self.uri, collection)
        return self._exists()

    def check_target(self, fingerprint: dict[str, Any]) -> None:
        """Before a writer does any work: Milvus is reachable and the collection, if it
        exists, holds vectors comparable with ``fingerprint`` (a damaged Lite one
        is replaced by the writer: nothing in it to compare)."""
        try:
            exists = self._exists()
        except LiteDamagedError:
            return
        if exists:
            self._check_compatible(fingerprint)

    def _check_compatible(self, fingerprint: dict[str, Any]) -> None:
        with milvus_errors(self.where):
            described = self.client().describe_collection(self.collection)
        dims = [f.get("params", {}).get("dim") for f in described.get("fields", []) if f.get("name") == "vector"]
        recorded = described.get("properties", {}).get(FINGERPRINT_PROPERTY)
        if dims != [fingerprint["dim"]] or (recorded is not None and recorded != _fingerprint_key(fingerprint)):
            theirs = json.loads(recorded) if recorded else {"dim": dims[0] if dims else None}
            raise CbirError(f"{self.where} holds vectors of model {theirs.get('model', '?')} (dim "
                            f"{theirs.get('dim')}), this index has model {fingerprint.get('model')} (dim "
                            f"{fingerprint['dim']}); name another collection or drop that one")

    # -- what a writer saves -----------------------------------------------------------

    @staticmethod
    def meta_path(store: FeatureStore) -> Path:
        return store.root / INDEX_DIR / META_FILE

    def read_meta(self, store: FeatureStore) -> dict[str, Any] | None:
        try:
            meta = json.loads(self.meta_path(store).read_text(encoding="ascii"))
        except (OSError, ValueError):
            return None
        return meta if meta.get("collection") == self.collection and meta.get("target") == self._target else None

    @property
    def _target(self) -> str:
        """Which Milvus, as recorded: a server's address, or a Lite database by file
        name (the index folder holding it may move)."""
        return f"lite:{Path(self.uri).name}" if self.lite else self.uri

    def _save_meta(self, store: FeatureStore, index_type: str, kind: str) -> None:
        self.meta_path(store).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.meta_path(store), {"generation": store.generation, "count": store.count,
                                                  "collection": self.collection, "target": self._target,
                                                  "index_type": index_type, "milvus_index": kind})

    # -- SearchBackend -----------------------------------------------------------------

    @property
    def count(self) -> int:
        return self._exact.count if self._exact is not None else self._count

    def build(self, store: FeatureStore, index_type: str, persist: bool = True) -> None:
        """``persist``: drop and re-create the collection from the shards (a writer).
        Otherwise (a reader facing a stale collection) an exact index in memory."""
        if not persist:
            self._exact = FaissBackend()
            self._exact.build(store, "flat", persist=False)
            self.index_type = "flat (in memory; the Milvus collection is stale)"
            return
        kind = milvus_index_type(index_type, store.count, self.lite)
        if self._exists_for_writer():
            self._check_compatible(store.fingerprint)
            with milvus_errors(self.where):
                self.client().drop_collection(self.collection)
        self._create(store, kind)
        vectors = ShardVectors(store, verified=True)  # never index damaged data
        self._write(store, [r.id for r in store.live_rows()], vectors, range(len(vectors)))
        self._finish(store, index_type, kind)

    def refresh(self, store: FeatureStore, index_type: str | None = None) -> bool:
        """Mirror the committed store: upsert what the collection lacks, delete what
        the store no longer has (a new collection, or another index type, is built).
        Returns whether anything was written to Milvus."""
        meta = self.read_meta(store)
        index_type = index_type or (meta or {}).get("index_type") or "auto"
        kind = milvus_index_type(index_type, store.count, self.lite)
        if not self._exists_for_writer() or meta is None or meta.get("milvus_index") != kind:
            self.build(store, index_type)
            return True
        self._check_compatible(store.fingerprint)
        if meta.get("generation") == store.generation and self._collection_count() == store.count:
            self._use(store, kind)
            return False
        live = [r.id for r in store.live_rows()]
        have = self._collection_ids()
        gone = sorted(have - set(live))
        with milvus_errors(self.where):
            for start in range(0, len(gone), WRITE_BATCH):
                self.client().delete(self.collection, ids=gone[start:start + WRITE_BATCH])
        new = [p for p, row_id in enumerate(live) if row_id not in have]
        self._write(store, live, ShardVectors(store), new)
        self._finish(store, index_type, kind)
        return True

    def load(self, store: FeatureStore) -> bool:
        meta = self.read_meta(store)
        if meta is None or meta.get("generation") != store.generation:
            return False
        if not self._exists():
            raise CbirError(f"{self.where} is missing (dropped, or another Milvus)", remedy="rebuild-backend")
        self._check_compatible(store.fingerprint)
        count = self._collection_count()
        if count != store.count:
            raise CbirError(f"{self.where} holds {count} vectors, the index {store.count}", remedy="rebuild-backend")
        self._use(store, str(meta.get("milvus_index", "?")))
        return True

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self._exact is not None:
            return self._exact.search(queries, k)
        if k < 1:
            raise ValueError(f"k must be >= 1 (got {k})")
        queries = as_queries(queries, self._dim)
        scores, ids = empty_results(len(queries), k)
        params = {"HNSW": {"ef": max(HNSW_EF, k)}, "FLAT": {}}.get(self.index_type, {"nprobe": IVF_NPROBE})
        with milvus_errors(self.where):
            for start in range(0, len(queries), SEARCH_BATCH):
                hits = self.client().search(self.collection, data=queries[start:start + SEARCH_BATCH], limit=k,
                                            output_fields=["id"], consistency_level="Strong",
                                            search_params={"metric_type": "IP", "params": params})
                for q, row in enumerate(hits, start):
                    for j, hit in enumerate(row[:k]):
                        ids[q, j], scores[q, j] = int(hit["id"]), float(hit["distance"])
        return scores, ids

    def range_search(self, queries: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A k-NN search with a threshold (:func:`~cbir_cli.search.range.knn_range_search`),
        as for an approximate Faiss index; one result list holds at most
        :data:`MAX_TOPK` ids, Milvus's limit for one search."""
        from .range import knn_range_search

        if self._exact is not None:
            return self._exact.range_search(queries, threshold)
        return knn_range_search(self.search, as_queries(queries, self._dim), threshold, min(self.count, MAX_TOPK))

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        """Exact vectors, read from the shards (the source of truth)."""
        import numpy as np

        if self._exact is not None:
            return self._exact.vectors(ids)
        if self._store is None:
            raise RuntimeError("build() or load() the backend first")
        if self._positions is None:
            self._positions = {r.id: p for p, r in enumerate(self._store.live_rows())}
        positions = np.array([self._positions[int(i)] for i in ids], dtype=np.int64)
        return ShardVectors(self._store)[positions]

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Upsert into the collection (it must exist: build or load first)."""
        vectors = as_queries(vectors, self._dim)
        with milvus_errors(self.where):
            self.client().upsert(self.collection, [{"id": int(i), "vector": v} for i, v in zip(ids, vectors)])
        self._count = self._collection_count()

    def remove(self, ids: np.ndarray) -> None:
        with milvus_errors(self.where):
            self.client().delete(self.collection, ids=[int(i) for i in ids])
        self._count = self._collection_count()

    def check(self, store: FeatureStore, live_vectors: np.ndarray) -> BackendCheck:
        """The collection exists, holds this model's vectors, exactly the store's live
        ids, and (for a sample) the same vectors as the shards."""
        import numpy as np

        report = BackendCheck(repair="rebuild-backend")
        meta = self.read_meta(store)
        aside = Path(f"{self.uri}.damaged")
        if self.lite and aside.is_dir() and any(aside.iterdir()):
            report.notes.append(f"{aside}: damaged Milvus Lite data set aside by a rebuild; delete it when no "
                                "longer needed")
        try:
            if not self._exists():
                report.problems.append(f"{self.where} is missing")
                return report
            self._check_compatible(store.fingerprint)
            have = self._collection_ids()
        except LiteInUseError as exc:  # busy, not damaged
            report.state = "in use"
            report.notes.append(f"{exc.in_use}; not checked (check again once it is closed)")
            return report
        except CbirError as exc:
            report.problems.append(exc.message)
            return report
        if meta is None or meta.get("generation") != store.generation:
            report.state = "stale"
            report.notes.append(f"{self.where} was not mirrored after the last commit; queries answer exactly "
                                "from the shards in memory until the next indexing run mirrors it")
            return report
        report.state = "current"
        live = [r.id for r in store.live_rows()]
        missing, extra = set(live) - have, have - set(live)
        if missing or extra:
            report.problems.append(f"{self.where} holds {len(have)} vectors, the index {len(live)} ({len(missing)} "
                                   f"missing, {len(extra)} not in the index)")
            return report
        sample = np.unique(np.linspace(0, len(live) - 1, min(CHECK_SAMPLE, len(live))).astype(np.int64))
        with milvus_errors(self.where):
            got = self.client().get(self.collection, ids=[live[p] for p in sample], output_fields=["vector"])
        stored = {int(r["id"]): np.asarray(r["vector"], dtype=np.float32) for r in got}
        if any(not np.allclose(stored.get(live[p], np.inf), live_vectors[p], atol=1e-5) for p in sample):
            report.problems.append(f"{self.where} holds other vectors than the shards")
        return report

    # -- helpers ---------------------------------------------------------------------

    def _create(self, store: FeatureStore, kind: str) -> None:
        pymilvus = import_pymilvus()
        schema = pymilvus.MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", pymilvus.DataType.INT64, is_primary=True)
        schema.add_field("vector", pymilvus.DataType.FLOAT_VECTOR, dim=store.dim)
        params: dict[str, Any] = {"HNSW": HNSW_BUILD, "FLAT": {}}.get(kind, {"nlist": ivf_lists(store.count)})
        if kind == "IVF_PQ":
            params = {**params, "m": max(d for d in range(1, min(store.dim, 64) + 1) if store.dim % d == 0),
                      "nbits": 8}
        index_params = self.client().prepare_index_params()
        # Milvus Lite reads build parameters only from a nested "params" key (pymilvus
        # 3.0's flat form is silently ignored there); servers take the documented flat form.
        index_params.add_index(field_name="vector", index_type=kind, metric_type="IP",
                               params={"params": params} if self.lite else params)
        with milvus_errors(self.where):
            self.client().create_collection(self.collection, schema=schema, index_params=index_params,
                                            consistency_level="Strong",
                                            properties={FINGERPRINT_PROPERTY: _fingerprint_key(store.fingerprint)})
        self._loaded = True  # create_collection with an index loads it

    def _write(self, store: FeatureStore, live: list[int], vectors: Any, positions: Any) -> None:
        import numpy as np

        positions = np.asarray(list(positions), dtype=np.int64)
        with milvus_errors(self.where):
            for start in range(0, len(positions), WRITE_BATCH):
                chunk = positions[start:start + WRITE_BATCH]
                rows = vectors[chunk]
                self.client().upsert(self.collection, [{"id": live[p], "vector": v} for p, v in zip(chunk, rows)])

    def _finish(self, store: FeatureStore, index_type: str, kind: str) -> None:
        with milvus_errors(self.where):
            self.client().flush(self.collection)
        self._save_meta(store, index_type, kind)
        self._use(store, kind)

    def _use(self, store: FeatureStore, kind: str) -> None:
        self._store, self._positions, self._exact = store, None, None
        self._dim, self.index_type, self._count = store.dim, kind, self._collection_count()

    def _collection_count(self) -> int:
        with milvus_errors(self.where):
            result = self.client().query(self.collection, filter="", output_fields=["count(*)"])
        return int(result[0]["count(*)"])

    def _collection_ids(self) -> set[int]:
        ids: set[int] = set()
        with milvus_errors(self.where):
            pages = self.client().query_iterator(self.collection, batch_size=WRITE_BATCH * 4, filter="",
                                                 output_fields=["id"])
            while page := pages.next():
                ids.update(int(r["id"]) for r in page)
            pages.close()
        return ids
