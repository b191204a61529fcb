"""Bringing a store's saved Faiss index up to date with what changed, instead of
building it again from every shard.

What the saved index holds is in its meta (:mod:`.saved_index`): the shards it
covers with their tombstones. Against the store's manifest that gives the rows
removed since (tombstoned, or in shards dropped) and the shards added since
(always appended: shards are immutable and new ones come last). Then:

* removed rows leave the index: a flat index drops their positions (the rest keep
  their order, so it equals a fresh build exactly); in an IVF index their ids
  (its labels are row ids) become tombstones, counted in its meta, that searches
  skip (they map to no live row): faiss 1.15's ``remove_ids`` on a fast-scan
  (PQ4) index corrupts codes added after it (measured: self-recall of the added
  rows fell to 0.74), so nothing is removed from it in place; once tombstones
  pass :data:`MAX_TOMBSTONES` of its entries it is rebuilt; HNSW cannot remove,
  so it is rebuilt;
* added shards are read in full, each verified against its checksum as it is read
  (only these: ``cbir check`` still verifies everything), and their live rows are
  added to the trained index;
* an IVF index saved with its template (every one saved since) is not read at
  all: the added rows go into a new segment file and removed rows become
  tombstones, counted, never looked up (:mod:`.index_segments`); the work is
  what changed, until a merge of the segments into the base is due;
* an IVF index is retrained (rebuilt) once the collection has grown past
  :data:`RETRAIN_GROWTH` times the count it was trained at: its centroids and codes
  were fitted to a sample that no longer represents it (and ``ivf_lists`` would
  pick more lists by then).

Anything this cannot account for (an index from an older version, shards not
appended, a tombstone that came back, another index kind due) returns None: the
caller rebuilds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..store.feature_store import FeatureStore
from ..store.shard_format import to_float32
from ..store.vectors import ShardVectors, row_table
from .faiss_index import add_rows, resolve_index_type
from .index_segments import new_segment, rebuild_due, tail_to_merge, write_segment
from .saved_index import (
    INDEX_META,
    index_paths,
    read_saved_index,
    save_index,
    save_segments,
    saved_index_intact,
    store_coverage,
)

if TYPE_CHECKING:
    import faiss
    import numpy as np

# Retrain an IVF index when the collection holds more than this many times the
# vectors it was trained on (4x: about 2x the ideal list count, ~sqrt(n)).
RETRAIN_GROWTH = 4
# Rebuild an IVF index whose tombstones (removed rows it still holds) pass this
# fraction of its entries: each one is a wasted slot of a query's shortlist.
MAX_TOMBSTONES = 0.1


def _removed_since(meta: dict[str, Any], shards: dict[str, dict[str, Any]]) -> tuple[list[int], list[int]] | None:
    """(positions, ids) in the saved index of rows removed since it was saved, or
    None when a tombstone was lifted (not something a store does)."""
    import numpy as np

    positions: list[np.ndarray] = []
    ids: list[np.ndarray] = []
    base = 0
    for name, rows, first_id, removed in meta["coverage"]:
        old = np.asarray(removed, dtype=np.int64)
        live = np.setdiff1d(np.arange(rows), old)
        shard = shards.get(name)
        now = np.arange(rows) if shard is None else np.asarray(shard["removed"], dtype=np.int64)
        if shard is not None and (shard["rows"] != rows or not np.isin(old, now).all()):
            return None
        gone = np.setdiff1d(now, old)
        positions.append(base + np.searchsorted(live, gone))
        ids.append(first_id + gone)
        base += len(live)
    if not positions:
        return [], []
    return np.concatenate(positions).tolist(), np.concatenate(ids).tolist()


def _added_shards(meta: dict[str, Any], store: FeatureStore) -> list[dict[str, Any]] | None:
    """The store's shards the saved index does not cover, if they all come after
    the ones it does (else None)."""
    covered = {entry[0] for entry in meta["coverage"]}
    names = [shard["name"] for shard in store.manifest["shards"]]
    first_new = next((i for i, name in enumerate(names) if name not in covered), len(names))
    if any(name not in covered for name in names[:first_new]) or any(name in covered for name in names[first_new:]):
        return None
    return store.manifest["shards"][first_new:]


def _read_new_shard(store: FeatureStore, shard: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, int] | None:
    """(float32 live vectors, their row ids, first id) of an added shard, read in
    full and verified against its checksums; None if its ids are not consecutive."""
    import numpy as np

    rows = store.shard_rows(shard, cache=False)
    first_id = rows[0].id
    if rows[-1].id - first_id != len(rows) - 1:
        return None
    vectors = store.read_shard(shard, mmap=False)  # verified: never index damaged data
    live = np.setdiff1d(np.arange(shard["rows"]), np.asarray(shard["removed"], dtype=np.int64))
    return to_float32(vectors[live]), first_id + live, first_id


def _coverage_entry(shard: dict[str, Any], first_id: int, id_labels: bool) -> list[Any]:
    # An index labelled by ids needs no removed rows: a removed row's id is no live
    # row's, so searches skip it wherever it is (and the list would grow with the store).
    return [shard["name"], int(shard["rows"]), int(first_id),
            [] if id_labels else sorted(int(r) for r in shard["removed"])]


def _append_segment(store: FeatureStore, meta: dict[str, Any], index_type: str,
                    trained: int) -> tuple[faiss.Index | None, bool, int] | None:
    """An IVF index labelled by ids, with a template: the added shards' rows go into
    a new segment (merged with the trailing ones of its size tier:
    :mod:`.index_segments`), removed rows become tombstones, and nothing of the base
    is read. Costs what changed; None when the index is to be built whole again."""
    import numpy as np

    added = _added_shards(meta, store)
    # Each file is hashed once per change of it (a stat otherwise): a damaged base,
    # segment or template is rebuilt, never built on.
    if added is None or not saved_index_intact(store, meta):
        return None
    by_name = {shard["name"]: shard for shard in store.manifest["shards"]}
    segments = list(meta["segments"])
    base_rows = int(meta["count"]) - sum(entry[2] for entry in segments)
    names = [shard["name"] for shard in added]
    if added:
        tail = tail_to_merge(segments, sum(s["rows"] - len(s["removed"]) for s in added))
        names = [n for entry in segments[len(segments) - tail:] for n in entry[3] if n in by_name] + names
        segments = segments[:len(segments) - tail]
    parts = [_read_new_shard(store, by_name[name]) for name in names]
    if any(part is None for part in parts):
        return None
    rows = sum(len(part[0]) for part in parts)  # type: ignore[index]
    entries = base_rows + sum(entry[2] for entry in segments) + rows
    tombstones = entries - store.count
    if tombstones < 0:
        return None  # rows came back: not something a store does
    if tombstones > MAX_TOMBSTONES * entries or rebuild_due(base_rows, [*segments, [None, None, rows]]):
        return _compact(store, meta, index_type, trained)
    coverage = [entry for entry in meta["coverage"] if entry[0] in by_name]
    coverage += [_coverage_entry(shard, part[2], True) for shard, part in zip(added, parts[-len(added):])]  # type: ignore[index]
    if names:
        folder = index_paths(store)[0].parent
        segment = new_segment(folder, meta["template"], INDEX_META)
        # One add: each add to a fast-scan IVF index costs O(lists) besides its rows.
        vectors = np.concatenate([part[0] for part in parts])  # type: ignore[index]
        add_rows(segment, vectors, np.arange(len(vectors)), np.concatenate([part[1] for part in parts]),  # type: ignore[index]
                 chunk=max(1, len(vectors)))
        segments.append(write_segment(folder, segment, store.generation, names))
    save_segments(store, meta, segments, coverage, tombstones)
    return None, True, tombstones


def _compact(store: FeatureStore, meta: dict[str, Any], index_type: str,
             trained: int) -> tuple[faiss.Index, bool, int]:
    """The index built whole from the store's live rows with the training it has
    (its template: no k-means), saved without segments or tombstones."""
    import numpy as np

    index = new_segment(index_paths(store)[0].parent, meta["template"], INDEX_META)
    vectors = ShardVectors(store, verified=True)
    add_rows(index, vectors, np.arange(len(vectors)), row_table(store).ids)
    coverage = [[name, rows, first_id, []] for name, rows, first_id, _ in store_coverage(store)]
    save_index(store, index, index_type, coverage, trained, True, 0)
    return index, True, 0


def update_saved_index(store: FeatureStore, meta: dict[str, Any],
                       index_type: str) -> tuple[faiss.Index | None, bool, int] | None:
    """The saved index (described by ``meta``, of ``index_type``) brought up to
    ``store``'s live rows and saved, with whether its labels are row ids and its
    tombstones; None when it must be rebuilt instead (see the module docstring).
    The index is None when it was not read (a new segment: :func:`_append_segment`)."""
    import faiss
    import numpy as np

    if "coverage" not in meta or meta.get("labels") not in ("ids", "positions"):
        return None  # saved by an older version
    kind = resolve_index_type(index_type, int(meta["count"]))
    if resolve_index_type(index_type, store.count) != kind:
        return None
    id_labels = meta["labels"] == "ids"
    trained = int(meta.get("trained_count", meta["count"]))
    if id_labels and store.count > RETRAIN_GROWTH * trained:
        return None
    if id_labels and "template" in meta and "segments" in meta:
        return _append_segment(store, meta, index_type, trained)
    by_name = {s["name"]: s for s in store.manifest["shards"]}
    removed = _removed_since(meta, by_name)
    added = _added_shards(meta, store)
    if removed is None or added is None or (kind == "hnsw" and removed[0]):
        return None
    new = [_read_new_shard(store, shard) for shard in added]
    if any(part is None for part in new):
        return None
    index = read_saved_index(store, meta)
    positions, ids = removed
    tombstones = int(meta.get("tombstones", 0))
    if id_labels:
        tombstones += len(ids)
    elif positions:
        index.remove_ids(faiss.IDSelectorBatch(np.asarray(positions, dtype=np.int64)))
    coverage = [[name, rows, first_id, sorted(int(r) for r in by_name[name]["removed"])]
                for name, rows, first_id, _ in meta["coverage"] if name in by_name]
    for shard, part in zip(added, new):
        vectors, row_ids, first_id = part  # type: ignore[misc]
        add_rows(index, vectors, np.arange(len(vectors)), row_ids if id_labels else None)
        coverage.append(_coverage_entry(shard, first_id, False))
    if index.ntotal - tombstones != store.count or tombstones > MAX_TOMBSTONES * index.ntotal:
        return None
    save_index(store, index, index_type, coverage, trained, id_labels, tombstones)
    return index, id_labels, tombstones
