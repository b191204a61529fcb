"""Searching an index: image(s) in, ranked hits out.

A :class:`Searcher` opens a store once (rows + its search backend) and loads the
model that made the store's vectors the first time it has to embed a query, so a
long-lived process (the web server) keeps both warm.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CbirError, CorruptStoreError
from ..imageio.decode import load_image
from ..imageio.region import Box
from ..models.protocol import embed_images
from ..models.quantize import Calibration
from ..paths import display_path, json_path, normalise_path
from ..resolve import resolve_index_dir
from ..store.feature_store import FeatureStore, Row
from ..store.manifest import check_fingerprint
from ..store.roots import common_folder_of, roots_of
from ..store.vectors import RowTable, row_table
from .backends import backend_for
from .filters import PassingCount, ResultFilter, filtered_search, passing_counts
from .rerank import RerankingBackend, reranked
from .scores import json_score, rank_scores

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image as PILImage

    from ..models.protocol import Embedder
    from .protocol import SearchBackend
    from .rerank import RerankSettings

MAX_K = 1000
ALLOWED_CACHE_ENTRIES = 8  # folder filters remembered per Searcher


@dataclass(frozen=True)
class Hit:
    rank: int
    score: float  # follows the order: never rises down the list (see .scores)
    id: int
    path: str  # as stored: printable() / display_path() to show it, json_path() for JSON
    cosine: float  # the plain cosine to the query; equals score unless re-ranking reordered

    def as_dict(self) -> dict[str, Any]:
        """For JSON: scores rounded, the path printable, with its exact bytes when that lost some."""
        return {"rank": self.rank, "score": json_score(self.score), "cosine": json_score(self.cosine),
                "id": self.id, **json_path(self.path)}


def open_backend(store: FeatureStore, backend: SearchBackend | None = None,
                 rerank: RerankSettings | None = None) -> SearchBackend:
    """The store's search backend (default: the one its manifest records, see
    :func:`~cbir_cli.search.backends.backend_for`), re-ranked with ``rerank`` when
    given (:mod:`.rerank`), loaded if saved for the current generation, else an
    exact one built in memory from the committed shards (a reader never writes)."""
    backend = reranked(backend if backend is not None else backend_for(store), rerank)
    if not backend.load(store):
        backend.build(store, "flat", persist=False)
    return backend


class Searcher:
    """Query side of a store: ``Searcher.open()`` then ``search_paths``/``search_images``."""

    def __init__(self, store: FeatureStore, backend: SearchBackend, device: str = "auto",
                 embedder: Embedder | None = None, runtime: str = "auto") -> None:
        self.store = store
        self.backend = backend
        self.device = device
        self.runtime = runtime  # model runtime when the embedder is loaded here: torch | onnx | auto
        self._embedder = embedder
        # Compact (arrays, not a Row object per row): ~70 MB at 1M rows, not ~700 MB.
        # Indexing it gives Row objects; rows.position(id) is a binary search.
        self.rows: RowTable = row_table(store)
        self._allowed_cache: dict[str, np.ndarray | None] = {}
        if len(self.rows) != backend.count:
            raise CorruptStoreError(f"{store.root}: index has {backend.count} vectors but the store {len(self.rows)}")

    @classmethod
    def open(cls, index_dir: str | os.PathLike[str] | None = None, device: str = "auto",
             embedder: Embedder | None = None, runtime: str = "auto",
             backend: SearchBackend | None = None, rerank: RerankSettings | None = None) -> Searcher:
        """Open the index at ``index_dir`` (default: ``$CBIR_INDEX`` or the user data dir).

        If the saved index is stale (an indexing run committed since), an exact index
        is built in memory from the committed shards, so results always reflect the
        last committed state and never a partial one. ``embedder``: the model, already
        loaded (default: the store's own, loaded on first use); ``backend``: the search
        backend to load or build (default: the one the index records, Faiss or
        Milvus); ``rerank``: re-rank its results with these settings (alpha-QE, DBA;
        :mod:`.rerank`). The library's default is None, the plain ranking by cosine;
        ``cbir query`` and ``cbir serve`` pass :class:`~.rerank.RerankSettings()`.

        Args:
            index_dir: the index folder; None: ``$CBIR_INDEX``, else the user data dir.
            device: where the model runs on first use (``auto``, ``cpu``, ``cuda``).
            embedder: the model, already loaded.
            runtime: the model's runtime on first use (``auto``, ``torch``, ``onnx``).
            backend: the search backend to load or build.
            rerank: re-ranking settings; None: plain cosine ranking.

        Returns:
            The searcher over the last committed state.

        Raises:
            CbirError: no index there, or one this installation cannot open (named).
        """
        root = resolve_index_dir(index_dir)
        attempts = 3
        for attempt in range(attempts):
            store = None
            try:
                store = FeatureStore.open(root)
                return cls._open_store(store, device, embedder, runtime, backend, rerank)
            except CorruptStoreError:
                # A writer committing (and deleting dropped shards, replacing the
                # saved index) while we read looks like damage: retry on its new
                # state; if nothing changed, the damage is real.
                if attempt == attempts - 1 or (store is not None and not store.changed_on_disk()):
                    raise
        raise AssertionError("unreachable")

    @classmethod
    def _open_store(cls, store: FeatureStore, device: str, embedder: Embedder | None, runtime: str,
                    backend: SearchBackend | None, rerank: RerankSettings | None) -> Searcher:
        if store.count == 0:
            raise CbirError(f"{store.root}: the index is empty; add images to it first")
        if embedder is not None:
            check_fingerprint(store.fingerprint, embedder.fingerprint(), store.root)
        return cls(store, open_backend(store, backend, rerank), device, embedder, runtime)

    # -- model -------------------------------------------------------------

    @property
    def embedder(self) -> Embedder:
        """The model that made this store's vectors, loaded on first use."""
        if self._embedder is None:
            from ..models.loading import descriptor_of, load_embedder

            fp = self.store.fingerprint
            weights = self.store.manifest.get("weights_path")
            # The store's folder: an int8 index keeps its quantised model there.
            calibration = Calibration.from_fingerprint(fp, self.store.root)
            self._embedder = load_embedder(fp["model"], weights, self.device, self.runtime,
                                           descriptor=descriptor_of(fp), calibration=calibration)
            check_fingerprint(fp, self._embedder.fingerprint(), self.store.root)
        return self._embedder

    @property
    def count(self) -> int:
        """Images in the index."""
        return len(self.rows)

    @property
    def index_type(self) -> str:
        """The search index's type (flat, hnsw, ivfpq, or a plugin backend's)."""
        return self.backend.index_type

    @property
    def rerank(self) -> RerankSettings | None:
        """The re-ranking this searcher was opened with (None: plain), so that a
        reopened state (a server's reload) is searched the same way."""
        return self.backend.settings if isinstance(self.backend, RerankingBackend) else None

    @property
    def model_name(self) -> str:
        """The model the index was built with."""
        return str(self.store.fingerprint["model"])

    def info(self) -> dict[str, Any]:
        """The index folder, image count, model, weights, dim and index type (``cbir status``)."""
        fp = self.store.fingerprint
        return {"index": str(self.store.root), "count": self.count, "model": fp["model"],
                "weights": fp["weights"], "dim": fp["dim"], "index_type": self.index_type}

    # -- lookup ------------------------------------------------------------

    def row(self, image_id: int) -> Row:
        """The stored row (id, path, content hash...) of ``image_id``; a CbirError for an unknown id."""
        try:
            return self.rows[self.rows.position(image_id)]
        except KeyError:
            raise CbirError(f"no image with id {image_id} in the index") from None

    @cached_property
    def roots(self) -> list[str]:
        """The folders (or URLs) that were indexed (:mod:`cbir_cli.store.roots`); for
        an index that recorded none, its rows' deepest common folder."""
        return roots_of(self.store.manifest, lambda: (r.path for r in self.rows))[0]

    @cached_property
    def folder(self) -> str:
        """The indexed folder: the one root, or the folder holding every root."""
        return common_folder_of(os.path.join(r, "") for r in self.roots) or os.sep

    def path_of(self, image_id: int) -> Path:
        """The indexed file of ``image_id``; a CbirError for an unknown id."""
        return Path(self.row(image_id).path)

    # -- search ------------------------------------------------------------

    def _check_k(self, k: int) -> int:
        if not 1 <= k <= MAX_K:
            raise CbirError(f"k must be between 1 and {MAX_K} (got {k})")
        return k

    def _allowed_ids(self, result_filter: ResultFilter) -> np.ndarray | None:
        """Ids below the filter's folder, computed once per folder (this Searcher
        sees one committed state, so they cannot change)."""
        if result_filter.under is None:
            return None
        if result_filter.under not in self._allowed_cache:
            if len(self._allowed_cache) >= ALLOWED_CACHE_ENTRIES:
                self._allowed_cache.pop(next(iter(self._allowed_cache)))
            self._allowed_cache[result_filter.under] = result_filter.allowed_ids(self.rows)
        return self._allowed_cache[result_filter.under]

    def _can_pass(self, result_filter: ResultFilter, allowed: np.ndarray | None) -> PassingCount | None:
        """For a re-ranked list (scores need not decrease) with a minimum score: how
        many results of each query can pass, from a raw range search (see
        :func:`~.filters.filtered_search`); None where the scores come best first."""
        min_score = result_filter.min_score
        if min_score is None or not isinstance(self.backend, RerankingBackend):
            return None
        range_search = self.backend.range_search
        return lambda queries: passing_counts(range_search, queries, min_score, allowed)

    def search_vectors(self, queries: np.ndarray, k: int = 5,
                       result_filter: ResultFilter | None = None) -> list[list[Hit]]:
        """Top-k hits per query vector.

        Args:
            queries: float32 (nq, dim), unit rows (as the index's model makes them).
            k: hits per query, 1 to the maximum (a CbirError outside).
            result_filter: only results below a folder and/or at or above a score,
                still k of them when k qualify.

        Returns:
            One list of hits per query, best first.
        """
        k = self._check_k(k)
        if result_filter is not None and result_filter.active:
            allowed = self._allowed_ids(result_filter)
            scores, ids = filtered_search(self.backend.search, queries, min(k, self.count), self.count,
                                          result_filter, allowed, self._can_pass(result_filter, allowed))
        else:
            scores, ids = self.backend.search(queries, min(k, self.count))
        results = []
        for score_row, id_row in zip(scores, ids):
            found = [(float(cosine), self.row(int(image_id))) for cosine, image_id in zip(score_row, id_row)
                     if image_id >= 0]
            results.append([Hit(rank, score, row.id, row.path, cosine) for rank, (score, (cosine, row))
                            in enumerate(zip(rank_scores(c for c, _ in found), found), start=1)])
        return results

    def search_images(self, images: Sequence[PILImage.Image], k: int = 5, box: Box | None = None,
                      result_filter: ResultFilter | None = None) -> list[list[Hit]]:
        """Embed decoded images and search.

        Args:
            images: decoded RGB images.
            k: hits per image.
            box: search with that region of each (pixels of the image as given, or fractions).
            result_filter: as :meth:`search_vectors`.

        Returns:
            One list of hits per image, best first.
        """
        if box is not None:
            images = [box.crop(image) for image in images]
        return self.search_vectors(embed_images(self.embedder, images), k, result_filter)

    def search_paths(self, paths: Sequence[str | os.PathLike[str]], k: int = 5, box: Box | None = None,
                     result_filter: ResultFilter | None = None) -> list[list[Hit]]:
        """Embed image files and search.

        Args:
            paths: image files.
            k: hits per file.
            box: as :meth:`search_images`.
            result_filter: as :meth:`search_vectors`.

        Returns:
            One list of hits per file, best first.

        Raises:
            ImageError: an unreadable file, named.
        """
        # A region is cut from the full-size picture: a reduced (draft) JPEG decode
        # would shift pixel coordinates and leave a small region too few pixels.
        draft = None if box is not None else self.embedder.config.draft_size
        images = [load_image(p, draft_size=draft) for p in paths]
        return self.search_images(images, k, box, result_filter)

    def search_ids(self, image_ids: Sequence[int], k: int = 5, box: Box | None = None,
                   result_filter: ResultFilter | None = None) -> list[list[Hit]]:
        """Use indexed images as queries: their stored vectors (no model needed), or
        with a ``box``, that region of their files (embedded).

        Args:
            image_ids: ids of indexed images.
            k: hits per id.
            box: as :meth:`search_images`.
            result_filter: as :meth:`search_vectors`.

        Returns:
            One list of hits per id, best first (each image finds itself first).

        Raises:
            CbirError: an unknown id, named.
        """
        import numpy as np

        rows = [self.row(image_id) for image_id in image_ids]  # unknown id -> CbirError naming it
        if box is not None:
            return self.search_paths([r.path for r in rows], k, box, result_filter)
        return self.search_vectors(self.backend.vectors(np.asarray(image_ids, dtype=np.int64)), k, result_filter)

    def id_of_path(self, path: str | os.PathLike[str]) -> int:
        """The id of an indexed file, by its path (any spelling of it).

        Args:
            path: the file's path, relative or absolute.

        Returns:
            Its id.

        Raises:
            CbirError: the file is not in the index.
        """
        key = normalise_path(path)
        for row in self.rows:
            if row.path == key:
                return row.id
        raise CbirError(f"{display_path(path)}: not in the index {self.store.root} (index it first, or query "
                        "with the image itself)")
