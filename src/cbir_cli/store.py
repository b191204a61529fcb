"""The feature store: ``.npy`` shards of float32 vectors, the rows they belong to,
and a JSON manifest that is the single commit point.

Layout of a store directory::

    manifest.json                 # commit point (written atomically, last)
    shards/shard-000001.npy       # float32 (n, dim)
    shards/shard-000001.rows.json # the n rows, same order: id, path, sha256, size
    index/...                     # search index built from the shards (see index.py)

Shards are immutable once written. Removing or replacing an image tombstones its
row in the manifest; a shard whose rows are all gone is dropped. Every file is
written to a temporary name, fsynced and renamed, and only then does the manifest
name it, so a crash at any moment leaves the last committed state intact; files no
manifest names are leftovers and are removed on the next write.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import CorruptStoreError, IndexNotFoundError, StoreMismatchError

if TYPE_CHECKING:
    import numpy as np

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SHARDS_DIR = "shards"


@dataclass(frozen=True)
class Row:
    """One stored image: a stable integer id (never reused), its path and content hash."""

    id: int
    path: str
    sha256: str
    size: int


# ---------------------------------------------------------------------------
# Durable file writes.


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to ``path.tmp-PID``, fsync, rename over ``path``, fsync the folder."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any) -> None:
    # ensure_ascii keeps non-UTF-8 file names (surrogate escapes) representable.
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode("ascii"))


def npy_bytes(array: np.ndarray) -> bytes:
    import io

    import numpy as np

    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array, dtype=np.float32), allow_pickle=False)
    return buf.getvalue()


def bytes_sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("cbir-cli", "torch", "torchvision", "faiss-cpu", "numpy", "pillow"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return out


# ---------------------------------------------------------------------------


def _describe_fingerprint(fp: dict[str, Any]) -> str:
    return f"model {fp.get('model')} (weights {fp.get('weights')}, dim {fp.get('dim')})"


def check_fingerprint(stored: dict[str, Any], wanted: dict[str, Any], where: Path) -> None:
    """Refuse to mix vectors from different models, weights or preprocessing."""
    for key in ("model", "weights", "dim", "preprocessing"):
        if stored.get(key) != wanted.get(key):
            raise StoreMismatchError(
                f"{where}: holds vectors from {_describe_fingerprint(stored)} but this run uses "
                f"{_describe_fingerprint(wanted)} ({key} differs); use another --index/--out folder, "
                f"or the same --model/--weights as before"
            )


class FeatureStore:
    """Read and append to a store directory. Not thread-safe; writers hold a lock
    (see :mod:`cbir_cli.locking`)."""

    def __init__(self, root: Path, manifest: dict[str, Any]) -> None:
        self.root = root
        self.manifest = manifest
        self._rows_cache: dict[str, list[Row]] = {}

    # -- opening -----------------------------------------------------------

    @staticmethod
    def exists(root: str | os.PathLike[str]) -> bool:
        return (Path(root) / MANIFEST).is_file()

    @classmethod
    def open(cls, root: str | os.PathLike[str]) -> FeatureStore:
        root = Path(root).expanduser()
        path = root / MANIFEST
        if not path.is_file():
            raise IndexNotFoundError(
                f"{root}: no index here (no {MANIFEST}); build one with `cbir index FOLDER`"
                + (" --index DIR" if root else "")
            )
        try:
            manifest = json.loads(path.read_text(encoding="ascii"))
        except (OSError, ValueError) as exc:
            raise CorruptStoreError(f"{path}: unreadable manifest ({exc}); rebuild with `cbir index --rebuild`") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION:
            raise CorruptStoreError(f"{path}: not a cbir manifest of format {FORMAT_VERSION}")
        return cls(root, manifest)

    @classmethod
    def create(cls, root: str | os.PathLike[str], fingerprint: dict[str, Any]) -> FeatureStore:
        root = Path(root).expanduser()
        (root / SHARDS_DIR).mkdir(parents=True, exist_ok=True)
        now = time.time()
        manifest = {
            "format": FORMAT_VERSION,
            "generation": 0,
            "fingerprint": fingerprint,
            "versions": library_versions(),
            "created": now,
            "updated": now,
            "next_id": 0,
            "next_shard": 1,
            "shards": [],
            "count": 0,
            "skipped": {},
        }
        store = cls(root, manifest)
        store.commit()
        return store

    @classmethod
    def open_or_create(cls, root: str | os.PathLike[str], fingerprint: dict[str, Any]) -> FeatureStore:
        if cls.exists(root):
            store = cls.open(root)
            if store.count == 0 and not store.manifest["shards"] and store.fingerprint != fingerprint:
                # An empty store (a first run that failed before embedding anything)
                # does not pin a model.
                return cls.create(root, fingerprint)
            check_fingerprint(store.fingerprint, fingerprint, Path(root))
            return store
        return cls.create(root, fingerprint)

    # -- reading -----------------------------------------------------------

    @property
    def fingerprint(self) -> dict[str, Any]:
        return self.manifest["fingerprint"]

    @property
    def generation(self) -> int:
        return int(self.manifest["generation"])

    @property
    def dim(self) -> int:
        return int(self.fingerprint["dim"])

    @property
    def count(self) -> int:
        return int(self.manifest["count"])

    @property
    def shards_dir(self) -> Path:
        return self.root / SHARDS_DIR

    def _shard_rows(self, name: str) -> list[Row]:
        rows = self._rows_cache.get(name)
        if rows is None:
            path = self.shards_dir / f"{name}.rows.json"
            try:
                raw = json.loads(path.read_text(encoding="ascii"))
                rows = [Row(**r) for r in raw]
            except (OSError, ValueError, TypeError) as exc:
                raise CorruptStoreError(f"{path}: unreadable ({exc}); repair with `cbir index --rebuild`") from None
            self._rows_cache[name] = rows
        return rows

    def live_rows(self) -> list[Row]:
        """All live rows, in shard order: the row order of :meth:`load_vectors`."""
        out: list[Row] = []
        for shard in self.manifest["shards"]:
            removed = set(shard["removed"])
            out.extend(r for i, r in enumerate(self._shard_rows(shard["name"])) if i not in removed)
        return out

    def rows_by_path(self) -> dict[str, Row]:
        return {r.path: r for r in self.live_rows()}

    def _load_shard(self, shard: dict[str, Any], mmap: bool) -> np.ndarray:
        import numpy as np

        path = self.shards_dir / f"{shard['name']}.npy"
        try:
            arr = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise CorruptStoreError(f"{path}: unreadable shard ({exc}); repair with `cbir index --rebuild`") from None
        if arr.dtype != np.float32 or arr.ndim != 2 or arr.shape != (shard["rows"], self.dim):
            raise CorruptStoreError(
                f"{path}: shard has shape {arr.shape} {arr.dtype}, manifest says ({shard['rows']}, {self.dim}) float32"
            )
        return arr

    def load_vectors(self, mmap: bool = False) -> np.ndarray:
        """Live vectors (n, dim) float32, rows aligned with :meth:`live_rows`."""
        import numpy as np

        parts = []
        for shard in self.manifest["shards"]:
            arr = self._load_shard(shard, mmap)
            if shard["removed"]:
                keep = np.ones(shard["rows"], dtype=bool)
                keep[shard["removed"]] = False
                arr = arr[keep]
            parts.append(np.asarray(arr))
        if not parts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.concatenate(parts, axis=0) if len(parts) > 1 else np.array(parts[0])

    def vectors_for(self, rows: Iterable[Row]) -> dict[int, np.ndarray]:
        """Vectors of specific live rows by id (used to reuse a moved file's vector)."""
        import numpy as np

        wanted = {r.id for r in rows}
        out: dict[int, np.ndarray] = {}
        for shard in self.manifest["shards"]:
            ids = [r.id for r in self._shard_rows(shard["name"])]
            hits = [i for i, rid in enumerate(ids) if rid in wanted]
            if hits:
                arr = self._load_shard(shard, mmap=True)
                for i in hits:
                    out[ids[i]] = np.array(arr[i])
        return out

    # -- writing -----------------------------------------------------------

    def add_shard(self, vectors: np.ndarray, items: Sequence[tuple[str, str, int]]) -> list[Row]:
        """Write a new shard for ``items`` = (path, sha256, size), rows aligned with
        ``vectors``. Live rows with the same paths are tombstoned (replaced). The change
        is durable only after :meth:`commit`."""
        import numpy as np

        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape != (len(items), self.dim):
            raise ValueError(f"vectors shape {vectors.shape} does not match {len(items)} rows of dim {self.dim}")
        name = f"shard-{self.manifest['next_shard']:06d}"
        first_id = int(self.manifest["next_id"])
        rows = [Row(first_id + i, path, sha, size) for i, (path, sha, size) in enumerate(items)]
        self.remove_paths(r.path for r in rows)
        data = npy_bytes(vectors)
        self.shards_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.shards_dir / f"{name}.npy", data)
        atomic_write_json(self.shards_dir / f"{name}.rows.json", [asdict(r) for r in rows])
        self._rows_cache[name] = rows
        self.manifest["shards"].append(
            {"name": name, "rows": len(rows), "sha256": bytes_sha256(data), "removed": []}
        )
        self.manifest["next_shard"] += 1
        self.manifest["next_id"] = first_id + len(rows)
        for r in rows:
            self.manifest["skipped"].pop(r.path, None)
        return rows

    def remove_paths(self, paths: Iterable[str]) -> int:
        """Tombstone the live rows of ``paths``; returns how many were removed."""
        targets = set(paths)
        if not targets:
            return 0
        removed = 0
        kept_shards = []
        for shard in self.manifest["shards"]:
            gone = set(shard["removed"])
            for i, r in enumerate(self._shard_rows(shard["name"])):
                if i not in gone and r.path in targets:
                    gone.add(i)
                    removed += 1
            shard["removed"] = sorted(gone)
            if len(gone) < shard["rows"]:
                kept_shards.append(shard)
        self.manifest["shards"] = kept_shards
        return removed

    def record_skipped(self, path: str, sha256: str, reason: str) -> None:
        """Remember a file that could not be embedded, so an unchanged copy is not
        decoded again on the next run (it is reported as skipped again)."""
        self.manifest["skipped"][path] = {"sha256": sha256, "reason": reason}

    def forget_skipped(self, paths: Iterable[str]) -> None:
        for p in paths:
            self.manifest["skipped"].pop(p, None)

    def commit(self) -> None:
        """Make everything written so far durable: the manifest is replaced
        atomically, then files it no longer names are deleted."""
        self.manifest["generation"] = self.generation + 1
        self.manifest["updated"] = time.time()
        self.manifest["count"] = sum(s["rows"] - len(s["removed"]) for s in self.manifest["shards"])
        self.manifest["versions"] = library_versions()
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.root / MANIFEST, self.manifest)
        self.collect_garbage()

    def collect_garbage(self) -> list[Path]:
        """Delete shard files and temporaries the committed manifest does not name
        (left by a crash, or by shards dropped after removals)."""
        if not self.shards_dir.is_dir():
            return []
        live = {s["name"] for s in self.manifest["shards"]}
        deleted = []
        for path in self.shards_dir.iterdir():
            name = path.name
            stem = name.removesuffix(".npy").removesuffix(".rows.json")
            if name.startswith(".") or stem not in live:
                try:
                    path.unlink()
                    deleted.append(path)
                except OSError:
                    pass
        for name in list(self._rows_cache):
            if name not in live:
                del self._rows_cache[name]
        return deleted
