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

The manifest records each shard's size and the sha256 of both of its files, so a
damaged or swapped file is detected when it is read (and by ``cbir check``) and is
never served.
"""

from __future__ import annotations

import copy
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


TMP_MARK = ".tmp-"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to ``.NAME.tmp-PID``, fsync, rename over ``path``, fsync the folder."""
    tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def json_bytes(obj: Any) -> bytes:
    # ensure_ascii keeps non-UTF-8 file names (surrogate escapes) representable.
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode("ascii")


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, json_bytes(obj))


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


REPAIR_HINT = "repair with `cbir index FOLDER --rebuild`"
MANIFEST_KEYS = {"format": int, "generation": int, "fingerprint": dict, "next_id": int, "next_shard": int,
                 "shards": list, "count": int, "skipped": dict}
SHARD_KEYS = {"name": str, "rows": int, "sha256": str, "removed": list}


def manifest_problems(manifest: Any) -> list[str]:
    """Structural problems of a parsed manifest (wrong types, missing keys,
    impossible counts); empty when it is well-formed."""
    if not isinstance(manifest, dict):
        return ["manifest is not a JSON object"]
    if manifest.get("format") != FORMAT_VERSION:
        return [f"not a cbir manifest of format {FORMAT_VERSION} (format {manifest.get('format')!r})"]
    problems = [f"manifest key {key!r} missing or not {kind.__name__}"
                for key, kind in MANIFEST_KEYS.items() if not isinstance(manifest.get(key), kind)]
    if problems:
        return problems
    live = 0
    for i, shard in enumerate(manifest["shards"]):
        bad = [key for key, kind in SHARD_KEYS.items() if not isinstance(shard, dict) or
               not isinstance(shard.get(key), kind)]
        if bad:
            problems.append(f"manifest shard #{i}: key(s) {', '.join(bad)} missing or of the wrong type")
            continue
        removed = shard["removed"]
        if len(set(removed)) != len(removed) or any(not isinstance(r, int) or not 0 <= r < shard["rows"]
                                                    for r in removed):
            problems.append(f"manifest shard {shard['name']}: tombstones out of range or repeated")
            continue
        live += shard["rows"] - len(removed)
    if not problems and live != manifest["count"]:
        problems.append(f"manifest count {manifest['count']} but its shards hold {live} live rows")
    return problems


