"""Re-ranking on top of any :class:`~cbir_cli.search.protocol.SearchBackend`:
alpha-query expansion (alpha-QE) and database-side augmentation (DBA, :mod:`.dba`).

:class:`RerankingBackend` wraps a backend (exact or approximate) and is itself a
``SearchBackend``, so the :class:`~cbir_cli.search.searcher.Searcher`, ``cbir
query``, ``cbir serve`` and ``cbir evaluate`` use it unchanged. One query:

1. the raw search (the query against the indexed vectors) gives the raw top-1 and
   the query's ``qe_depth`` nearest neighbours with their similarities;
2. alpha-QE: ``q' = L2(q + sum_i max(s_i, 0)**alpha * v_i)``, ``v_i`` the
   neighbours' augmented vectors (their raw vectors when the index has no DBA);
3. re-scoring: ``q'`` against the augmented vectors of a shortlist -- the raw
   search's top results and the images whose DBA neighbour lists hold one of them
   (the images an augmentation pulls up) -- scored exactly (without DBA: a second
   search with ``q'``);
4. ``pin_first``: the raw top-1 stays first (re-ranking pulls a query towards its
   neighbours' category, which would bury an exact copy; the pin keeps
   copy detection intact while the rest is re-ranked).

Scores returned by :meth:`RerankingBackend.search` are each result's cosine
similarity to the query (raw vectors), in the re-ranked order: they need not
decrease. :meth:`RerankingBackend.rank` returns the re-ranking scores instead.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import CbirError, CorruptStoreError
from .dba import (
    Augmentation,
    DbaSettings,
    augment,
    augmentation_intact,
    check_augmentation,
    expand,
    file_allocator,
    gather,
    load_augmentation,
    save_augmentation,
    saved_settings,
)
from .exact import as_queries, rerank
from .protocol import BackendCheck

if TYPE_CHECKING:
    import numpy as np

    from ..store.feature_store import FeatureStore
    from .protocol import SearchBackend

# With DBA, the raw search's top SHORTLIST_FACTOR * k (at least SHORTLIST_MIN) and
# their reverse DBA neighbours are scored exactly against the augmented vectors.
# Oxford-17 top-10 against the exhaustive re-ranking: 0.988 of results agree at
# 20, 0.999 at 50 (which costs IVF-PQ twice the time: its shortlist grows with k).
SHORTLIST_FACTOR = 2
SHORTLIST_MIN = 20
# A reader computes a missing or stale augmentation in memory up to this many
# vectors (seconds); above, it searches without DBA until `cbir index` saves one.
IN_MEMORY_MAX = 50_000
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RerankSettings:
    """Query-time re-ranking: alpha-QE over ``qe_depth`` neighbours (0: none), the
    index's augmented vectors when it has them (``use_dba``), and the raw top-1
    kept first (``pin_first``)."""

    qe_depth: int = 3
    qe_alpha: float = 3.0
    pin_first: bool = True
    use_dba: bool = True

    def __post_init__(self) -> None:
        if not 0 <= int(self.qe_depth) <= 100:
            raise CbirError(f"the query-expansion depth must be between 0 and 100 (got {self.qe_depth})")
        if not 0.0 <= float(self.qe_alpha) <= 16.0:
            raise CbirError(f"alpha must be between 0 and 16 (got {self.qe_alpha})")

    def label(self, dba: DbaSettings | None) -> str:
        parts = []
        if self.use_dba and dba is not None and dba.enabled:
            parts.append(f"DBA n={dba.depth} a={dba.alpha:g}")
        if self.qe_depth:
            parts.append(f"aQE n={self.qe_depth} a={self.qe_alpha:g}")
        if self.pin_first and parts:
            parts.append("raw top-1 kept first")
        return ", ".join(parts) or "none"


NO_RERANKING = RerankSettings(qe_depth=0, pin_first=False, use_dba=False)


def reranked(inner: SearchBackend, settings: RerankSettings | None) -> SearchBackend:
    """``inner`` re-ranked with ``settings``; None or :data:`NO_RERANKING`: ``inner``
    itself (what :meth:`~cbir_cli.search.searcher.Searcher.open` searches with)."""
    if settings is None or settings == NO_RERANKING or isinstance(inner, RerankingBackend):
        return inner
    return RerankingBackend(inner, settings)


def rerank_search(backend: SearchBackend, augmentation: Augmentation | None, settings: RerankSettings,
                  queries: np.ndarray, k: int, exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Re-ranked top-k ``(scores, ids)`` (see the module docstring); scores are the
    re-ranking's (q' against the augmented vectors; the pinned top-1 gets +inf).
    ``exclude``: one id per query never returned nor used (-1: none), e.g. the query
    itself in an all-vs-all evaluation."""
    import numpy as np

    count = backend.count
    nq = len(queries)
    scores_out = np.full((nq, k), -np.inf, dtype=np.float32)
    ids_out = np.full((nq, k), -1, dtype=np.int64)
    if count == 0 or nq == 0:
        return scores_out, ids_out
    skip = np.full(nq, -1, dtype=np.int64) if exclude is None else np.asarray(exclude, dtype=np.int64)
    excluded = exclude is not None
    wanted = min(count, k + excluded + settings.pin_first)
    # With DBA the raw search also gives the shortlist that is re-scored (see below).
    first = max(settings.qe_depth, 1, SHORTLIST_FACTOR * k, SHORTLIST_MIN) if augmentation is not None else \
        max(settings.qe_depth, 1)
    first = min(count, first + excluded)
    raw_scores, raw_ids = _without(*backend.search(queries, first), skip, first - excluded)
    expanded = queries
    if settings.qe_depth:
        neighbours = raw_ids[:, :settings.qe_depth]
        vectors = augmentation.of(neighbours) if augmentation is not None else gather(backend, neighbours)
        expanded = expand(queries, vectors, raw_scores[:, :settings.qe_depth], settings.qe_alpha)
    if augmentation is None:
        scores, ids = backend.search(expanded, wanted)  # exact scores of q' against the raw vectors
    else:
        # q' against the augmented vectors of the raw shortlist, widened by the images
        # whose augmented vectors a shortlisted one pulls up (their DBA neighbours):
        # one search, not two; on Oxford-17 the top-10 equals the exhaustive one's
        # for 99.9 % of results (without the widening: 68 %).
        positions = augmentation.with_reverse(augmentation.positions(raw_ids))
        positions = np.where(positions == augmentation.positions(skip)[:, None], -1, positions)
        scores, found = rerank(expanded, positions, augmentation.vectors, wanted)
        ids = np.where(found >= 0, augmentation.ids[np.maximum(found, 0)], -1)
    scores, ids = _without(scores, ids, skip, wanted - (exclude is not None))
    if settings.pin_first:
        top = raw_ids[:, 0]
        rest = ids != top[:, None]
        for q in range(nq):  # pinned first, then the re-ranked rest without it
            row_ids = np.concatenate([[top[q]], ids[q][rest[q]]])[:k]
            row_scores = np.concatenate([[np.inf], scores[q][rest[q]]])[:k]
            ids_out[q, :len(row_ids)], scores_out[q, :len(row_scores)] = row_ids, row_scores
        unpinned = top < 0
        ids_out[unpinned], scores_out[unpinned] = -1, -np.inf
        return scores_out, ids_out
    kk = min(k, ids.shape[1])
    scores_out[:, :kk], ids_out[:, :kk] = scores[:, :kk], ids[:, :kk]
    return scores_out, ids_out


