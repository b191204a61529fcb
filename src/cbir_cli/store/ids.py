"""Row ids are never reused: ``next_id`` stays above every id a stored row has,
tombstoned rows included (a removed image's id may still be in a client's hands:
a bookmarked ``/api/images/<id>``, a ``--id`` in a script).

A manifest whose ``next_id`` was lowered (a hand edit, another tool) is still
well-formed, so nothing else catches it: a writer would hand out ids that rows
already have and queries would return one image for another. So every writer
raises it before giving out ids (:meth:`FeatureStore.ensure_next_id`: from the
``max_id`` each shard entry records, reading the rows files of the shards whose
key is missing or not below ``next_id``; not every rows file on every run),
``cbir check`` reports it (from the manifest alone where each shard entry records
its ``max_id``, from the rows files otherwise) and ``cbir check --repair`` raises it
(reading every rows file, so a wrong ``max_id`` is corrected too).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .manifest import Row

RowsOf = Callable[[dict[str, Any]], Sequence[Row]]


def repaired_ids(manifest: dict[str, Any], rows_of: RowsOf, manifest_path: Path,
                 suspects_only: bool = False) -> tuple[dict[str, Any], str | None]:
    """``manifest`` with ``next_id`` raised to 1 + the highest id of any row its shards
    hold (removed ones included) where it is not above it, and each shard's recorded
    ``max_id`` set to its rows' where it differs; and one line saying what was
    repaired (None, and the same manifest, when nothing was). Reads each shard's rows
    (``rows_of``: checked against the manifest's checksum); ``suspects_only`` (a
    writer's check before giving out ids, which must not cost O(rows in the store))
    reads only those of shards whose recorded ``max_id`` is missing or not below
    ``next_id``, and trusts the others' (``cbir check`` reads them all)."""
    shards, notes, highest = [], [], -1
    for shard in manifest["shards"]:
        if suspects_only and shard.get("max_id", manifest["next_id"]) < manifest["next_id"]:
            highest = max(highest, shard["max_id"])
            shards.append(shard)
            continue
        top = max(r.id for r in rows_of(shard))
        highest = max(highest, top)
        if shard.get("max_id", top) != top:
            notes.append(f"{manifest_path}: shard {shard['name']} recorded max_id {shard['max_id']}, "
                         f"its rows' highest id is {top}; corrected")
            shard = {**shard, "max_id": top}
        shards.append(shard)
    if manifest["next_id"] <= highest:
        notes.insert(0, lowered_next_id(manifest_path, manifest["next_id"], highest, raised_to=highest + 1))
    if not notes:
        return manifest, None
    return {**manifest, "shards": shards, "next_id": max(manifest["next_id"], highest + 1)}, "; ".join(notes)


def lowered_next_id(manifest_path: Path, next_id: int, highest: int, raised_to: int | None = None) -> str:
    """The one line that says a manifest's ``next_id`` would reuse ids (or did:
    ``raised_to``, what a writer or a repair set it to)."""
    if raised_to is not None:
        return f"{manifest_path}: next_id {next_id} was not above the stored id {highest}; raised it to {raised_to}"
    return (f"{manifest_path}: next_id {next_id} is not above the stored id {highest} "
            "(new images would reuse the ids of others)")


def recorded_next_id_problem(manifest: dict[str, Any], manifest_path: Path) -> str | None:
    """:func:`lowered_next_id` from the manifest alone: the ``max_id`` its shard
    entries record (entries written before that key existed are not counted)."""
    highest = max((s["max_id"] for s in manifest["shards"] if "max_id" in s), default=-1)
    return lowered_next_id(manifest_path, manifest["next_id"], highest) if highest >= manifest["next_id"] else None
