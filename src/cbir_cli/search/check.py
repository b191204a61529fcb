"""``cbir check``: verify that an index's files agree with each other.

Reads everything the manifest names and checks, without changing anything:

* the manifest (the checkpoint) and the commit log after it: well-formed, entries
  contiguous and each consistent with the state it follows (an entry that is not is
  a problem: never committed, ignored by readers, dropped by ``--repair``), count ==
  live rows, ids never reused;
* every shard: present, the recorded size and sha256, (rows, dim) of the store's shard dtype, finite
  unit-length vectors; its rows file: present, checksum, one row per vector;
* ids: unique, below ``next_id`` (from the manifest's ``max_id`` keys alone, and
  from the rows); live paths unique;
* the model: known, same dimension and preprocessing as the registry now defines,
  a weights file still present with the recorded hash; an int8 index's own copy of
  its quantised model matches its recorded checksum;
* the search backend the index records (if saved for the current generation):
  checksum, count, dim and the same vectors as the shards (Faiss); the collection
  exists and holds exactly the store's live ids (Milvus); the DBA vectors saved
  next to it for re-ranking (:mod:`.dba`): checksums, the same live ids.

A stale or missing search index and leftover files of an interrupted run are
reported as notes, not problems: queries rebuild the index in memory, and the next
indexing run deletes the leftovers.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CbirError
from ..models.int8_store import damaged_int8_models
from ..models.loading import fingerprint_problems
from ..store.commit_log import replay
from ..store.feature_store import FeatureStore
from ..store.integrity import shard_problems
from ..store.manifest import MANIFEST, inspect_manifest
from .backends import backend_for, opened
from .rerank import RerankingBackend


@dataclass
class CheckReport:
    """What ``cbir check`` found. ``problems`` empty means consistent."""

    index: str
    count: int = 0
    shards: int = 0
    generation: int = 0
    model: str | None = None
    dim: int | None = None
    shard_dtype: str = "float32"  # how the shards keep vectors (store.shard_format)
    backend: str = "faiss"
    search_index: str = "missing"  # current | stale | missing | in use (held by another process: not checked)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)
    # The remedy when every problem is the search backend's and it has its own.
    backend_repair: str | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def repair(self) -> str | None:
        """The remedy (a :data:`cbir_cli.errors.REMEDIES` key), None when consistent."""
        return None if self.ok else self.backend_repair or "rebuild"

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok, "repair": self.repair}


def check_index(index_dir: str | os.PathLike[str]) -> CheckReport:
    """Verify the store at ``index_dir``; never raises for damage, reports it.

    Args:
        index_dir: the index folder (``cbir index``'s output).

    Returns:
        What was checked and every problem found (``ok`` when there is none).
    """
    root = Path(index_dir).expanduser()
    report = CheckReport(index=str(root))
    manifest_path = root / MANIFEST
    manifest, structural = inspect_manifest(root)
    if manifest is None:
        report.problems.extend(structural)
        return report
    checkpoint = manifest["generation"]
    manifest, ignored = replay(root, manifest)
    report.problems.extend(ignored)
    store = FeatureStore(root, manifest, checkpoint)
    report.count, report.shards, report.generation = store.count, len(manifest["shards"]), store.generation
    report.model, report.dim = store.fingerprint.get("model"), store.fingerprint.get("dim")
    report.shard_dtype = store.shard_dtype
    report.leftovers = [str(p) for p in store.leftover_files()]
    if report.leftovers:
        report.notes.append(f"{len(report.leftovers)} leftover file(s) of an interrupted run; "
                            "the next `cbir index` deletes them")
    report.problems.extend(fingerprint_problems(store.fingerprint, manifest.get("weights_path"), manifest_path))
    report.problems.extend(damaged_int8_models(root))
    if not isinstance(report.dim, int) or report.dim < 1:
        report.problems.append(f"{manifest_path}: fingerprint has no valid dim ({report.dim!r})")
        return report
    live_vectors = shard_problems(store, report.problems)
    if live_vectors is not None:
        try:
            backend = RerankingBackend(backend_for(store))
        except CbirError as exc:  # a recorded backend this installation cannot use
            report.problems.append(f"{manifest_path}: search backend: {exc.message}")
            return report
        with opened(backend):
            found = backend.check(store, live_vectors)
        report.backend = backend.name
        report.search_index = found.state
        if not report.problems:
            report.backend_repair = found.repair
        report.problems.extend(found.problems)
        report.notes.extend(found.notes)
    return report
