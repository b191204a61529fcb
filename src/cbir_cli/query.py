"""Searching an index: image(s) in, ranked hits out.

A :class:`Searcher` opens a store once (vectors, rows, Faiss index) and loads the
model that made the store's vectors the first time it has to embed a query, so a
long-lived process (the web server) keeps both warm.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import CbirError
from .images import display_path, load_image
from .index import ShardVectors, build_index, load_index, needs_rerank, search_index
from .paths import resolve_index_dir
from .store import FeatureStore, Row

if TYPE_CHECKING:
    import faiss
    import numpy as np
    from PIL import Image as PILImage

    from .models import Embedder

MAX_K = 1000


@dataclass(frozen=True)
class Hit:
    rank: int
    score: float
    id: int
    path: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Searcher:
    """Query side of a store: ``Searcher.open()`` then ``search_paths``/``search_images``."""

    def __init__(self, store: FeatureStore, index: faiss.Index, index_type: str, device: str = "auto",
                 embedder: Embedder | None = None) -> None:
        self.store = store
        self.index = index
        self.index_type = index_type
        self.device = device
        self._embedder = embedder
        # Model runtime when the embedder is loaded here: torch | onnx | auto.
        self.runtime = "auto"
        self.rows: list[Row] = store.live_rows()
        # id -> position in the index (row order); built once, a search by id on a
        # large index must not rebuild it.
        self._position_by_id = {r.id: i for i, r in enumerate(self.rows)}
        if len(self.rows) != index.ntotal:
            from .errors import CorruptStoreError

            raise CorruptStoreError(f"{store.root}: index has {index.ntotal} vectors but the store {len(self.rows)}")
        # A compressed (IVF-PQ) index only picks a shortlist; its exact scores come
        # from the shards, memory-mapped (see index.search_index).
        self.exact_vectors = ShardVectors(store) if needs_rerank(index) else None

    @classmethod
    def open(cls, index_dir: str | os.PathLike[str] | None = None, device: str = "auto",
             embedder: Embedder | None = None) -> Searcher:
        """Open the index at ``index_dir`` (default: ``$CBIR_INDEX`` or the user data dir).

        If the saved index is stale (an indexing run committed since), an exact index
        is built in memory from the committed shards, so results always reflect the
        last committed state and never a partial one.
        """
        from .errors import CorruptStoreError

        root = resolve_index_dir(index_dir)
        attempts = 3
        for attempt in range(attempts):
            store = None
            try:
                store = FeatureStore.open(root)
                return cls._open_store(store, device, embedder)
            except CorruptStoreError:
                # A writer committing (and deleting dropped shards, replacing the
                # saved index) while we read looks like damage: retry on its new
                # state; if nothing changed, the damage is real.
                if attempt == attempts - 1 or (store is not None and not store.changed_on_disk()):
                    raise
        raise AssertionError("unreachable")

    @classmethod
    def _open_store(cls, store: FeatureStore, device: str, embedder: Embedder | None) -> Searcher:
        if store.count == 0:
            raise CbirError(f"{store.root}: the index is empty; add images with `cbir index FOLDER`")
        if embedder is not None:
            from .store import check_fingerprint

            check_fingerprint(store.fingerprint, embedder.fingerprint(), store.root)
        loaded = load_index(store)
        if loaded is None:
            index, index_type = build_index(store.load_vectors(), "flat"), "flat (in memory)"
        else:
            index, index_type = loaded
        return cls(store, index, index_type, device, embedder)

    # -- model -------------------------------------------------------------

    @property
    def embedder(self) -> Embedder:
        """The model that made this store's vectors, loaded on first use."""
        if self._embedder is None:
            from .models import load_embedder

            fp = self.store.fingerprint
            weights = self.store.manifest.get("weights_path")
            self._embedder = load_embedder(fp["model"], weights, self.device, self.runtime)
            from .store import check_fingerprint

            check_fingerprint(fp, self._embedder.fingerprint(), self.store.root)
        return self._embedder

    @property
    def count(self) -> int:
        return len(self.rows)

    @property
    def model_name(self) -> str:
        return str(self.store.fingerprint["model"])

    def info(self) -> dict[str, Any]:
        fp = self.store.fingerprint
        return {"index": str(self.store.root), "count": self.count, "model": fp["model"],
                "weights": fp["weights"], "dim": fp["dim"], "index_type": self.index_type}

    # -- lookup ------------------------------------------------------------

    def row(self, image_id: int) -> Row:
        try:
            return self.rows[self._position_by_id[image_id]]
        except KeyError:
            raise CbirError(f"no image with id {image_id} in the index") from None

    def path_of(self, image_id: int) -> Path:
        return Path(self.row(image_id).path)

    # -- search ------------------------------------------------------------

    def _check_k(self, k: int) -> int:
        if not 1 <= k <= MAX_K:
            raise CbirError(f"k must be between 1 and {MAX_K} (got {k})")
        return k

    def search_vectors(self, queries: np.ndarray, k: int = 5) -> list[list[Hit]]:
        k = self._check_k(k)
        D, I = search_index(self.index, queries, min(k, self.count), self.exact_vectors)
        results = []
        for drow, irow in zip(D, I):
            hits = []
            for score, pos in zip(drow, irow):
                if pos < 0:
                    continue
                row = self.rows[pos]
                hits.append(Hit(len(hits) + 1, float(score), row.id, display_path(row.path)))
            results.append(hits)
        return results

    def search_images(self, images: Sequence[PILImage.Image], k: int = 5) -> list[list[Hit]]:
        return self.search_vectors(self.embedder.embed_images(images), k)

    def search_paths(self, paths: Sequence[str | os.PathLike[str]], k: int = 5) -> list[list[Hit]]:
        """Embed image files and search. An unreadable file raises ImageError naming it."""
        images = [load_image(p, draft_size=self.embedder.config.resize_size) for p in paths]
        return self.search_images(images, k)

    def search_ids(self, image_ids: Sequence[int], k: int = 5) -> list[list[Hit]]:
        """Use indexed images as queries (their stored vectors; no model needed)."""
        import numpy as np

        for image_id in image_ids:
            self.row(image_id)  # unknown id -> CbirError naming it
        wanted = np.asarray([self._position_by_id[i] for i in image_ids], dtype=np.int64)
        if self.exact_vectors is not None:
            vectors = self.exact_vectors[wanted]
        elif self._reconstructible():
            vectors = np.stack([self.index.reconstruct(int(p)) for p in wanted])
        else:
            vectors = self.store.load_vectors()[wanted]
        return self.search_vectors(vectors, k)

    def _reconstructible(self) -> bool:
        try:
            self.index.reconstruct(0)
            return True
        except RuntimeError:
            return False

