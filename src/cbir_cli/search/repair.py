"""``cbir check --repair``: repair an index from what it holds, without its images.

* a lost or unreadable manifest is recovered from the shards, their rows files and
  ``store.json`` (:func:`cbir_cli.store.repair.recover_manifest`);
* damaged shards are dropped (their images come back at the next indexing run of
  the folder, which embeds them again) and invalid vectors tombstoned;
* a lowered ``next_id`` is raised above every stored id (ids are never reused);
* commit log entries that were never committed (torn, garbled, after a gap) are
  dropped, and the state is checkpointed into ``manifest.json``;
* leftovers of interrupted runs are deleted;
* the saved search index and its DBA vectors (re-ranking) are rebuilt from the
  shards when damaged, stale or missing.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CorruptStoreError
from ..store.commit_log import LOG_DIR
from ..store.feature_store import FeatureStore
from ..store.locking import writer_lock
from ..store.manifest import inspect_manifest, read_identity, shard_files
from ..store.repair import Recovery, drop_damaged_shards, recover_manifest
from .backends import backend_for, refresh_backend
from .faiss_backend import index_paths


@dataclass
class RepairReport:
    index: str
    recovered: Recovery | None = None
    repairs: list[str] = field(default_factory=list)  # one line per thing repaired

    @property
    def changed(self) -> bool:
        return bool(self.recovered or self.repairs)


def _saved_generation(root: Path) -> int:
    """The generation the saved search index was made for (0 if unknown)."""
    store = FeatureStore(root, {"generation": 0})
    try:
        meta = json.loads(index_paths(store)[1].read_bytes())
        return int(meta["generation"]) if isinstance(meta, dict) and isinstance(meta.get("generation"), int) else 0
    except (OSError, ValueError):
        return 0


def repair_index(index_dir: str | os.PathLike[str]) -> RepairReport:
    """Repair what can be repaired at ``index_dir`` (see the module docstring),
    holding the writer lock. Fails (:class:`CorruptStoreError`) only when nothing
    usable is left: then the index must be rebuilt from its images."""
    root = Path(index_dir).expanduser()
    report = RepairReport(index=str(root))
    with writer_lock(root):
        manifest, problems = inspect_manifest(root)
        if manifest is None:
            if read_identity(root) is None or not shard_files(root):
                raise CorruptStoreError(problems[0] if problems else f"{root}: no index here")
            # Above any generation a reader may hold, so servers reload.
            report.recovered = recover_manifest(root, generation=_saved_generation(root) + 1)
            report.repairs.append(f"{problems[0]}: recovered from {report.recovered.shards} shard(s), "
                                  f"{report.recovered.images} images")
            report.repairs += [f"{dropped}: left out" for dropped in report.recovered.dropped]
        store = FeatureStore.open(root, check_files=False)
        report.repairs += [line.replace("; ignored (never committed)", "; dropped (never committed)")
                           for line in store.log_ignored or []]
        report.repairs += drop_damaged_shards(store, rehash=True)
        lowered = store.ensure_next_id(every_row=True)
        if lowered:
            report.repairs.append(lowered)
        leftovers = [p for p in store.leftover_files() if p.parent.name != LOG_DIR]
        store.checkpoint()
        store.collect_garbage()  # leftovers go even when nothing else changed
        if leftovers:
            report.repairs.append(f"deleted {len(leftovers)} leftover file(s) of interrupted runs")
        if store.count and refresh_backend(store, None):
            name = backend_for(store).name
            where = index_paths(store)[0] if name == "faiss" else f"the {name} backend"
            report.repairs.append(f"{where}: rebuilt the search index or its DBA vectors from the shards")
    return report
