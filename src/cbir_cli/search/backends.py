"""Which search backend an index uses: recorded in its manifest by the writer that
chose it, so every reader (queries, the web server, ``cbir check``) gets the same
one without being told. One small factory, :func:`backend_for`; no caller names
an engine.

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
from typing import TYPE_CHECKING, Any

from ..errors import CbirError
from ..store.feature_store import FeatureStore
from ..store.locking import writer_lock

if TYPE_CHECKING:
    from collections.abc import Iterator

    from .dba import DbaSettings
    from .protocol import SearchBackend

BACKENDS = ("faiss", "milvus")
MANIFEST_KEY = "search_backend"
# Where `--backend milvus` keeps a Milvus Lite database when no address is given.
DEFAULT_LITE_NAME = "milvus.db"


@dataclass(frozen=True)
class BackendSpec:
    """A backend choice: the engine and, for Milvus, where and which collection."""

    name: str = "faiss"
    uri: str | None = None
    collection: str | None = None
    index_type: str | None = None

    def __post_init__(self) -> None:
        if self.name not in BACKENDS:
            raise CbirError(f"unknown search backend {self.name!r}; choose one of: {', '.join(BACKENDS)}")


def recorded_spec(store: FeatureStore) -> BackendSpec | None:
    record = store.manifest.get(MANIFEST_KEY)
    if not isinstance(record, dict):
        return None
    return BackendSpec(**{k: record.get(k) for k in ("name", "uri", "collection", "index_type")})


def choose_spec(requested: BackendSpec | None, index_type: str | None, store: FeatureStore) -> BackendSpec | None:
    """What a writer records: the ``requested`` backend (its defaults filled in), else
    the recorded one; ``index_type`` (when given) replaces a recorded Milvus type."""
    from .milvus_backend import milvus_index_type
    from .milvus_client import check_collection_name, check_uri, default_collection, import_pymilvus, is_lite

    recorded = recorded_spec(store)
    spec = requested or recorded
    if spec is None or spec.name == "faiss":
        return spec
    import_pymilvus()  # the extra is missing: say so before any work
    same = recorded if recorded is not None and recorded.name == "milvus" else BackendSpec("milvus")
    uri = spec.uri or same.uri or DEFAULT_LITE_NAME
    if is_lite(uri) and uri != same.uri:
        check_uri(uri)
        # A path the user gave is relative to here; the default lives in the index folder.
        path = (store.root / uri if spec.uri is None else Path(uri).expanduser()).absolute()
        uri = path.name if path.parent == store.root.absolute() else str(path)
    collection = spec.collection or same.collection or default_collection(store.root)
    check_collection_name(collection)
    chosen = BackendSpec("milvus", uri, collection, index_type or spec.index_type or same.index_type)
    milvus_index_type(chosen.index_type or "auto", store.count, is_lite(uri))  # refuse what it cannot build
    return chosen


def record_spec(store: FeatureStore, spec: BackendSpec | None) -> None:
    if spec is not None and recorded_spec(store) != spec:
        store.manifest[MANIFEST_KEY] = {k: v for k, v in asdict(spec).items() if v is not None}


def make_backend(spec: BackendSpec | None, root: Path) -> SearchBackend:
    if spec is None or spec.name == "faiss":
        from .faiss_backend import FaissBackend

        return FaissBackend()
    from .milvus_backend import MilvusBackend
    from .milvus_client import is_lite

    uri = str(spec.uri)
    if is_lite(uri) and not os.path.isabs(uri):
        uri = str(Path(root).absolute() / uri)
    return MilvusBackend(uri, str(spec.collection))


def backend_for(store: FeatureStore) -> SearchBackend:
    """The search backend the store's manifest records (default: Faiss), not loaded."""
    return make_backend(recorded_spec(store), store.root)


def check_target(spec: BackendSpec | None, store: FeatureStore) -> None:
    """Before a writer does any work: a backend outside the store (a Milvus server or
    database) is reachable and holds nothing incompatible, so a failure writes nothing."""
    backend = make_backend(spec, store.root)
    target_check = getattr(backend, "check_target", None)
    if target_check is not None:
        with opened(backend):
            target_check(store.fingerprint)


@contextmanager
def opened(backend: SearchBackend) -> Iterator[SearchBackend]:
    """Use a backend, then let go of any connection it holds (a Milvus Lite database
    can be open in one process only)."""
    try:
        yield backend
    finally:
        close: Any = getattr(backend, "close", None)
        if close is not None:
            close()


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


def _saved_index_type(store: FeatureStore, backend: SearchBackend) -> str:
    from .faiss_backend import read_index_meta

    read_meta: Any = getattr(backend, "read_meta", None)
    try:
        meta = read_meta(store) if read_meta is not None else read_index_meta(store)
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
