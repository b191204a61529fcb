"""``cbir check``: verify that an index's files agree with each other.

Reads everything the manifest names and checks, without changing anything:

* the manifest: well-formed, count == live rows, ids never reused;
* every shard: present, the recorded size and sha256, float32 (rows, dim), finite
  unit-length vectors; its rows file: present, checksum, one row per vector;
* ids: unique, below ``next_id``; live paths unique;
* the model: known, same dimension and preprocessing as the registry now defines,
  a weights file still present with the recorded hash;
* the search backend (if saved for the current generation): checksum, count, dim
  and the same vectors as the shards.

A stale or missing search index and leftover files of an interrupted run are
reported as notes, not problems: queries rebuild the index in memory, and the next
indexing run deletes the leftovers.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..models.loading import fingerprint_problems
from ..store.feature_store import FeatureStore
from ..store.integrity import shard_problems
from ..store.manifest import MANIFEST, inspect_manifest
from .faiss_backend import FaissBackend
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
    search_index: str = "missing"  # current | stale | missing
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def repair(self) -> str | None:
        """The remedy (a :data:`cbir_cli.errors.REMEDIES` key), None when consistent."""
        return None if self.ok else "rebuild"

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok, "repair": self.repair}


def check_index(index_dir: str | os.PathLike[str]) -> CheckReport:
    """Verify the store at ``index_dir``; never raises for damage, reports it."""
    root = Path(index_dir).expanduser()
    report = CheckReport(index=str(root))
    manifest_path = root / MANIFEST
    manifest, structural = inspect_manifest(root)
    if manifest is None:
        report.problems.extend(structural)
        return report
    store = FeatureStore(root, manifest)
    report.count, report.shards, report.generation = store.count, len(manifest["shards"]), store.generation
    report.model, report.dim = store.fingerprint.get("model"), store.fingerprint.get("dim")
    report.leftovers = [str(p) for p in store.leftover_files()]
    if report.leftovers:
        report.notes.append(f"{len(report.leftovers)} leftover file(s) of an interrupted run; "
                            "the next `cbir index` deletes them")
    report.problems.extend(fingerprint_problems(store.fingerprint, manifest.get("weights_path"), manifest_path))
    if not isinstance(report.dim, int) or report.dim < 1:
        report.problems.append(f"{manifest_path}: fingerprint has no valid dim ({report.dim!r})")
        return report
    live_vectors = shard_problems(store, report.problems)
    if live_vectors is not None:
        backend = RerankingBackend(FaissBackend()).check(store, live_vectors)
        report.search_index = backend.state
        report.problems.extend(backend.problems)
        report.notes.extend(backend.notes)
    return report
