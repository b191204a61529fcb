"""Which search backend an index uses: recorded in its manifest by the writer that
chose it, so every reader (queries, the web server, ``cbir check``) gets the same
one without being told. One small factory, :func:`backend_for`; no caller names
an engine. Backends are registered by name (:data:`BACKEND_TYPES`, the
``cbir_cli.backends`` entry points; the built-ins are in :mod:`.backend_types`).

The record (``manifest["search_backend"]``): ``{"name": "milvus", "uri": ...,
"collection": ..., "index_type": ...}``. No record means Faiss, the embedded
default (whose saved index keeps its own type). A Milvus Lite database inside the
index folder is recorded relative to it, so the folder can be moved.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from ..errors import CbirError
from ..plugins import Registry
from ..store.feature_store import FeatureStore
from ..store.locking import writer_lock

if TYPE_CHECKING:
    from collections.abc import Iterator

    from .dba import DbaSettings
    from .protocol import SearchBackend

MANIFEST_KEY = "search_backend"


@dataclass(frozen=True)
class BackendSpec:
    """A backend choice: the registered name and, for a backend outside the index
    folder, where (``uri``) and which ``collection``; ``index_type`` where the
    backend does not keep it itself."""

    name: str = "faiss"
    uri: str | None = None
    collection: str | None = None
    index_type: str | None = None


@runtime_checkable
class BackendType(Protocol):
    """What the ``cbir_cli.backends`` registry holds: one kind of search backend."""

    #: The name users type (``--backend NAME``) and the manifest records.
    name: str
    #: One line for ``cbir models``.
    description: str

    def choose(self, requested: BackendSpec, recorded: BackendSpec | None, index_type: str | None,
               store: FeatureStore) -> BackendSpec:
        """What a writer records for ``requested`` (this type's name): its defaults
        filled in from ``recorded`` (the store's record, when of this type) and the
        store; a CbirError for what it cannot use, before any work.

        Args:
            requested: the user's ``--backend``, ``--backend-uri``, ``--backend-collection``.
            recorded: what the index records, or None (a new index).
            index_type: ``--index-type``, or None.
            store: the index's feature store.

        Returns:
            The spec to record in the manifest and open.

        Raises:
            CbirError: options this backend cannot use.
        """
        ...

    def open(self, spec: BackendSpec, root: Path) -> SearchBackend:
        """The backend ``spec`` describes for the index folder ``root``, not loaded.

        Args:
            spec: what the manifest records (name, uri, collection).
            root: the index folder.

        Returns:
            The backend; the caller then calls ``load``, ``build`` or ``refresh``.
        """
        ...


class InFolderBackendType:
    """Defaults for a backend type whose index lives in the index folder: nothing
    to choose but its name (not part of the protocol)."""

    name: str

    def choose(self, requested: BackendSpec, recorded: BackendSpec | None, index_type: str | None,
               store: FeatureStore) -> BackendSpec:
        if requested.uri or requested.collection:
            raise CbirError(f"{self.name} keeps its index in the index folder: --backend-uri and "
                            "--backend-collection are for a backend outside it")
        return BackendSpec(self.name)


BACKEND_TYPES: Registry[BackendType] = Registry("cbir_cli.backends", "search backend", {
    "faiss": "cbir_cli.search.backend_types:FAISS",
    "milvus": "cbir_cli.search.backend_types:MILVUS",
})


def recorded_spec(store: FeatureStore) -> BackendSpec | None:
    record = store.manifest.get(MANIFEST_KEY)
    if not isinstance(record, dict):
        return None
    return BackendSpec(**{k: record.get(k) for k in ("name", "uri", "collection", "index_type")})


def choose_spec(requested: BackendSpec | None, index_type: str | None, store: FeatureStore) -> BackendSpec | None:
    """What a writer records: the ``requested`` backend (its defaults filled in), else
    the recorded one; ``index_type`` (when given) replaces a recorded type the backend
    does not keep itself."""
    recorded = recorded_spec(store)
    spec = requested or recorded
    if spec is None:  # no record: Faiss, which keeps its own index type
        return None
    same = recorded if recorded is not None and recorded.name == spec.name else None
    return BACKEND_TYPES.get(spec.name).choose(spec, same, index_type, store)


def record_spec(store: FeatureStore, spec: BackendSpec | None) -> None:
    if spec is not None and recorded_spec(store) != spec:
        store.manifest[MANIFEST_KEY] = {k: v for k, v in asdict(spec).items() if v is not None}


def make_backend(spec: BackendSpec | None, root: Path) -> SearchBackend:
    """The registered backend ``spec`` names (None: Faiss), not loaded."""
    spec = spec or BackendSpec()
    return BACKEND_TYPES.get(spec.name).open(spec, Path(root))


def backend_for(store: FeatureStore) -> SearchBackend:
    """The search backend the store's manifest records (default: Faiss), not loaded."""
    return make_backend(recorded_spec(store), store.root)


def check_target(spec: BackendSpec | None, store: FeatureStore) -> None:
    """Before a writer does any work: a backend outside the store (a Milvus server or
    database) is reachable and holds nothing incompatible, so a failure writes nothing."""
    with opened(make_backend(spec, store.root)) as backend:
        backend.check_target(store.fingerprint)


@contextmanager
def opened(backend: SearchBackend) -> Iterator[SearchBackend]:
    """Use a backend, then let go of any connection it holds (a Milvus Lite database
    can be open in one process only)."""
    try:
        yield backend
    finally:
        backend.close()


def refresh_backend(store: FeatureStore, index_type: str | None, rebuild: bool = False,
                    dba: DbaSettings | None = None) -> bool:
    """A writer, after its commit: bring the recorded backend and the DBA vectors
    re-ranking uses (:mod:`.dba`, saved next to it) up to date with the store;
    ``rebuild``: re-populate both from the shards from scratch (same index type
    unless ``index_type`` says otherwise). ``dba``: the augmentation's settings
    (default: the saved one's, else the default). Returns whether anything was
    made again."""
    from .rerank import RerankingBackend

    spec = recorded_spec(store)
    index_type = index_type or (spec.index_type if spec else None)
    with opened(backend_for(store)) as inner:
        backend = RerankingBackend(inner, dba=dba)
        if rebuild:
            backend.build(store, index_type or _saved_index_type(store, inner))
            return True
        return backend.refresh(store, index_type)


def saved_index_type(store: FeatureStore) -> str:
    """The index type the store's backend was last built with (auto when unknown)."""
    return _saved_index_type(store, backend_for(store))


def _saved_index_type(store: FeatureStore, backend: SearchBackend) -> str:
    try:
        meta = backend.read_meta(store)
    except CbirError:  # a damaged Faiss meta: rebuild with the default
        meta = None
    return str((meta or {}).get("index_type", "auto"))


def rebuild_backend(index_dir: str | os.PathLike[str], index_type: str | None = None,
                    backend: BackendSpec | None = None, dba: DbaSettings | None = None) -> FeatureStore:
    """Re-populate the index's search backend from its shards (a lost or emptied
    Milvus collection, a damaged Faiss file) and its DBA vectors, re-embedding
    nothing. ``backend``: switch the index to that backend first (recorded with
    one manifest commit); ``dba``: see :func:`refresh_backend`."""
    root = Path(index_dir).expanduser()
    with writer_lock(root):
        store = FeatureStore.open(root)
        if store.count == 0:
            raise CbirError(f"{root}: the index is empty; add images to it first")
        spec = choose_spec(backend, index_type, store)
        check_target(spec, store)
        record_spec(store, spec)
        store.checkpoint()
        refresh_backend(store, index_type, rebuild=True, dba=dba)
    return store