class FeatureStore:
    """Read and append to a store directory. Not thread-safe; writers hold a lock
    (see :mod:`cbir_cli.locking`)."""

    def __init__(self, root: Path, manifest: dict[str, Any]) -> None:
        self.root = root
        self.manifest = manifest
        # What is on disk: commit() writes nothing when the manifest still equals it,
        # so a re-run that changes nothing keeps the generation (and the saved index).
        self._committed: dict[str, Any] | None = copy.deepcopy(manifest)
        self._rows_cache: dict[str, list[Row]] = {}

    # -- opening -----------------------------------------------------------

    @staticmethod
    def exists(root: str | os.PathLike[str]) -> bool:
        return (Path(root) / MANIFEST).is_file()

    @classmethod
    def open(cls, root: str | os.PathLike[str], check_files: bool = True) -> FeatureStore:
        """Open the committed state. Fails (``CorruptStoreError``) on a malformed
        manifest and, with ``check_files``, on shard files that are missing or of the
        wrong size; contents are verified against their checksums when read."""
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
            raise CorruptStoreError(f"{path}: unreadable manifest ({exc}); {REPAIR_HINT}") from None
        problems = manifest_problems(manifest)
        if problems:
            raise CorruptStoreError(f"{path}: {problems[0]}; {REPAIR_HINT}")
        store = cls(root, manifest)
        if check_files:
            problems = store.file_problems()
            if problems:
                raise CorruptStoreError(f"{problems[0]}; {REPAIR_HINT}")
        return store

    @classmethod
    def create(cls, root: str | os.PathLike[str], fingerprint: dict[str, Any], generation: int = 0) -> FeatureStore:
        """A new empty store. ``generation``: where the previous store (if any) stopped,
        so a search index saved for it can never look current for the new one."""
        root = Path(root).expanduser()
        (root / SHARDS_DIR).mkdir(parents=True, exist_ok=True)
        now = time.time()
        manifest = {
            "format": FORMAT_VERSION,
            "generation": generation,
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
        store._committed = None
        store.commit()
        return store

    def successor(self, fingerprint: dict[str, Any]) -> FeatureStore:
        """An empty store to replace this one (``--rebuild``), not yet committed.

        Its shards get new names (numbering continues) and its manifest is written
        only by its first :meth:`commit`, which then also deletes this store's
        files: until that moment readers keep the complete previous index. Callers
        must not commit it before it is complete."""
        fresh = dict(self.manifest)
        fresh.update({"fingerprint": fingerprint, "shards": [], "count": 0, "skipped": {},
                      "created": time.time()})
        fresh.pop("weights_path", None)
        store = type(self)(self.root, fresh)
        store._committed = self._committed
        return store

    @classmethod
    def open_or_create(cls, root: str | os.PathLike[str], fingerprint: dict[str, Any]) -> FeatureStore:
        if cls.exists(root):
            store = cls.open(root)
            if store.count == 0 and not store.manifest["shards"] and store.fingerprint != fingerprint:
                # An empty store (a first run that failed before embedding anything)
                # does not pin a model.
                return cls.create(root, fingerprint, store.generation)
            check_fingerprint(store.fingerprint, fingerprint, Path(root))
            return store
        return cls.create(root, fingerprint)

    def changed_on_disk(self) -> bool:
        """Whether a writer committed since this store was opened: a reader that
        met a missing or mismatching file then retries on the new state instead of
        calling the index damaged."""
        try:
            on_disk = json.loads((self.root / MANIFEST).read_text(encoding="ascii"))
            return not isinstance(on_disk, dict) or on_disk.get("generation") != self.generation
        except (OSError, ValueError):
            return True

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

    def shard_paths(self, shard: dict[str, Any]) -> tuple[Path, Path]:
        """The vectors file and the rows file of a manifest shard entry."""
        name = shard["name"]
        return self.shards_dir / f"{name}.npy", self.shards_dir / f"{name}.rows.json"

    def shard_file_problems(self, shard: dict[str, Any]) -> list[str]:
        """Cheap checks (one stat per file, no reading): both files of a shard exist
        and have the sizes the manifest recorded."""
        problems = []
        for path, size_key in zip(self.shard_paths(shard), ("bytes", "rows_bytes")):
            try:
                size = path.stat().st_size
            except OSError as exc:
                problems.append(f"{path}: missing or unreadable ({exc.strerror or exc})")
                continue
            if size_key in shard and size != shard[size_key]:
                problems.append(f"{path}: {size} bytes, manifest says {shard[size_key]} (truncated or replaced)")
        return problems

    def file_problems(self) -> list[str]:
        """:meth:`shard_file_problems` of every shard the manifest names."""
        return [p for shard in self.manifest["shards"] for p in self.shard_file_problems(shard)]

    def shard_rows(self, shard: dict[str, Any]) -> list[Row]:
        name = shard["name"]
        rows = self._rows_cache.get(name)
        if rows is None:
            _, path = self.shard_paths(shard)
            try:
                data = path.read_bytes()
                if "rows_sha256" in shard and bytes_sha256(data) != shard["rows_sha256"]:
                    raise ValueError("checksum mismatch, damaged or replaced")
                rows = [Row(**r) for r in json.loads(data.decode("ascii"))]
            except (OSError, ValueError, TypeError) as exc:
                raise CorruptStoreError(f"{path}: unreadable ({exc}); {REPAIR_HINT}") from None
            if len(rows) != shard["rows"]:
                raise CorruptStoreError(f"{path}: {len(rows)} rows, manifest says {shard['rows']}; {REPAIR_HINT}")
            self._rows_cache[name] = rows
        return rows

    def live_rows(self) -> list[Row]:
        """All live rows, in shard order: the row order of :meth:`load_vectors`."""
        out: list[Row] = []
        for shard in self.manifest["shards"]:
            removed = set(shard["removed"])
            out.extend(r for i, r in enumerate(self.shard_rows(shard)) if i not in removed)
        return out

    def rows_by_path(self) -> dict[str, Row]:
        return {r.path: r for r in self.live_rows()}

    def read_shard(self, shard: dict[str, Any], mmap: bool) -> np.ndarray:
        """A shard's vectors. A full read is checked against the manifest's sha256
        (a flipped bit must not be served); ``mmap`` (for a few rows) checks shape only."""
        import io

        import numpy as np

        path, _ = self.shard_paths(shard)
        try:
            if mmap:
                arr = np.load(path, mmap_mode="r", allow_pickle=False)
            else:
                data = path.read_bytes()
                if bytes_sha256(data) != shard["sha256"]:
                    raise ValueError("checksum mismatch, damaged or replaced")
                arr = np.load(io.BytesIO(data), allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise CorruptStoreError(f"{path}: unreadable shard ({exc}); {REPAIR_HINT}") from None
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
            arr = self.read_shard(shard, mmap)
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
            ids = [r.id for r in self.shard_rows(shard)]
            hits = [i for i, rid in enumerate(ids) if rid in wanted]
            if hits:
                arr = self.read_shard(shard, mmap=True)
                for i in hits:
                    out[ids[i]] = np.array(arr[i])
        return out

    # -- writing -----------------------------------------------------------

    def add_shard(self, vectors: np.ndarray, items: Sequence[tuple[str, str, int]]) -> list[Row]:
        """Write a new shard for ``items`` = (path, sha256, size), rows aligned with
        ``vectors``. Live rows with the same paths are tombstoned (replaced). The change
        is durable only after :meth:`commit`.

        The in-memory manifest changes in one assignment at the end, so a Ctrl-C
        (KeyboardInterrupt) anywhere in here leaves it as it was and a retry cannot
        register the shard twice."""
        import numpy as np

        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape != (len(items), self.dim):
            raise ValueError(f"vectors shape {vectors.shape} does not match {len(items)} rows of dim {self.dim}")
        if len({path for path, _, _ in items}) != len(items):
            raise ValueError("a shard cannot hold the same path twice")
        name = f"shard-{self.manifest['next_shard']:06d}"
        first_id = int(self.manifest["next_id"])
        rows = [Row(first_id + i, path, sha, size) for i, (path, sha, size) in enumerate(items)]
        data = npy_bytes(vectors)
        rows_data = json_bytes([asdict(r) for r in rows])
        self.shards_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.shards_dir / f"{name}.npy", data)
        atomic_write_bytes(self.shards_dir / f"{name}.rows.json", rows_data)
        self._rows_cache[name] = rows
        shards, _ = self._without_paths({r.path for r in rows})
        shard = {"name": name, "rows": len(rows), "sha256": bytes_sha256(data), "bytes": len(data),
                 "rows_sha256": bytes_sha256(rows_data), "rows_bytes": len(rows_data), "removed": []}
        skipped = {p: v for p, v in self.manifest["skipped"].items() if p not in {r.path for r in rows}}
        self.manifest = {**self.manifest, "shards": [*shards, shard], "next_shard": self.manifest["next_shard"] + 1,
                         "next_id": first_id + len(rows), "skipped": skipped}
        return rows

    def _without_paths(self, targets: set[str]) -> tuple[list[dict[str, Any]], int]:
        """The manifest's shard list with the live rows of ``targets`` tombstoned
        (new dicts; the manifest is not touched) and how many rows that removed."""
        removed = 0
        shards = []
        for shard in self.manifest["shards"]:
            gone = set(shard["removed"])
            hits = {i for i, r in enumerate(self.shard_rows(shard)) if i not in gone and r.path in targets}
            if not hits:
                shards.append(shard)
                continue
            removed += len(hits)
            gone |= hits
            if len(gone) < shard["rows"]:
                shards.append({**shard, "removed": sorted(gone)})
        return shards, removed

    def remove_paths(self, paths: Iterable[str]) -> int:
        """Tombstone the live rows of ``paths``; returns how many were removed."""
        targets = set(paths)
        if not targets:
            return 0
        shards, removed = self._without_paths(targets)
        self.manifest = {**self.manifest, "shards": shards}
        return removed

    def record_skipped(self, path: str, sha256: str, reason: str) -> None:
        """Remember a file that could not be embedded, so an unchanged copy is not
        decoded again on the next run (it is reported as skipped again)."""
        self.manifest["skipped"][path] = {"sha256": sha256, "reason": reason}

    def forget_skipped(self, paths: Iterable[str]) -> None:
        for p in paths:
            self.manifest["skipped"].pop(p, None)

    def commit(self) -> bool:
        """Make everything written so far durable: the manifest is replaced
        atomically, then files it no longer names are deleted. Returns False (and
        writes nothing) when nothing changed since the last commit."""
        if self.manifest == self._committed:
            self.collect_garbage()  # leftovers of a killed run go even if nothing changed
            return False
        manifest = {
            **self.manifest,
            "generation": self.generation + 1,
            "updated": time.time(),
            "count": sum(s["rows"] - len(s["removed"]) for s in self.manifest["shards"]),
            "versions": library_versions(),
        }
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.root / MANIFEST, manifest)
        self.manifest = manifest
        self._committed = copy.deepcopy(manifest)
        self.collect_garbage()
        return True

    def leftover_files(self) -> list[Path]:
        """Files the committed manifest does not name: shards of an interrupted or
        dropped write, and temporaries of an interrupted atomic write. Harmless
        (never read) and removed by the next commit."""
        live = {s["name"] for s in self.manifest["shards"]}
        out = []
        if self.shards_dir.is_dir():
            for path in self.shards_dir.iterdir():
                stem = path.name.removesuffix(".npy").removesuffix(".rows.json")
                if path.name.startswith(".") or stem not in live:
                    out.append(path)
        for folder in (self.root, self.root / "index"):
            if folder.is_dir():
                out.extend(p for p in folder.iterdir() if p.name.startswith(".") and TMP_MARK in p.name)
        return sorted(out)

    def collect_garbage(self) -> list[Path]:
        """Delete :meth:`leftover_files` (only writers, holding the lock, call this)."""
        deleted = []
        for path in self.leftover_files():
            try:
                path.unlink()
                deleted.append(path)
            except OSError:
                pass
        live = {s["name"] for s in self.manifest["shards"]}
        for name in list(self._rows_cache):
            if name not in live:
                del self._rows_cache[name]
        return deleted
