"""Database-side augmentation (DBA): every indexed vector ``x`` gets an augmented
twin ``L2(x + sum_i max(s_i, 0)**alpha * x_i)`` over its ``depth`` nearest other
indexed vectors ``x_i`` (similarities ``s_i``). Images of one object or category
pull together, which is what makes query expansion pay (see :mod:`.rerank`).

The augmented vectors are derived data, like the saved Faiss index: computed
through any :class:`~cbir_cli.search.protocol.SearchBackend` (its neighbours are
the backend's, exact or approximate), kept next to the saved index
(``index/dba.npy`` memory-mapped, each row's neighbour list in
``index/dba-neighbours.npy``, described by ``index/dba.json``) and rebuilt when
stale. The shards stay the source of truth. When images are added or removed,
only the rows whose neighbour lists change are recomputed (the new images', the
rows that lost a neighbour, and the rows a new image enters).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CbirError, CorruptStoreError
from ..fsutil import (
    TMP_MARK,
    atomic_write_bytes,
    atomic_write_json,
    bytes_sha256,
    file_sha256,
    fsync_dir,
    read_json_meta,
)
from ..store.manifest import INDEX_DIR
from ..store.verdicts import file_stamp, verify_file

if TYPE_CHECKING:
    import numpy as np

    from ..store.feature_store import FeatureStore
    from .protocol import SearchBackend

DBA_VECTORS = "dba.npy"
DBA_NEIGHBOURS = "dba-neighbours.npy"
DBA_META = "dba.json"
# Rows per step when computing: bounds the memory of one step (vectors, neighbours).
CHUNK = 4096
# Above this share of changed rows an update recomputes everything.
INCREMENTAL_MAX_SHARE = 0.5
# Queries per backend search when finding neighbours: a compressed index re-ranks
# the union of a batch's shortlists exactly, so big batches multiply the work
# (4096 queries through IVF-PQ at 5k vectors: 12 s; batches of 32: see bench/rerank.py).
SEARCH_BATCH = 32
# Reverse neighbours kept per row (see Augmentation.with_reverse).
REVERSE_WIDTH = 8
DBA_META_KEYS: dict[str, type | tuple[type, ...]] = {
    "generation": int, "count": int, "dim": int, "depth": int, "alpha": (int, float), "sha256": str,
    "neighbours_sha256": str}


@dataclass(frozen=True)
class DbaSettings:
    """``depth`` neighbours per vector (0: no augmentation), weighted by
    ``max(similarity, 0) ** alpha``."""

    depth: int = 3
    alpha: float = 3.0

    def __post_init__(self) -> None:
        if not 0 <= int(self.depth) <= 100:
            raise CbirError(f"the augmentation depth must be between 0 and 100 (got {self.depth})")
        if not 0.0 <= float(self.alpha) <= 16.0:
            raise CbirError(f"alpha must be between 0 and 16 (got {self.alpha})")

    @property
    def enabled(self) -> bool:
        return self.depth > 0


def expand(vectors: np.ndarray, neighbour_vectors: np.ndarray, sims: np.ndarray, alpha: float) -> np.ndarray:
    """``L2(v + sum_i max(s_i, 0)**alpha * n_i)`` for each row: (m, d), (m, n, d), (m, n)
    -> (m, d) float32. The step of both DBA and alpha-query expansion (a padded
    neighbour has similarity -inf: weight 0)."""
    import numpy as np

    weights = np.maximum(np.nan_to_num(sims, neginf=0.0), 0.0) ** alpha
    if alpha == 0:
        weights = np.where(np.isfinite(sims), weights, 0.0)
    out = vectors + np.einsum("mn,mnd->md", weights.astype(np.float32), neighbour_vectors)
    return (out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)).astype(np.float32, copy=False)


def gather(backend: SearchBackend, ids: np.ndarray) -> np.ndarray:
    """Raw vectors of an (m, n) id array (-1: zeros) as (m, n, d)."""
    import numpy as np

    flat = ids.reshape(-1)
    valid = flat >= 0
    found = backend.vectors(flat[valid])
    # found is (0, d) when every id is padding (an index of one image has no neighbours).
    out = np.zeros((flat.size, found.shape[1] if found.ndim == 2 else 0), dtype=np.float32)
    out[valid] = found
    return out.reshape(*ids.shape, -1)


def neighbour_lists(backend: SearchBackend, ids: np.ndarray, vectors: np.ndarray,
                    depth: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's ``depth`` nearest other ids and their similarities (-1 / -inf
    padded): a search for ``depth + 1`` without the row's own id (when a duplicate
    pushed it out, the last result goes instead)."""
    import numpy as np

    parts = [backend.search(vectors[start:start + SEARCH_BATCH], depth + 1)
             for start in range(0, len(ids), SEARCH_BATCH)]
    scores, found = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    own = found == ids[:, None]
    own[~own.any(axis=1), depth] = True
    keep = ~own
    return found[keep].reshape(len(ids), depth), scores[keep].reshape(len(ids), depth)


