"""``cbir check``: verify that an index's files agree with each other.

Reads everything the manifest names and checks, without changing anything:

* the manifest: well-formed, count == live rows, ids never reused;
* every shard: present, the recorded size and sha256, float32 (rows, dim), finite
  unit-length vectors; its rows file: present, checksum, one row per vector;
* ids: unique, below ``next_id``; live paths unique;
* the model: known, same dimension and preprocessing as the registry now defines,
  a ``--weights`` file still present with the recorded hash;
* the search index (if saved for the current generation): checksum, count, dim and
  the same vectors as the shards.

A stale or missing search index and leftover files of an interrupted run are
reported as notes, not problems: queries rebuild the index in memory, and the next
indexing run deletes the leftovers.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import CbirError
from .store import MANIFEST, REPAIR_HINT, FeatureStore, manifest_problems

if TYPE_CHECKING:
    import numpy as np

# Stored vectors are L2-normalised by the embedder; anything else is damage.
UNIT_NORM_TOLERANCE = 1e-3


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
        return None if self.ok else REPAIR_HINT

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok, "repair": self.repair}


def check_index(index_dir: str | os.PathLike[str]) -> CheckReport:
    """Verify the store at ``index_dir``; never raises for damage, reports it."""
    root = Path(index_dir).expanduser()
    report = CheckReport(index=str(root))
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        report.problems.append(f"{manifest_path}: missing (no index here); build one with `cbir index FOLDER`")
        return report
    try:
        manifest = json.loads(manifest_path.read_text(encoding="ascii"))
    except (OSError, ValueError) as exc:
        report.problems.append(f"{manifest_path}: unreadable ({exc})")
        return report
    structural = manifest_problems(manifest)
    if structural:
        report.problems.extend(f"{manifest_path}: {p}" for p in structural)
        return report
    store = FeatureStore(root, manifest)
    report.count, report.shards, report.generation = store.count, len(manifest["shards"]), store.generation
    report.model, report.dim = store.fingerprint.get("model"), store.fingerprint.get("dim")
    report.leftovers = [str(p) for p in store.leftover_files()]
    if report.leftovers:
        report.notes.append(f"{len(report.leftovers)} leftover file(s) of an interrupted run; "
                            "the next `cbir index` deletes them")
    report.problems.extend(_model_problems(store))
    if not isinstance(report.dim, int) or report.dim < 1:
        report.problems.append(f"{manifest_path}: fingerprint has no valid dim ({report.dim!r})")
        return report
    live_vectors = _shard_problems(store, report.problems)
    if live_vectors is not None:
        _search_index_problems(store, live_vectors, report)
    return report


def _model_problems(store: FeatureStore) -> list[str]:
    from .models import get_model_config, weights_id_for

    fp = store.fingerprint
    where = store.root / MANIFEST
    try:
        config = get_model_config(str(fp.get("model")))
    except CbirError:
        return [f"{where}: unknown model {fp.get('model')!r}; its vectors cannot be queried"]
    problems = []
    if fp.get("dim") != config.dim:
        problems.append(f"{where}: model {config.name} makes {config.dim}-d vectors, manifest says {fp.get('dim')}")
    if fp.get("preprocessing") != config.preprocessing():
        problems.append(f"{where}: model {config.name}'s preprocessing changed since these vectors were made")
    weights_path = store.manifest.get("weights_path")
    if weights_path:
        try:
            if weights_id_for(config, weights_path) != fp.get("weights"):
                problems.append(f"{weights_path}: weights file changed since the index was built")
        except CbirError as exc:
            problems.append(str(exc))
    return problems


def _shard_problems(store: FeatureStore, problems: list[str]) -> np.ndarray | None:
    """Check every shard and rows file; the live vectors when all could be read."""
    import numpy as np

    from .errors import CorruptStoreError

    manifest = store.manifest
    before = len(problems)
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
            problems.append(_problem(exc))
            continue
        removed = set(shard["removed"])
        for i, row in enumerate(rows):
            if row.id in seen_ids or not 0 <= row.id < manifest["next_id"]:
                problems.append(f"{rows_path}: id {row.id} repeated or not below next_id {manifest['next_id']}")
            seen_ids.add(row.id)
            if i in removed:
                continue
            if row.path in live_paths:
                problems.append(f"{rows_path}: {row.path} is also live in {live_paths[row.path]}")
            live_paths[row.path] = name
        if not np.isfinite(vectors).all():
            problems.append(f"{vectors_path}: holds NaN or infinite values")
        else:
            norms = np.linalg.norm(vectors, axis=1)
            off = int((np.abs(norms - 1.0) > UNIT_NORM_TOLERANCE).sum())
            if off:
                problems.append(f"{vectors_path}: {off} vector(s) are not unit length")
        keep = np.ones(shard["rows"], dtype=bool)
        keep[sorted(removed)] = False
        parts.append(vectors[keep])
    if len(live_paths) != manifest["count"] and len(problems) == before:
        problems.append(f"{store.root / MANIFEST}: count {manifest['count']} but {len(live_paths)} live rows")
    if len(problems) > before:
        return None
    return np.concatenate(parts) if parts else np.zeros((0, store.dim), dtype=np.float32)


def _problem(exc: Exception) -> str:
    # The report states the repair once; drop the per-error hint.
    return str(exc).removesuffix(f"; {REPAIR_HINT}")


def _search_index_problems(store: FeatureStore, live_vectors: np.ndarray, report: CheckReport) -> None:
    """A saved index for this generation must hold exactly the live vectors."""
    import numpy as np

    from .errors import CorruptStoreError
    from .index import index_paths, load_index, read_index_meta

    try:
        meta = read_index_meta(store)
        if meta is None:
            report.notes.append("no saved search index; queries build one in memory (`cbir index FOLDER` saves it)")
            return
        loaded = load_index(store)
    except CorruptStoreError as exc:
        report.problems.append(_problem(exc))
        return
    if loaded is None:
        report.search_index = "stale"
        report.notes.append(f"search index is from generation {meta.get('generation')}, the store is at "
                            f"{store.generation}; queries build one in memory (`cbir index FOLDER` saves it)")
        return
    report.search_index = "current"
    index, _ = loaded
    import faiss

    # Only indexes that keep the vectors exactly can be compared; a compressed one
    # (IVF-PQ) is checked by count, dim and checksum above.
    if isinstance(faiss.downcast_index(index), (faiss.IndexFlat, faiss.IndexHNSWFlat)) and index.ntotal:
        if not np.allclose(index.reconstruct_n(0, index.ntotal), live_vectors, atol=1e-6):
            report.problems.append(f"{index_paths(store)[0]}: holds other vectors than the shards")