def _without(scores: np.ndarray, ids: np.ndarray, skip: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Results minus each row's ``skip`` id (where present, else minus the last), ``width`` kept."""

    if not (skip >= 0).any():
        return scores[:, :width], ids[:, :width]
    drop = ids == skip[:, None]
    drop[~drop.any(axis=1), ids.shape[1] - 1] = True
    keep = ~drop
    shape = (len(ids), ids.shape[1] - 1)
    return scores[keep].reshape(shape)[:, :width], ids[keep].reshape(shape)[:, :width]


@dataclass
class RerankingBackend:
    """A :class:`~cbir_cli.search.protocol.SearchBackend` that re-ranks another one.

    ``dba``: the augmentation to build (writers, and in-memory use through
    :meth:`add`); None keeps a saved index's own settings (else the default). The
    augmented vectors are saved next to the inner backend's index by
    :meth:`build`/:meth:`refresh` and loaded by :meth:`load`."""

    inner: SearchBackend
    settings: RerankSettings = field(default_factory=RerankSettings)
    dba: DbaSettings | None = None
    augmentation: Augmentation | None = None
    #: Why no augmentation is used although one was asked for (for ``info``), or None.
    dba_note: str | None = None
    #: Set when the saved DBA files are damaged: the plain ranking is served instead.
    plain_only: bool = False

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def index_type(self) -> str:
        used = self.augmentation.settings if self.augmentation is not None else None
        label = self.settings.label(used)
        note = f" ({self.dba_note})" if self.dba_note else ""
        return self.inner.index_type if label == "none" else f"{self.inner.index_type}; re-ranked: {label}{note}"

    @property
    def count(self) -> int:
        return self.inner.count

    def _settings_for(self, store: FeatureStore, writing: bool = False) -> DbaSettings:
        """The augmentation's settings: this backend's, else the saved one's, else the
        default. A damaged saved description: readers refuse it (naming the file), a
        writer makes the augmentation again."""
        if self.dba is not None:
            return self.dba
        try:
            return saved_settings(store) or DbaSettings()
        except CbirError:
            if not writing:
                raise
            return DbaSettings()

    def _live_ids(self, store: FeatureStore) -> np.ndarray:
        """The live ids in row order: from the manifest and each shard's first id as
        the saved search index records them (written by this writer's refresh just
        before), without reading every rows file (10M rows: 43 s and 4.5 GB in
        bench/scale.py); from the rows files where no current record exists."""
        from ..store.vectors import row_table
        from .saved_index import first_ids_of, read_index_meta

        try:
            meta = read_index_meta(store)
        except CbirError:
            meta = None
        first = first_ids_of(meta) if meta is not None and meta.get("generation") == store.generation else None
        # A shard's ids are consecutive: its recorded first id must end at the max_id the
        # manifest records, else the record is damaged (index.json has no checksum).
        if first is not None and not all(shard.get("max_id") == first.get(shard["name"], -2) + shard["rows"] - 1
                                         for shard in store.manifest["shards"]):
            first = None
        return row_table(store, first).ids

    def _augment(self, store: FeatureStore, settings: DbaSettings, persist: bool,
                 previous: Augmentation | None = None) -> None:
        if not settings.enabled:
            import numpy as np

            self.augmentation = None
            if persist:  # a record that there is none (no live ids needed: 10M rows, 80 MB)
                save_augmentation(store, augment(self.inner, np.zeros(0, dtype=np.int64), settings), None)
            return
        if persist:
            allocate, made = file_allocator(store)
            augmentation = augment(self.inner, self._live_ids(store), settings, previous, allocate)
            save_augmentation(store, augmentation, made())
            self.augmentation = load_augmentation(store, settings)
        else:
            self.augmentation = augment(self.inner, self._live_ids(store), settings, previous)

    def build(self, store: FeatureStore, index_type: str, persist: bool = True) -> None:
        """Build the inner index and the augmentation; ``persist``: save both (a
        writer), else in memory (a reader facing a stale index: the augmentation
        as :meth:`load` makes a missing one)."""
        self.inner.build(store, index_type, persist)
        if not persist:
            self._load_augmentation(store)
        elif self.settings.use_dba:
            self._augment(store, self._settings_for(store, writing=True), persist)

    def refresh(self, store: FeatureStore, index_type: str | None = None) -> bool:
        """Bring the saved index and augmentation up to date (the augmentation
        incrementally from the previous one where possible). Returns whether
        either was made again."""
        rebuilt = self.inner.refresh(store, index_type)
        settings = self._settings_for(store, writing=True)
        try:
            if load_augmentation(store, settings) is not None and augmentation_intact(store):
                return rebuilt
        except CbirError:
            pass  # damaged: made again below
        if not settings.enabled:  # nothing to compute: the index need not be read
            self._augment(store, settings, persist=True)
            return True
        if not self.inner.load(store):
            self.inner.build(store, index_type or "auto")
        try:
            previous = load_augmentation(store, settings, any_generation=True)
            if previous is not None and not augmentation_intact(store):
                previous = None  # damaged: recompute from scratch
        except CbirError:
            previous = None
        self._augment(store, settings, persist=True, previous=previous)
        return True

    def load(self, store: FeatureStore) -> bool:
        if not self.inner.load(store):
            return False
        self._load_augmentation(store)
        return True

    def _load_augmentation(self, store: FeatureStore) -> None:
        self.augmentation, self.dba_note, self.plain_only = None, None, False
        if not self.settings.use_dba:
            return
        try:
            settings = self._settings_for(store)
            if not settings.enabled:
                return
            self.augmentation = load_augmentation(store, settings)
        except CorruptStoreError as exc:
            # Derived data only: the plain ranking (from the verified shards) is still
            # right, re-ranking with damaged vectors would silently reorder results.
            self.plain_only, self.dba_note = True, "DBA vectors damaged: not re-ranked"
            log.warning("warning: %s; results are not re-ranked: repair with `cbir check --repair`", exc.message)
            return
        if self.augmentation is None:
            if store.count <= IN_MEMORY_MAX:
                self.augmentation = augment(self.inner, self._live_ids(store), settings)
            else:
                self.dba_note = "no current DBA vectors saved for this index (they are made when it is indexed)"

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add vectors and update the augmentation in memory (only the rows whose
        neighbours change are recomputed)."""
        import numpy as np

        self.inner.add(ids, vectors)
        if not self.settings.use_dba:
            return
        settings = self.dba or (self.augmentation.settings if self.augmentation is not None else DbaSettings())
        if settings.enabled:
            known = self.augmentation.ids if self.augmentation is not None else np.zeros(0, dtype=np.int64)
            all_ids = np.concatenate([known, np.asarray(ids, dtype=np.int64)])
            self.augmentation = augment(self.inner, all_ids, settings, self.augmentation)

    def remove(self, ids: np.ndarray) -> None:
        import numpy as np

        self.inner.remove(ids)
        if self.augmentation is not None:
            kept = self.augmentation.ids[~np.isin(self.augmentation.ids, np.asarray(ids, dtype=np.int64))]
            self.augmentation = augment(self.inner, kept, self.augmentation.settings, self.augmentation)

    def rank(self, queries: np.ndarray, k: int, exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Re-ranked top-k with the re-ranking's scores (see :func:`rerank_search`)."""
        import numpy as np

        queries = np.asarray(queries, dtype=np.float32)
        queries = as_queries(queries, queries.shape[-1])
        settings = NO_RERANKING if self.plain_only else self.settings
        return rerank_search(self.inner, self.augmentation, settings, queries, k, exclude)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Re-ranked top-k ``(cosine to the query, ids)``: see the module docstring."""
        import numpy as np

        _, ids = self.rank(queries, k)
        valid = ids >= 0
        scores = np.full(ids.shape, -np.inf, dtype=np.float32)
        if valid.any():
            found = self.inner.vectors(ids[valid])
            rows = np.nonzero(valid)[0]
            scores[valid] = np.einsum("md,md->m", np.asarray(queries, dtype=np.float32)[rows], found)
        return scores, ids

    def range_search(self, queries: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The inner backend's range search: a range is a set of raw cosines to the
        query (near duplicates, a minimum score), never a re-ranked order."""
        return self.inner.range_search(queries, threshold)

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        return self.inner.vectors(ids)

    def close(self) -> None:
        self.inner.close()

    def check_target(self, fingerprint: dict[str, Any]) -> None:
        self.inner.check_target(fingerprint)

    def read_meta(self, store: FeatureStore) -> dict[str, Any] | None:
        return self.inner.read_meta(store)

    def check(self, store: FeatureStore, live_vectors: np.ndarray) -> BackendCheck:
        report = self.inner.check(store, live_vectors)
        state, problems = check_augmentation(store, self._live_ids(store))
        if problems and not report.problems:
            # Re-populating the backend from the shards makes them again.
            report.repair = "rebuild-backend"
        report.problems += problems
        if state != "current":
            report.notes.append(f"DBA vectors {state}; queries compute them in memory up to {IN_MEMORY_MAX:,} "
                                "images (`cbir index FOLDER` saves them)")
        return report