@dataclass
class Augmentation:
    """The augmented vectors of ``ids`` (sorted), with each row's neighbours."""

    settings: DbaSettings
    ids: np.ndarray  # int64 (n,), increasing
    neighbours: np.ndarray  # int64 (n, depth), -1 padded
    sims: np.ndarray  # float32 (n, depth), -inf padded
    vectors: Any  # float32 (n, d): an array or a read-only memory map
    _reverse: Any = field(default=None, repr=False)  # (n, REVERSE_WIDTH) rows, made on first use

    @property
    def count(self) -> int:
        return len(self.ids)

    def positions(self, ids: np.ndarray) -> np.ndarray:
        """Rows of ``ids`` (-1 for -1 or an unknown id)."""
        import numpy as np

        ids = np.asarray(ids, dtype=np.int64)
        found = np.minimum(np.searchsorted(self.ids, ids), max(0, len(self.ids) - 1))
        ok = (ids >= 0) & (len(self.ids) > 0)
        ok &= self.ids[found] == ids if len(self.ids) else ok
        return np.where(ok, found, -1)

    def with_reverse(self, positions: np.ndarray) -> np.ndarray:
        """``positions`` (m, s) widened by the rows that have them among their
        neighbours (the rows an augmentation pulls towards them; at most
        :data:`REVERSE_WIDTH` per position, the most similar), duplicates -1."""
        import numpy as np

        if self._reverse is None:
            self._reverse = _reverse_table(self.positions(self.neighbours), self.sims, len(self.ids))
        valid = positions >= 0
        extra = np.where(valid[..., None], self._reverse[np.maximum(positions, 0)], -1)
        wide = np.concatenate([positions, extra.reshape(len(positions), -1)], axis=1)
        wide.sort(axis=1)
        wide[:, 1:][wide[:, 1:] == wide[:, :-1]] = -1
        return wide

    def of(self, ids: np.ndarray) -> np.ndarray:
        """Augmented vectors of an id array of any shape (-1: zeros), shape + (d,)."""
        import numpy as np

        rows = self.positions(np.asarray(ids).reshape(-1))
        out = np.zeros((rows.size, self.vectors.shape[1]), dtype=np.float32)
        valid = rows >= 0
        if valid.any():
            order = np.argsort(rows[valid])  # read a memory map forward
            picked = np.asarray(self.vectors[rows[valid][order]], dtype=np.float32)
            out[np.flatnonzero(valid)[order]] = picked
        return out.reshape(*np.shape(ids), -1)


def _reverse_table(neighbour_rows: np.ndarray, sims: np.ndarray, count: int) -> np.ndarray:
    """(count, REVERSE_WIDTH): for each row, the rows listing it as a neighbour, most
    similar first, -1 padded."""
    import numpy as np

    table = np.full((count, REVERSE_WIDTH), -1, dtype=np.int64)
    owners = np.repeat(np.arange(len(neighbour_rows)), neighbour_rows.shape[1])
    targets, weights = neighbour_rows.reshape(-1), sims.reshape(-1)
    keep = targets >= 0
    owners, targets, weights = owners[keep], targets[keep], weights[keep]
    order = np.lexsort((-weights, targets))
    owners, targets = owners[order], targets[order]
    starts = np.searchsorted(targets, targets, side="left")
    rank = np.arange(len(targets)) - starts
    fits = rank < REVERSE_WIDTH
    table[targets[fits], rank[fits]] = owners[fits]
    return table


