"""Segments of a saved IVF index: what was added since it was last built whole.

An IVF index labelled with row ids (:mod:`.saved_index`) grows by appending. The
vectors of the shards a commit added are encoded with the index's trained coarse
quantizer and codebooks -- kept beside it as an empty *template*,
``trained-<generation>.faiss``, O(lists x dim) bytes, not O(vectors) -- into a
small index of their own, ``segment-<generation>.faiss``, which the meta names
with the shards it holds. A reader searches the base and its segments as one
(``faiss.IndexShards``: each holds other rows, all share one quantizer, so each
probes the same lists and the merged shortlist is the one a single index would
give, up to ties). So a writer's upkeep costs what was added, never a read or a
rewrite of the base: at 10M x 32-d the base is 154 MB.

This is Lucene's design: immutable segment files named by the commit point (the
meta, ``index.json``, written last), merged by size tiers. After a new segment is
added, trailing segments are merged while the older is at most
:data:`TIER_RATIO` times the newer (sizes then fall geometrically: about
log2(segment rows / run rows) segments, each row re-encoded about as many times).
A merge re-encodes the live rows of the merged segments' shards (verified as they
are read; removed rows drop out). faiss's own ``merge_from`` is not used: on
fast-scan lists it writes past the end of a list whose length is a non-zero
multiple of the block size in bytes (faiss 1.15 ``BlockInvertedLists::add_entries``;
seen as heap corruption at 1M rows). Once the segments hold more than
:data:`MERGE_FRACTION` of the base's rows, the index is built whole again (and
retrained): O(N), once per ``MERGE_FRACTION * N`` rows added.

File names in a meta are checked against :data:`SEGMENT_NAME` before use (a meta
is data read from disk: it must not name a path outside the index folder).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CorruptStoreError
from ..fsutil import atomic_write_bytes, bytes_sha256
from ..store.verdicts import file_stamp, verify_file

if TYPE_CHECKING:
    import faiss

# Build the index whole again once the segments hold this share of the base's
# rows (each segment is searched on its own: more of them cost query time).
MERGE_FRACTION = 0.1
# Merge a segment into the newer one after it while it holds at most this many
# times its rows (2: a binary counter's tiers).
TIER_RATIO = 2
SEGMENT_NAME = re.compile(r"(segment|trained)-[0-9]{1,20}\.faiss")


def segment_entry_ok(entry: Any) -> bool:
    """A meta's ``[file name, sha256, rows, [shard names]]`` of one segment (or,
    with the name and checksum only, of the template)."""
    if not (isinstance(entry, list) and len(entry) in (2, 4) and isinstance(entry[0], str)
            and SEGMENT_NAME.fullmatch(entry[0]) is not None and isinstance(entry[1], str)):
        return False
    return len(entry) == 2 or (isinstance(entry[2], int) and not isinstance(entry[2], bool) and entry[2] >= 0
                               and isinstance(entry[3], list) and all(isinstance(n, str) for n in entry[3]))


def _write(folder: Path, name: str, index: faiss.Index) -> list[Any]:
    import faiss

    data = faiss.serialize_index(index).tobytes()
    atomic_write_bytes(folder / name, data)
    return [name, bytes_sha256(data)]


def read_index_file(path: Path, sha256: str, described_by: str, rehash: bool = False) -> faiss.Index:
    """A saved Faiss file (the base, a segment, the template), checked against the
    ``sha256`` its meta ``described_by`` records: once per change of the file
    (:func:`~cbir_cli.store.verdicts.verify_file`), ``rehash`` (``cbir check``): now.
    A damaged or unreadable one raises :class:`CorruptStoreError`: never served."""
    import faiss
    import numpy as np

    stamp = None if rehash else verify_file(path, sha256, described_by)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CorruptStoreError(f"{path}: unreadable ({exc.strerror or exc})") from None
    if stamp is None and bytes_sha256(data) != sha256:
        raise CorruptStoreError(f"{path}: checksum mismatch (damaged, or {described_by} is)")
    if stamp is not None and file_stamp(path) != stamp:  # replaced between the check and the read
        raise CorruptStoreError(f"{path}: changed while it was read")
    return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))


def save_template(folder: Path, index: faiss.Index, generation: int) -> list[Any]:
    """Write the trained, empty copy of the IVF ``index`` that segments are encoded
    with; returns its meta entry ``[name, sha256]``."""
    import faiss

    template = faiss.clone_index(index)
    template.reset()
    return _write(folder, f"trained-{generation}.faiss", template)


def new_segment(folder: Path, template_entry: list[Any], described_by: str) -> faiss.Index:
    """An empty index trained as the base was (read from its template)."""
    template = read_index_file(folder / template_entry[0], template_entry[1], described_by)
    if template.ntotal:
        raise CorruptStoreError(f"{folder / template_entry[0]}: a template holds no vectors")
    return template


def write_segment(folder: Path, index: faiss.Index, generation: int, shards: list[str]) -> list[Any]:
    """Write a segment holding the live rows of ``shards``; returns its meta entry."""
    return [*_write(folder, f"segment-{generation}.faiss", index), int(index.ntotal), shards]


def with_segments(base: faiss.Index, folder: Path, segments: list[list[Any]], described_by: str,
                  rehash: bool = False) -> faiss.Index:
    """``base`` searched together with its segments (itself when there are none)."""
    import faiss

    if not segments:
        return base
    together = faiss.IndexShards(base.d, False, False)  # labels are row ids: kept as they are
    together.add_shard(base)  # faiss's Python wrapper keeps a reference to each
    for entry in segments:
        segment = read_index_file(folder / entry[0], entry[1], described_by, rehash)
        if segment.ntotal != entry[2] or segment.d != base.d:
            raise CorruptStoreError(f"{folder / entry[0]}: holds {segment.ntotal} vectors of dim {segment.d}, "
                                    f"{described_by} says {entry[2]} of dim {base.d}")
        together.add_shard(segment)
    return together


def base_of(index: faiss.Index) -> faiss.Index:
    """The base of an index searched with its segments (:func:`with_segments`)."""
    import faiss

    downcast = faiss.downcast_index(index)
    return faiss.downcast_index(downcast.at(0)) if isinstance(downcast, faiss.IndexShards) else index


def tail_to_merge(segments: list[list[Any]], new_rows: int) -> int:
    """How many of the last ``segments`` to merge with a new one of ``new_rows``
    (the size tiers of the module docstring)."""
    merged, rows = 0, new_rows
    while merged < len(segments) and segments[-1 - merged][2] <= TIER_RATIO * rows:
        rows += segments[-1 - merged][2]
        merged += 1
    return merged


def rebuild_due(base_rows: int, segments: list[list[Any]]) -> bool:
    """Whether the segments hold enough rows that the index is built whole again."""
    return sum(entry[2] for entry in segments) > MERGE_FRACTION * base_rows


def remove_unnamed(folder: Path, meta: dict[str, Any]) -> None:
    """Delete segment and template files the meta no longer names (merged or
    retrained away; a crash may leave some: the next write deletes them)."""
    named = {entry[0] for entry in meta.get("segments", [])}
    if isinstance(meta.get("template"), list):
        named.add(meta["template"][0])
    for path in folder.glob("*.faiss"):
        if SEGMENT_NAME.fullmatch(path.name) and path.name not in named:
            try:
                path.unlink()
            except OSError:
                pass  # deleted next time
