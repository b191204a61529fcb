"""Reading a whole store back and checking that it agrees with its manifest:
shards and rows files present with the recorded sizes and checksums, (rows, dim)
of the store's shard dtype (read back as float32), finite unit-length vectors, ids
unique and below ``next_id`` (:mod:`.ids`: from the manifest's ``max_id`` keys
first, each checked against its rows), live paths unique, the count right. Used
by ``cbir check``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import CorruptStoreError
from .feature_store import FeatureStore
from .ids import lowered_next_id, recorded_next_id_problem
from .manifest import MANIFEST
from .validity import invalid_rows

if TYPE_CHECKING:
    import numpy as np


def shard_problems(store: FeatureStore, problems: list[str]) -> np.ndarray | None:
    """Check every shard and rows file; the live vectors when all could be read."""
    import numpy as np

    manifest = store.manifest
    before = len(problems)
    lowered = recorded_next_id_problem(manifest, store.root / MANIFEST)
    if lowered:
        problems.append(lowered)
    seen_ids: set[int] = set()
    live_paths: dict[str, str] = {}
    parts = []
    for shard in manifest["shards"]:
        name = shard["name"]
        vectors_path, rows_path = store.shard_paths(shard)
        if not name.startswith("shard-") or not name[6:].isdigit() or int(name[6:]) >= manifest["next_shard"]:
            problems.append(f"{vectors_path}: shard name not below next_shard {manifest['next_shard']}")
        missing = store.shard_file_problems(shard)
        if missing:
            problems.extend(missing)
            continue
        try:
            rows = store.shard_rows(shard)
            vectors = store.read_shard(shard, mmap=False)
        except CorruptStoreError as exc:
            problems.append(exc.message)
            continue
        removed = set(shard["removed"])
        highest = max(row.id for row in rows)
        if shard.get("max_id", highest) != highest:
            problems.append(f"{rows_path}: highest id {highest}, the manifest says {shard['max_id']}")
        for i, row in enumerate(rows):
            if row.id in seen_ids or row.id < 0:
                problems.append(f"{rows_path}: id {row.id} repeated or negative")
            seen_ids.add(row.id)
            if i in removed:
                continue
            if row.path in live_paths:
                problems.append(f"{rows_path}: {row.path} is also live in {live_paths[row.path]}")
            live_paths[row.path] = name
        keep = np.ones(shard["rows"], dtype=bool)
        keep[sorted(removed)] = False
        off = int((invalid_rows(vectors) & keep).sum())  # a tombstoned row is never read
        if off:
            problems.append(f"{vectors_path}: {off} live vector(s) are not finite unit-length vectors")
        parts.append(vectors[keep])
    highest = max(seen_ids, default=-1)
    if highest >= manifest["next_id"] and not lowered:
        problems.append(lowered_next_id(store.root / MANIFEST, manifest["next_id"], highest))
    if len(live_paths) != manifest["count"] and len(problems) == before:
        problems.append(f"{store.root / MANIFEST}: count {manifest['count']} but {len(live_paths)} live rows")
    if len(problems) > before:
        return None
    return np.concatenate(parts) if parts else np.zeros((0, store.dim), dtype=np.float32)