Allocate = Callable[[tuple[int, int]], Any]


def _in_memory(shape: tuple[int, int]) -> np.ndarray:
    import numpy as np

    return np.empty(shape, dtype=np.float32)


def augment(backend: SearchBackend, ids: np.ndarray, settings: DbaSettings, previous: Augmentation | None = None,
            allocate: Allocate = _in_memory) -> Augmentation:
    """The augmentation of ``ids`` (every id the backend searches, increasing),
    updating ``previous`` where it can (same settings, at most half the rows changed)."""
    import numpy as np

    ids = np.asarray(ids, dtype=np.int64)
    depth = settings.depth
    nbrs = np.full((len(ids), depth), -1, dtype=np.int64)
    sims = np.full((len(ids), depth), -np.inf, dtype=np.float32)
    redo = np.ones(len(ids), dtype=bool)  # rows whose neighbour list is searched afresh
    old_rows = np.full(len(ids), -1, dtype=np.int64)
    if previous is not None and previous.settings == settings and previous.count:
        old_rows = previous.positions(ids)
        kept = old_rows >= 0
        lost = ~np.isin(previous.neighbours[old_rows[kept]], ids) & (previous.neighbours[old_rows[kept]] >= 0)
        redo = ~kept
        redo[np.flatnonzero(kept)[lost.any(axis=1)]] = True
        if redo.mean() > INCREMENTAL_MAX_SHARE:
            redo[:], old_rows[:] = True, -1
        else:
            nbrs[~redo] = previous.neighbours[old_rows[~redo]]
            sims[~redo] = previous.sims[old_rows[~redo]]
    changed = redo.copy()
    new_ids = ids[~np.isin(ids, previous.ids)] if previous is not None and (old_rows >= 0).any() else ids[:0]
    new_vectors = backend.vectors(new_ids) if len(new_ids) else None
    out = allocate((len(ids), _dim(backend, ids)))
    for start in range(0, len(ids), CHUNK):
        rows = np.arange(start, min(len(ids), start + CHUNK))
        vectors = backend.vectors(ids[rows])
        fresh = rows[redo[rows]]
        if len(fresh):
            nbrs[fresh], sims[fresh] = neighbour_lists(backend, ids[fresh], vectors[redo[rows]], depth)
        if new_vectors is not None:
            _merge_new(rows[~redo[rows]], vectors[~redo[rows]], new_ids, new_vectors, nbrs, sims, changed)
        recompute = rows[changed[rows]]
        if len(recompute):
            out[recompute] = expand(vectors[changed[rows]], gather(backend, nbrs[recompute]), sims[recompute],
                                    settings.alpha)
        copy = rows[~changed[rows]]
        if len(copy):
            out[copy] = previous.vectors[old_rows[copy]]  # type: ignore[union-attr]
    return Augmentation(settings, ids, nbrs, sims, out)


def _dim(backend: SearchBackend, ids: np.ndarray) -> int:
    return int(backend.vectors(ids[:1]).shape[1]) if len(ids) else 0


def _merge_new(rows: np.ndarray, vectors: np.ndarray, new_ids: np.ndarray, new_vectors: np.ndarray,
               nbrs: np.ndarray, sims: np.ndarray, changed: np.ndarray) -> None:
    """Let the new images enter the neighbour lists of the kept ``rows`` where they
    are nearer than the current ones; mark the rows whose list changed."""
    import numpy as np

    if not len(rows):
        return
    depth = nbrs.shape[1]
    cand_sims = np.concatenate([sims[rows], vectors @ new_vectors.T], axis=1)
    cand_ids = np.concatenate([nbrs[rows], np.broadcast_to(new_ids, (len(rows), len(new_ids)))], axis=1)
    order = np.argsort(-cand_sims, axis=1, kind="stable")[:, :depth]
    top_ids = np.take_along_axis(cand_ids, order, axis=1)
    changed[rows] |= (top_ids != nbrs[rows]).any(axis=1)
    nbrs[rows], sims[rows] = top_ids, np.take_along_axis(cand_sims, order, axis=1)


