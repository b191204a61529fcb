"""The Search backend seam: a vector index over a store's live rows.

The store's shards are the source of truth; a backend is derived data that can
always be rebuilt from them. Every backend answers in store row ids (stable
integers, never reused), so callers never depend on an engine's internal order.
:class:`~cbir_cli.search.searcher.Searcher`, ``cbir query``, ``cbir serve`` and
``cbir evaluate`` talk to this protocol only; :mod:`.backends` makes the one a
store's manifest records. Implementations:
:class:`~cbir_cli.search.faiss_backend.FaissBackend` (embedded, the default),
:class:`~cbir_cli.search.milvus_backend.MilvusBackend` (Milvus Lite or a Milvus
server); tests add a numpy fake.

Array contract (as faiss): float32 (n, d) queries in; ``(scores, ids)`` out, each
(nq, k), scores are inner products (= cosine for unit vectors), best first,
``ids == -1`` with score ``-inf`` where fewer than k results exist. (A re-ranking
backend, :mod:`.rerank`, orders by its re-ranking: each score is still the
result's inner product with the query, so scores need not decrease.) Range
search answers Faiss's packed ``(lims, scores, ids)`` (see :mod:`.range`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import numpy as np

    from ..store.feature_store import FeatureStore


@dataclass
class BackendCheck:
    """What ``cbir check`` learns of a backend's saved state."""

    state: str = "missing"  # current | stale | missing | in use (held by another process: not checked)
    problems: list[str] = field(default_factory=list)  # damage: the index must be rebuilt
    notes: list[str] = field(default_factory=list)  # worth knowing, harmless
    # The remedy key (cbir_cli.errors.REMEDIES) for ``problems``; None: rebuild the index.
    repair: str | None = None


@runtime_checkable
class SearchBackend(Protocol):
    """A vector index over a store's live rows, answering in row ids (see the
    module docstring for the array contract). Register a backend *type*
    (:class:`~cbir_cli.search.backends.BackendType`) that opens one under the
    ``cbir_cli.backends`` entry-point group (see Extending)."""

    #: The engine ("faiss", ...).
    name: str
    #: What is built: flat, hnsw, ivfpq, "flat (in memory)"...
    index_type: str

    @property
    def count(self) -> int:
        """Vectors searchable now."""
        ...

    def build(self, store: FeatureStore, index_type: str, persist: bool = True) -> None:
        """(Re)build from the store's committed shards; ``persist`` saves it for the
        store's current generation (writers only, holding the store's lock).

        Args:
            store: the feature store to index.
            index_type: ``flat``, ``hnsw``, ``ivfpq`` or ``auto`` (a backend may map them to its own).
            persist: save the index next to the store.
        """
        ...

    def refresh(self, store: FeatureStore, index_type: str | None = None) -> bool:
        """Writers, after each commit: bring what is saved up to date with the
        store's committed state, rebuilding it when stale, missing or damaged
        (``index_type`` None: keep the saved type, else the default).

        Args:
            store: the store just committed.
            index_type: the index type to (re)build, or None.

        Returns:
            Whether it rebuilt (False: brought up to date in place).
        """
        ...

    def load(self, store: FeatureStore) -> bool:
        """Load what was saved for the store's current generation.

        Args:
            store: the open store.

        Returns:
            False when there is nothing current (stale or missing): then :meth:`build` it.
        """
        ...

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Make ``vectors`` searchable.

        Args:
            ids: the new rows' ids (int64).
            vectors: float32 (n, dim), rows aligned with ``ids``.
        """
        ...

    def remove(self, ids: np.ndarray) -> None:
        """Stop returning ``ids``.

        Args:
            ids: row ids (int64); unknown ids are ignored.
        """
        ...

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The top-k per query, exact scores (see the module docstring).

        Args:
            queries: float32 (nq, dim), unit rows.
            k: results per query.

        Returns:
            ``(scores, ids)``, each (nq, k), best first; ``-1`` ids pad short answers.
        """
        ...

    def range_search(self, queries: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every indexed vector scoring ``>= threshold`` against each query, as
        ``(lims, scores, ids)``: query ``i``'s results are ``scores[lims[i]:lims[i+1]]``
        and ``ids[...]``, best first, exact scores (see :mod:`.range`). Exact for an
        exact index; an approximate one may miss what its k-NN search misses.

        Args:
            queries: float32 (nq, dim), unit rows.
            threshold: the lowest score returned.

        Returns:
            ``(lims, scores, ids)``: lims (nq + 1,), scores and ids (lims[-1],).
        """
        ...

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        """The exact stored vectors of ``ids``.

        Args:
            ids: row ids (int64), all live.

        Returns:
            float32 (len(ids), dim), one row per id.
        """
        ...

    def check(self, store: FeatureStore, live_vectors: np.ndarray) -> BackendCheck:
        """Compare what is saved for ``store`` with its verified ``live_vectors``
        (rows in live-row order), without changing anything.

        Args:
            store: the store the index was built for.
            live_vectors: float32, the store's verified live rows in order.

        Returns:
            What is saved and what disagrees with the store.
        """
        ...

    def check_target(self, fingerprint: dict[str, Any]) -> None:
        """Before a writer does any work: where the backend keeps its index (a server,
        a database) is reachable and holds nothing incompatible with vectors of
        ``fingerprint``; a CbirError otherwise, so that a failure writes nothing.

        Args:
            fingerprint: the model fingerprint of the vectors to be written.

        Raises:
            CbirError: unreachable, or holding incompatible vectors.
        """
        ...

    def read_meta(self, store: FeatureStore) -> dict[str, Any] | None:
        """What was saved with the store's index.

        Args:
            store: the open store.

        Returns:
            At least ``index_type``; None when nothing readable was saved.
        """
        ...

    def close(self) -> None:
        """Let go of any connection or file it holds (it may be used again after)."""
        ...


class BackendBase:
    """Defaults for a backend that keeps its index inside the index folder and holds
    no connection (not part of the protocol)."""

    def check_target(self, fingerprint: dict[str, Any]) -> None:
        return None

    def close(self) -> None:
        return None
