"""Repairing a store from what it holds: dropping damaged shards (a writer does it
before building on a store, so their images are embedded again) and recovering a
lost manifest from the shards, their rows files and ``store.json``."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CorruptStoreError
from ..fsutil import atomic_write_json, bytes_sha256
from .commit_log import log_generations, prune
from .feature_store import SHARD_FILES, FeatureStore
from .manifest import FORMAT_VERSION, MANIFEST, SHARDS_DIR, library_versions, read_identity, shard_files
from .shard_format import MANIFEST_KEY, shard_dtype_of
from .validity import invalid_rows
from .verdicts import VerdictRecord, file_stamp, stamp_of

# What a writer's start verified of each shard file (derived, best effort: :class:`.verdicts.VerdictRecord`).
SHARD_VERDICTS = "shards-verified.json"


def drop_damaged_shards(store: FeatureStore, rehash: bool = False) -> list[str]:
    """Verify every shard of ``store`` (files, sizes, checksums, shape, valid vectors).
    A damaged shard is dropped from the (in-memory) manifest, a shard with invalid
    vectors has those rows tombstoned; the caller's next commit makes it durable and
    deletes the dropped files. Returns one line per repair.

    A shard whose two files have the stamps they had when they were last verified
    (:data:`SHARD_VERDICTS`, :class:`~.verdicts.VerdictRecord`) is not read again: a
    writer's start costs a ``stat`` per shard file, not a read of every vector
    (51 GB at 10M x 1280 float32). Any write to a file changes its stamp, so a
    damaged or swapped shard is still found; silent bit rot is ``cbir check``'s
    (and ``rehash``'s, which ``cbir check --repair`` passes) to find.

    Past :data:`SWEEP_SHARDS` shards, even the stats are spread over runs: a run
    stats every shard with no verdict yet (new ones: hashed) and one slice of the
    others, about SWEEP_SHARDS of them, a different slice each generation; so a
    writer's start costs what was added, and a damaged file in a 10M-row store is
    found within ~10 runs (or at once by ``cbir check``, and when it is read)."""
    import numpy as np

    notes: list[str] = []
    kept: list[dict[str, Any]] = []
    record = VerdictRecord(store.root / SHARD_VERDICTS)
    folder = os.fspath(store.shards_dir)
    shards = store.manifest["shards"]
    # Which slice of the verified shards this run stats (see the docstring).
    slices = max(1, -(-len(shards) // SWEEP_SHARDS))
    phase = store.generation % slices
    for i, shard in enumerate(shards):
        name = f"{SHARDS_DIR}/{shard['name']}"  # (no generator per shard: 10k of them at 10M rows)
        unswept = i % slices != phase and record.knows(name + ".npy") and record.knows(name + ".rows.json")
        if not rehash and (unswept or _verified_as_it_is(folder, shard, record)):
            kept.append(shard)
            continue
        live = shard["rows"] - len(shard["removed"])
        problems = store.shard_file_problems(shard)
        vectors = None
        if not problems:
            files = store.shard_paths(shard)
            try:
                stamps = [file_stamp(path) for path in files]
                store.shard_rows(shard, cache=False)  # verified, not kept (10M rows: GBs)
                vectors = store.read_shard(shard, mmap=False)
            except CorruptStoreError as exc:
                problems = [exc.message]
            else:
                for path, stamp, key in zip(files, stamps, ("sha256", "rows_sha256")):
                    if key in shard:  # verified against it just now
                        record.remember(path, stamp, shard[key])
        if vectors is None:
            notes.append(f"{problems[0]}; dropped it, its {live} image(s) will be embedded again")
            continue
        bad = set(np.flatnonzero(invalid_rows(vectors)).tolist()) - set(shard["removed"])
        if bad:
            notes.append(f"{store.shard_paths(shard)[0]}: {len(bad)} invalid vector(s); "
                         "their images will be embedded again")
            shard = {**shard, "removed": sorted(set(shard["removed"]) | bad)}
            if len(shard["removed"]) == shard["rows"]:
                continue
        kept.append(shard)
    if notes:
        store.set_shards(kept)
    record.save({f"{SHARDS_DIR}/{shard['name']}{suffix}" for shard in kept for suffix, _, _ in SHARD_FILES})
    return notes


# Shards a writer's start stats per run in a large store (drop_damaged_shards).
SWEEP_SHARDS = 1024


def _verified_as_it_is(folder: str, shard: dict[str, Any], record: VerdictRecord) -> bool:
    """Whether both files of ``shard`` have the sizes the manifest records and the
    stamps they had when verified (:class:`~.verdicts.VerdictRecord`): one ``stat``
    each and no Path objects, as a writer's start runs this for every shard (10M
    rows: ~20k files). Anything else goes the slow way, which says what is wrong."""
    for suffix, size_key, sha_key in SHARD_FILES:
        name = shard["name"] + suffix
        try:
            st = os.stat(os.path.join(folder, name))
        except OSError:
            return False
        if size_key in shard and st.st_size != shard[size_key]:
            return False
        if not record.holds_key(f"{SHARDS_DIR}/{name}", stamp_of(st), shard.get(sha_key)):
            return False
    return True


@dataclass
class Recovery:
    """What :func:`recover_manifest` did."""

    shards: int = 0
    images: int = 0
    duplicates: int = 0  # older rows of a path also stored later: tombstoned
    dropped: list[str] = field(default_factory=list)  # shard files that could not be used, with why


def recover_manifest(root: Path, generation: int = 0) -> Recovery:
    """Write a manifest for the shards at ``root`` from their rows files and the
    store's ``store.json`` (the fingerprint and shard dtype). Each shard must load
    as (rows, dim) valid vectors of that dtype aligned with its rows file, else it is left out (and
    deleted by the next commit). A path stored more than once keeps its newest row
    (the highest id: later writes replace earlier ones). What the lost manifest
    knew beyond that -- tombstones of deleted files, skipped files -- is gone: the
    next indexing run of the folder removes and skips them again. The writer lock
    must be held. ``generation``: the manifest's, above any a reader may hold."""
    import io

    import numpy as np

    from .manifest import parse_rows

    identity = read_identity(root)
    if identity is None:
        raise CorruptStoreError(f"{root}: cannot recover the manifest: store.json, which names the model of "
                                "the vectors, is missing or damaged")
    dim = int(identity["fingerprint"]["dim"])
    dtype = shard_dtype_of(identity)
    recovery = Recovery()
    shards: list[dict[str, Any]] = []
    newest: dict[str, tuple[int, int, int]] = {}  # path -> (id, shard position, row)
    seen_ids: set[int] = set()
    for vectors_path in shard_files(root):
        name = vectors_path.name.removesuffix(".npy")
        rows_path = vectors_path.with_name(f"{name}.rows.json")
        try:
            data, rows_data = vectors_path.read_bytes(), rows_path.read_bytes()
            rows = parse_rows(rows_data)
            vectors = np.load(io.BytesIO(data), allow_pickle=False)
            if vectors.dtype != np.dtype(dtype) or vectors.shape != (len(rows), dim) or not rows:
                raise ValueError(f"shape {vectors.shape} {vectors.dtype}, expected ({len(rows)}, {dim}) {dtype}")
            if invalid_rows(vectors).any() or seen_ids & {r.id for r in rows} or len({r.id for r in rows}) < len(rows):
                raise ValueError("invalid vectors or repeated ids")
        except (OSError, ValueError, EOFError) as exc:
            recovery.dropped.append(f"{vectors_path}: {exc}")
            continue
        seen_ids |= {r.id for r in rows}
        for i, row in enumerate(rows):
            if row.path not in newest or newest[row.path][0] < row.id:
                newest[row.path] = (row.id, len(shards), i)
        shards.append({"name": name, "rows": len(rows), "sha256": bytes_sha256(data), "bytes": len(data),
                       "rows_sha256": bytes_sha256(rows_data), "rows_bytes": len(rows_data), "removed": [],
                       "max_id": max(r.id for r in rows), "_ids": [r.id for r in rows]})
    keep = {(position, i) for _, position, i in newest.values()}
    for position, shard in enumerate(shards):
        shard["removed"] = [i for i in range(shard["rows"]) if (position, i) not in keep]
        recovery.duplicates += len(shard["removed"])
    shards = [s for s in shards if len(s["removed"]) < s["rows"]]
    if not shards:
        raise CorruptStoreError(f"{root}: cannot recover the manifest: no usable shard "
                                f"({'; '.join(recovery.dropped) or 'none found'})")
    now = time.time()
    manifest = {
        "format": FORMAT_VERSION, "generation": generation, "fingerprint": identity["fingerprint"],
        "versions": library_versions(), "created": now, "updated": now, "recovered": now,
        "next_id": max(seen_ids) + 1,
        "next_shard": max(int(s["name"].removeprefix("shard-")) for s in shards) + 1,
        "shards": [{k: v for k, v in s.items() if k != "_ids"} for s in shards],
        "count": len(newest), "skipped": {},
    }
    if MANIFEST_KEY in identity:
        manifest[MANIFEST_KEY] = identity[MANIFEST_KEY]
    if identity.get("weights_path"):
        manifest["weights_path"] = identity["weights_path"]
    # Above every log entry: those followed the lost checkpoint, not this one.
    manifest["generation"] = max([generation, *(g + 1 for g in log_generations(root))])
    atomic_write_json(root / MANIFEST, manifest)
    prune(log_generations(root).values())
    recovery.shards, recovery.images = len(shards), len(newest)
    return recovery