# ---------------------------------------------------------------------------
# Persistence next to the saved search index.


def dba_paths(store: FeatureStore) -> tuple[Path, Path, Path]:
    folder = store.root / INDEX_DIR
    return folder / DBA_VECTORS, folder / DBA_NEIGHBOURS, folder / DBA_META


def read_dba_meta(store: FeatureStore) -> dict[str, Any] | None:
    """The saved augmentation's meta, None when there is none; CorruptStoreError
    naming the file when it is not a JSON object with the keys and types it must have."""
    meta_file = dba_paths(store)[2]
    meta = read_json_meta(meta_file)
    if meta is None:
        return None
    if not isinstance(meta, dict) or any(not isinstance(meta.get(k), t) or isinstance(meta.get(k), bool)
                                         for k, t in DBA_META_KEYS.items()):
        raise CorruptStoreError(f"{meta_file}: not a DBA description (damaged)")
    try:
        DbaSettings(meta["depth"], meta["alpha"])
    except CbirError:
        raise CorruptStoreError(f"{meta_file}: not a DBA description (damaged)") from None
    return meta


def augmentation_intact(store: FeatureStore) -> bool:
    """Whether the saved augmentation's files still have the checksums its meta
    recorded (what a writer checks before it keeps or updates them)."""
    meta = read_dba_meta(store)
    vectors_file, neighbours_file, meta_file = dba_paths(store)
    try:
        return meta is not None and bool(verify_file(vectors_file, meta["sha256"], meta_file.name)) and \
            bool(verify_file(neighbours_file, meta["neighbours_sha256"], meta_file.name))
    except CorruptStoreError:
        return False


def saved_settings(store: FeatureStore) -> DbaSettings | None:
    """The settings the saved augmentation (current or not) was made with."""
    meta = read_dba_meta(store)
    if meta is None:
        return None
    return DbaSettings(meta["depth"], float(meta["alpha"]))


def file_allocator(store: FeatureStore) -> tuple[Allocate, Callable[[], Path | None]]:
    """An allocator that writes the augmented vectors into a temporary ``.npy`` in
    the index folder (a memory map: a large index never sits in RAM), and a function
    returning that file."""
    import numpy as np

    vectors_file, _, _ = dba_paths(store)
    tmp = vectors_file.with_name(f".{vectors_file.name}{TMP_MARK}{os.getpid()}")
    made: list[Path] = []

    def allocate(shape: tuple[int, int]) -> Any:
        tmp.parent.mkdir(parents=True, exist_ok=True)
        made.append(tmp)
        return np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape)

    return allocate, lambda: made[0] if made else None


def save_augmentation(store: FeatureStore, augmentation: Augmentation, tmp_vectors: Path | None) -> None:
    """Commit the augmentation for the store's current generation: the vectors file
    (written by :func:`file_allocator`), the neighbour lists, then the meta."""
    import io

    import numpy as np

    vectors_file, neighbours_file, meta_file = dba_paths(store)
    vectors_file.parent.mkdir(parents=True, exist_ok=True)
    if tmp_vectors is None:
        buffer = io.BytesIO()
        np.save(buffer, np.ascontiguousarray(augmentation.vectors, dtype=np.float32), allow_pickle=False)
        atomic_write_bytes(vectors_file, buffer.getvalue())
    else:
        augmentation.vectors.flush()
        with open(tmp_vectors, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_vectors, vectors_file)
        fsync_dir(vectors_file.parent)
    table = np.concatenate([augmentation.ids[:, None], augmentation.neighbours,
                            augmentation.sims.astype(np.float64).view(np.int64)], axis=1)
    buffer = io.BytesIO()
    np.save(buffer, table, allow_pickle=False)
    atomic_write_bytes(neighbours_file, buffer.getvalue())
    atomic_write_json(meta_file, {
        "generation": store.generation, "count": augmentation.count, "dim": store.dim,
        "depth": augmentation.settings.depth, "alpha": augmentation.settings.alpha,
        "sha256": file_sha256(vectors_file), "neighbours_sha256": file_sha256(neighbours_file)})


