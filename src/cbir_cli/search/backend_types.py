"""The built-in search backends as registered (``cbir_cli.backends`` entry points,
:mod:`.backends`): Faiss, embedded in the index folder, and Milvus (Milvus Lite or
a server). A plugin's backend type looks like these."""

from __future__ import annotations

import os
from pathlib import Path

from ..store.feature_store import FeatureStore
from .backends import BackendSpec, InFolderBackendType
from .protocol import SearchBackend

# Where `--backend milvus` keeps a Milvus Lite database when no address is given.
DEFAULT_LITE_NAME = "milvus.db"


class FaissType(InFolderBackendType):
    """Faiss: the saved index lives in the index folder and records its own type."""

    name = "faiss"
    description = "Faiss, embedded in the index folder (the default)"

    def open(self, spec: BackendSpec, root: Path) -> SearchBackend:
        from .faiss_backend import FaissBackend

        return FaissBackend()


class MilvusType:
    """Milvus: a Lite database (a ``.db`` path, relative to the index folder when
    inside it, so the folder can move) or a server, and a collection."""

    name = "milvus"
    description = "Milvus Lite (a .db file) or a Milvus server (pip install 'cbir-cli[milvus]')"

    def choose(self, requested: BackendSpec, recorded: BackendSpec | None, index_type: str | None,
               store: FeatureStore) -> BackendSpec:
        from .milvus_backend import milvus_index_type
        from .milvus_client import check_collection_name, check_uri, default_collection, import_pymilvus, is_lite

        import_pymilvus()  # the extra is missing: say so before any work
        same = recorded or BackendSpec("milvus")
        uri = requested.uri or same.uri or DEFAULT_LITE_NAME
        if is_lite(uri) and uri != same.uri:
            check_uri(uri)
            # A path the user gave is relative to here; the default lives in the index folder.
            path = (store.root / uri if requested.uri is None else Path(uri).expanduser()).absolute()
            uri = path.name if path.parent == store.root.absolute() else str(path)
        collection = requested.collection or same.collection or default_collection(store.root)
        check_collection_name(collection)
        chosen = BackendSpec("milvus", uri, collection, index_type or requested.index_type or same.index_type)
        milvus_index_type(chosen.index_type or "auto", store.count, is_lite(uri))  # refuse what it cannot build
        return chosen

    def open(self, spec: BackendSpec, root: Path) -> SearchBackend:
        from .milvus_backend import MilvusBackend
        from .milvus_client import is_lite

        uri = str(spec.uri)
        if is_lite(uri) and not os.path.isabs(uri):
            uri = str(Path(root).absolute() / uri)
        return MilvusBackend(uri, str(spec.collection))


FAISS = FaissType()
MILVUS = MilvusType()
