"""A store's saved Faiss index: ``index/index.faiss`` and its meta ``index.json``.

The meta records the store generation the index is current for, its checksum, and
what it holds, so that the next writer can bring it up to date instead of
building it again (:mod:`.index_upkeep`):

* ``labels``: ``"positions"`` (flat, HNSW: label i is the i-th live row) or
  ``"ids"`` (IVF: labels are the rows' ids, which never change, so rows can be
  removed and added without renumbering the others);
* ``coverage``: per shard it holds, ``[name, rows, first_id, removed]`` (a shard's
  rows have consecutive ids from ``first_id``);
* ``trained_count``: how many vectors an IVF index was trained on;
* ``tombstones``: how many of an IVF index's entries are removed rows (their ids
  are no live row's: searches skip them);
* ``template`` and ``segments`` (an IVF index): its trained, empty copy and the
  segments added since the file was last written whole, merged in as it is read
  (:mod:`.index_segments`); ``sha256`` is the base file's, ``count`` counts all.

Older metas lack them; such an index is rebuilt once by its next writer.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CorruptStoreError
from ..fsutil import atomic_write_bytes, atomic_write_json, bytes_sha256, read_json_meta
from ..store.feature_store import FeatureStore
from ..store.manifest import INDEX_DIR, is_int
from ..store.vectors import ShardVectors, row_table
from ..store.verdicts import verify_file
from .faiss_index import INDEX_TYPES, build_index, factory_string, needs_rerank, resolve_index_type
from .index_segments import read_index_file, remove_unnamed, save_template, segment_entry_ok, with_segments

if TYPE_CHECKING:
    import faiss
    import numpy as np

INDEX_FILE = "index.faiss"
INDEX_META = "index.json"
INDEX_META_KEYS = {"generation": int, "count": int, "index_type": str, "sha256": str, "dim": int}
# Written since incremental upkeep (absent in older metas: such an index is rebuilt once).
OPTIONAL_INDEX_META_KEYS = {"trained_count": int, "tombstones": int, "labels": str, "coverage": list,
                            "segments": list, "template": list}


def _coverage_ok(coverage: list[Any]) -> bool:
    """Each entry: [shard name, rows, first row id, removed row numbers]."""
    return all(isinstance(e, list) and len(e) == 4 and isinstance(e[0], str) and is_int(e[1]) and is_int(e[2])
               and isinstance(e[3], list) and all(is_int(r) and 0 <= r < e[1] for r in e[3]) for e in coverage)


def meta_problem(meta: Any) -> bool:
    """Whether a parsed index meta lacks a key, or has a value of the wrong type or
    shape, that a reader or the upkeep uses (it is then damaged: rebuilt, never used)."""
    if not isinstance(meta, dict) or any(not isinstance(meta.get(k), t) or isinstance(meta.get(k), bool)
                                         for k, t in INDEX_META_KEYS.items()):
        return True
    if meta["index_type"] not in INDEX_TYPES:
        return True
    for key, kind in OPTIONAL_INDEX_META_KEYS.items():
        value = meta.get(key)
        if key in meta and (not isinstance(value, kind) or isinstance(value, bool) or
                            (kind is int and value < 0)):
            return True
    if "segments" in meta and not all(segment_entry_ok(e) and len(e) == 4 for e in meta["segments"]):
        return True
    if "template" in meta and not (segment_entry_ok(meta["template"]) and len(meta["template"]) == 2):
        return True
    return "coverage" in meta and not _coverage_ok(meta["coverage"])


def index_paths(store: FeatureStore) -> tuple[Path, Path]:
    folder = store.root / INDEX_DIR
    return folder / INDEX_FILE, folder / INDEX_META


def store_coverage(store: FeatureStore) -> list[list[Any]]:
    """``[name, rows, first_id, removed]`` of each shard of ``store``, in order: what
    an index built from its live rows holds (ids from its row table)."""
    import numpy as np

    ids = row_table(store).ids
    coverage, start = [], 0
    for shard in store.manifest["shards"]:
        removed = sorted(int(r) for r in shard["removed"])
        first_live = int(np.setdiff1d(np.arange(min(shard["rows"], len(removed) + 1)), removed)[0])
        coverage.append([shard["name"], int(shard["rows"]), int(ids[start]) - first_live, removed])
        start += shard["rows"] - len(removed)
    return coverage


def save_index(store: FeatureStore, index: faiss.Index, index_type: str, coverage: list[list[Any]] | None = None,
               trained_count: int | None = None, id_labels: bool = False, tombstones: int = 0) -> None:
    """Save ``index`` whole (a new base, no segments) as current for ``store``'s
    generation; ``coverage`` (default: every shard, see :func:`store_coverage`) and
    ``trained_count`` describe it for the next writer's upkeep. An index labelled
    with ids also gets its template, which later upkeeps encode segments with."""
    import faiss

    data = faiss.serialize_index(index).tobytes()
    index_file, meta_file = index_paths(store)
    index_file.parent.mkdir(parents=True, exist_ok=True)
    # Index (and template) first, then the meta: a meta always describes complete files.
    atomic_write_bytes(index_file, data)
    meta = {"generation": store.generation, "count": int(index.ntotal), "index_type": index_type,
            "factory": factory_string(index_type, int(index.ntotal), store.dim),
            "sha256": bytes_sha256(data), "dim": store.dim, "labels": "ids" if id_labels else "positions",
            "trained_count": int(trained_count if trained_count is not None else index.ntotal),
            "tombstones": tombstones, "coverage": coverage if coverage is not None else store_coverage(store)}
    if id_labels:
        meta |= {"template": save_template(index_file.parent, index, store.generation), "segments": []}
    atomic_write_json(meta_file, meta)
    remove_unnamed(index_file.parent, meta)


def save_segments(store: FeatureStore, meta: dict[str, Any], segments: list[list[Any]], coverage: list[list[Any]],
                  tombstones: int) -> dict[str, Any]:
    """Make ``segments`` (the files written) the saved index's, now current for
    ``store``'s generation with ``coverage`` and ``tombstones``; segment files no
    longer named are deleted. Returns the new meta."""
    base_rows = int(meta["count"]) - sum(entry[2] for entry in meta.get("segments", []))
    new = {**meta, "generation": store.generation, "count": base_rows + sum(entry[2] for entry in segments),
           "tombstones": tombstones, "coverage": coverage, "segments": segments}
    atomic_write_json(index_paths(store)[1], new)
    remove_unnamed(index_paths(store)[0].parent, new)
    return new


def read_index_meta(store: FeatureStore) -> dict[str, Any] | None:
    """The saved index's meta, None when there is none; CorruptStoreError naming the
    file when it is not a JSON object with the keys and types it must have."""
    meta_file = index_paths(store)[1]
    meta = read_json_meta(meta_file)
    if meta is None:
        return None
    if meta_problem(meta):
        raise CorruptStoreError(f"{meta_file}: not a search index description (damaged)")
    return meta


def saved_index_intact(store: FeatureStore, meta: dict[str, Any]) -> bool:
    """Whether the saved index file, its segments and template still have the
    checksums its meta recorded."""
    index_file, meta_file = index_paths(store)
    named = [(index_file.name, meta["sha256"])] + [(e[0], e[1]) for e in meta.get("segments", [])]
    if "template" in meta:
        named.append((meta["template"][0], meta["template"][1]))
    try:
        return all(verify_file(index_file.parent / name, sha, meta_file.name) for name, sha in named)
    except CorruptStoreError:
        return False


def read_saved_index(store: FeatureStore, meta: dict[str, Any], rehash: bool = False) -> faiss.Index:
    """The saved index file, checked against ``meta``'s checksum (a damaged one raises),
    searched together with its segments (:mod:`.index_segments`).
    The checksum is verified once per change of the file
    (:func:`~cbir_cli.store.verdicts.verify_file`); ``rehash`` (``cbir check``): now."""
    index_file, meta_file = index_paths(store)
    index = read_index_file(index_file, str(meta.get("sha256")), meta_file.name, rehash)
    return with_segments(index, index_file.parent, meta.get("segments", []), meta_file.name, rehash)


def load_saved(store: FeatureStore,
               rehash: bool = False) -> tuple[faiss.Index, str, bool, int, dict[str, int] | None] | None:
    """The saved index, its kind (flat | hnsw | ivfpq), whether its labels are row
    ids, how many of its entries are tombstones and each shard's first row id
    (:func:`first_ids_of`), if it matches the store's committed state, else None
    (stale or missing). A damaged index file raises: it is never served
    (``rehash``: see :func:`read_saved_index`)."""
    meta = read_index_meta(store)
    if meta is None or meta.get("generation") != store.generation:
        return None
    index = read_saved_index(store, meta, rehash)
    tombstones = meta.get("tombstones", 0)
    if not isinstance(tombstones, int) or index.ntotal - tombstones != store.count or index.d != store.dim:
        raise CorruptStoreError(f"{index_paths(store)[0]}: holds {index.ntotal} vectors of dim {index.d}, "
                                f"store has {store.count} of dim {store.dim}")
    # The concrete kind (``auto`` and a too-small ``ivfpq`` are really flat, say).
    kind = resolve_index_type(str(meta.get("index_type", "flat")), store.count)
    return index, kind, meta.get("labels") == "ids", tombstones, first_ids_of(meta)


def first_ids_of(meta: dict[str, Any]) -> dict[str, int] | None:
    """Each covered shard's first row id, from the meta's coverage (None without
    one): what lets a reader know the row ids without reading every rows file
    (:class:`~cbir_cli.store.vectors.RowTable`)."""
    coverage = meta.get("coverage")
    if not isinstance(coverage, list):
        return None
    try:
        return {str(name): int(first_id) for name, _, first_id, _ in coverage}
    except (TypeError, ValueError):
        return None


def load_index(store: FeatureStore, rehash: bool = False) -> tuple[faiss.Index, str] | None:
    """:func:`load_saved` without the labels flag."""
    loaded = load_saved(store, rehash)
    return None if loaded is None else (loaded[0], loaded[1])


def build_labelled(store: FeatureStore, index_type: str) -> tuple[faiss.Index, bool]:
    """A new index of the store's live vectors, every shard verified as it is read;
    an IVF one labelled with row ids (see the module docstring). Returns it and
    whether its labels are ids."""
    vectors = ShardVectors(store, verified=True)
    ivf = resolve_index_type(index_type, len(vectors)) == "ivfpq"
    index = build_index(vectors, index_type, labels=row_table(store).ids if ivf else None)
    return index, needs_rerank(index)


def build_store_index(store: FeatureStore, index_type: str = "flat") -> faiss.Index:
    """(Re)build the search index from the store's (memory-mapped) shards and save it."""
    index, id_labels = build_labelled(store, index_type)
    save_index(store, index, index_type, id_labels=id_labels)
    return index


def label_positions(ids: np.ndarray) -> Any:
    """For an index labelled by row ids: a function from labels to positions in the
    sorted live ``ids`` (-1, and a tombstone, gives -1)."""
    import numpy as np

    def positions_of(labels: np.ndarray) -> np.ndarray:
        found = np.minimum(np.searchsorted(ids, labels), len(ids) - 1)
        # A tombstone's id is no live row's: no position.
        return np.where((labels >= 0) & (ids[found] == labels), found, -1)

    return positions_of