def load_augmentation(store: FeatureStore, settings: DbaSettings | None = None,
                      any_generation: bool = False) -> Augmentation | None:
    """The saved augmentation if it is current (the store's generation, and
    ``settings`` when given), else None; ``any_generation``: also a stale one (the
    starting point of an update). Sizes and both files' checksums are checked: the
    memory-mapped vectors' once per change of the file
    (:func:`~cbir_cli.store.verdicts.verify_file`), not per open."""
    import io

    import numpy as np

    meta = read_dba_meta(store)
    if meta is None or (meta.get("generation") != store.generation and not any_generation):
        return None
    saved = DbaSettings(meta["depth"], float(meta["alpha"]))
    if settings is not None and saved != settings:
        return None
    vectors_file, neighbours_file, meta_file = dba_paths(store)
    arrays = []
    for path in (vectors_file, neighbours_file):
        try:
            if path == vectors_file:
                verified = verify_file(path, meta["sha256"], meta_file.name)
                arrays.append(np.load(path, mmap_mode="r"))
                if file_stamp(path) != verified:  # replaced between the check and the mapping
                    raise CorruptStoreError(f"{path}: changed while it was opened")
                continue
            data = path.read_bytes()
            if bytes_sha256(data) != meta["neighbours_sha256"]:
                raise CorruptStoreError(f"{path}: checksum mismatch (damaged, or {meta_file.name} is)")
            arrays.append(np.load(io.BytesIO(data)))
        except CorruptStoreError:
            raise
        except Exception as exc:  # noqa: BLE001 - numpy's header parser raises EOFError, SyntaxError...
            raise CorruptStoreError(f"{path}: damaged ({exc or type(exc).__name__})") from None
    vectors, table = arrays
    count, depth = int(meta.get("count", -1)), saved.depth
    if vectors.shape != (count, store.dim) or vectors.dtype != np.float32:
        raise CorruptStoreError(f"{vectors_file}: holds {vectors.shape} {vectors.dtype}, {meta_file.name} says "
                                f"{count} x {store.dim} float32")
    if table.shape != (count, 1 + 2 * depth) or table.dtype != np.int64:
        raise CorruptStoreError(f"{neighbours_file}: holds {table.shape} {table.dtype}, {meta_file.name} says "
                                f"{count} x {1 + 2 * depth} int64")
    return Augmentation(saved, table[:, 0].copy(), table[:, 1:1 + depth].copy(),
                        table[:, 1 + depth:].copy().view(np.float64).astype(np.float32), vectors)


def check_augmentation(store: FeatureStore, live_ids: np.ndarray) -> tuple[str, list[str]]:
    """(current | stale | missing, problems) of the saved augmentation."""
    import numpy as np

    try:
        meta = read_dba_meta(store)
        if meta is None:
            return "missing", []
        if meta.get("generation") != store.generation:
            return "stale", []
        augmentation = load_augmentation(store)
    except CorruptStoreError as exc:
        return "current", [exc.message]
    vectors_file, neighbours_file, meta_file = dba_paths(store)
    files = ((vectors_file, "sha256"), (neighbours_file, "neighbours_sha256"))
    problems = [f"{path}: checksum mismatch (damaged, or {meta_file.name} is)" for path, key in files
                if file_sha256(path) != meta.get(key)]
    if augmentation is not None and not np.array_equal(augmentation.ids, live_ids):
        problems.append(f"{vectors_file}: augments other images than the store holds")
    return "current", problems
