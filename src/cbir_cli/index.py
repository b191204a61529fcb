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

    from .extract import ExtractOptions, ExtractSummary, SkipCallback
    from .models import Embedder

INDEX_DIR = "index"
INDEX_FILE = "index.faiss"
INDEX_META = "index.json"
INDEX_TYPES = ("flat", "hnsw")


def _as_queries(x: np.ndarray, d: int) -> np.ndarray:
    import numpy as np

    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2 or x.shape[1] != d:
        raise ValueError(f"expected float32 array of shape (n, {d}), got {x.shape}")
    return x


def factory_string(index_type: str, n: int) -> str:
    """Faiss index_factory string for an index type and collection size."""
    if index_type == "flat":
        return "Flat"
    if index_type == "hnsw":
        return "HNSW32,Flat"
    raise CbirError(f"unknown index type {index_type!r}; choose one of: {', '.join(INDEX_TYPES)}")


def build_index(vectors: np.ndarray, index_type: str = "flat") -> faiss.Index:
    """An inner-product Faiss index holding ``vectors`` (row i gets label i)."""
    import faiss

    vectors = _as_queries(vectors, vectors.shape[1] if vectors.ndim == 2 else -1)
    index = faiss.index_factory(vectors.shape[1], factory_string(index_type, len(vectors)), faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        index.train(vectors)
    if len(vectors):
        index.add(vectors)
    return index


def search_index(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(D, I) for each query; all queries go through one search call."""
    import numpy as np

    queries = _as_queries(queries, index.d)
    if k < 1:
        raise ValueError(f"k must be >= 1 (got {k})")
    if index.ntotal == 0:
        return np.full((len(queries), k), -np.inf, dtype=np.float32), np.full((len(queries), k), -1, dtype=np.int64)
    return index.search(queries, k)


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
    """The saved index if it matches the store's committed state, else None (stale
    or missing). A damaged index file raises: it is never served."""
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
    return index, str(meta.get("index_type", "flat"))


def build_store_index(store: FeatureStore, index_type: str = "flat") -> faiss.Index:
    """(Re)build the search index from the store's shards and save it."""
    index = build_index(store.load_vectors(), index_type)
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
    index_type: str = "flat",
    rebuild: bool = False,
    embedder: Embedder | None = None,
    on_skip: SkipCallback | None = None,
    on_notice: Callable[[str], None] | None = None,
) -> ExtractSummary:
    """``cbir index``: sync the folder into the store, then (re)build its search index,
    all under the store's writer lock. ``rebuild`` starts the store from scratch."""
    import shutil

    from .extract import sync_folder
    from .locking import writer_lock
    from .models import DEFAULT_MODEL, choose_default_model
    from .paths import resolve_index_dir

    factory_string(index_type, 0)  # validate before any work
    store_dir = resolve_index_dir(index_dir)
    with writer_lock(store_dir):
        if rebuild:
            for name in ("manifest.json", "shards", INDEX_DIR):
                target = store_dir / name
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
        if model is None and embedder is None and FeatureStore.exists(store_dir):
            # Keep the model (and weights file) an existing index was built with.
            existing = FeatureStore.open(store_dir)
            model = existing.fingerprint["model"]
            weights = weights or existing.manifest.get("weights_path")
        if model is None and embedder is None:
            model, notice = choose_default_model()
            if notice and on_notice:
                on_notice(notice)
        model = model or DEFAULT_MODEL
        summary = sync_folder(root, store_dir, model, weights, options, embedder, on_skip, lock=False)
        store = FeatureStore.open(store_dir)
        meta = read_index_meta(store)
        if meta is None or meta.get("generation") != store.generation or meta.get("index_type") != index_type:
            build_store_index(store, index_type)
    return summary
