"""The feature store: ``.npy`` shards of vectors (float32, or float16 where the
store was made so: :mod:`.shard_format`), the rows they belong to, and a JSON
manifest -- a checkpoint -- plus a log of the commits after it (layout:
:mod:`.manifest`; commits: :mod:`.commit_log`).

Shards are immutable once written. Removing or replacing an image tombstones its
row in the manifest; a shard whose rows are all gone is dropped. Every file is
written to a temporary name, fsynced and renamed, and only then does a commit
name it, so a crash at any moment leaves the last committed state intact; files no
commit names are leftovers and are removed by the next writer (at its start, its
checkpoints and its end: not per commit, which would list every shard each time).

A commit writes only what changed since the last one (:class:`.commit_log.Changes`,
kept as the store is changed: no copy or comparison of the whole manifest) and
``count`` is kept in step, so a commit costs the same at 10M rows as at 10k.

The manifest records each shard's size and the sha256 of both of its files, so a
damaged or swapped file is detected when it is read (and by ``cbir check``) and is
never served.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CbirError, CorruptStoreError
from ..fsutil import atomic_write_bytes, bytes_sha256, json_bytes, npy_bytes
from .commit_log import Changes, read_state, top_keys
from .committing import Committing
from .ids import repaired_ids
from .live_paths import LivePaths
from .manifest import (
    FORMAT_VERSION,
    MANIFEST,
    SHARDS_DIR,
    Row,
    check_fingerprint,
    library_versions,
    parse_rows,
)
from .row_catalog import RowCatalog
from .shard_format import DEFAULT_SHARD_DTYPE, MANIFEST_KEY, encode, read_shard_file, shard_dtype_of, to_float32
from .validity import invalid_rows

if TYPE_CHECKING:
    import numpy as np


# A shard's two files: name suffix, and the manifest keys of their size and checksum.
SHARD_FILES = ((".npy", "bytes", "sha256"), (".rows.json", "rows_bytes", "rows_sha256"))

class FeatureStore(Committing):
    """Read and append to a store directory. Not thread-safe; writers hold a lock
    (see :mod:`.transaction`)."""

    def __init__(self, root: Path, manifest: dict[str, Any], checkpoint: int | None = None) -> None:
        self.root = root
        self.manifest = manifest
        # commit() writes nothing when nothing changed (so a re-run that changes
        # nothing keeps the generation and the saved index): what changed since the
        # last commit, and the tracked top-level keys as committed.
        self._changes = Changes()
        self._top: dict[str, Any] | None = top_keys(manifest) if "generation" in manifest else None
        self._positions: dict[str, int] | None = None  # shard name -> index in manifest["shards"]
        # The shard list as this object's methods left it: one assigned from outside
        # (a caller replacing the manifest) is reconciled by :meth:`positions`.
        self._known: list[dict[str, Any]] = manifest.get("shards", [])
        # The generation manifest.json (the checkpoint) is at; the log holds the rest.
        self.checkpoint_generation = manifest.get("generation", 0) if checkpoint is None else checkpoint
        # Log entries not replayed (never committed: .commit_log); None once the
        # first log entry this object wrote removed them.
        self.log_ignored: list[str] | None = []
        self._committed_count = int(manifest.get("count", 0))
        self._rewrite = False  # the next commit must write a whole checkpoint (a rebuild's first)
        self.last_commit_bytes = 0  # what the last commit wrote (log entry or checkpoint)
        self._rows_cache: dict[str, list[Row]] = {}
        # Where each live path's row is: in memory, or the on-disk catalog once a
        # writer attaches it (:meth:`attach_catalog`).
        self._live_paths: LivePaths | RowCatalog = LivePaths()
        # The staging folder of the run writing now (:mod:`.staging`): not a leftover.
        self.active_staging: Path | None = None
        # Shards whose checksum was verified by a full read in this process.
        self.verified: set[str] = set()
        self._ids_checked = False  # ensure_next_id() ran

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
        state, checkpoint, ignored = read_state(root)
        store = cls(root, state, checkpoint)
        store.log_ignored = ignored
        if check_files:
            problems = store.file_problems()
            if problems:
                raise CorruptStoreError(problems[0])
        return store

    @classmethod
    def create(cls, root: str | os.PathLike[str], fingerprint: dict[str, Any], generation: int = 0,
               shard_dtype: str = DEFAULT_SHARD_DTYPE) -> FeatureStore:
        """A new empty store, written by its first :meth:`commit` that has vectors to
        commit (a run that stores nothing leaves no manifest behind, so it pins no
        model). ``generation``: where a previous store (if any) stopped, so a search
        index saved for it can never look current for the new one. ``shard_dtype``:
        how its shards keep vectors (:mod:`.shard_format`)."""
        now = time.time()
        manifest = {
            "format": FORMAT_VERSION,
            "generation": generation,
            "fingerprint": fingerprint,
            MANIFEST_KEY: shard_dtype,
            "versions": library_versions(),
            "created": now,
            "updated": now,
            "next_id": 0,
            "next_shard": 1,
            "shards": [],
            "count": 0,
            "skipped": {},
        }
        store = cls(Path(root).expanduser(), manifest)
        store._top = None
        return store

    def successor(self, fingerprint: dict[str, Any], shard_dtype: str | None = None) -> FeatureStore:
        """An empty store to replace this one (a rebuild), not yet committed.

        Its shards get new names (numbering continues) and its manifest is written
        only by its first :meth:`commit`, which then also deletes this store's
        files: until that moment readers keep the complete previous index. Callers
        must not commit it before it is complete. ``shard_dtype``: its shards' (default:
        this store's)."""
        with contextlib.suppress(CorruptStoreError):  # a damaged rows file: the rebuild replaces it
            self.ensure_next_id()  # the successor's ids continue above every stored one
        fresh = dict(self.manifest)
        fresh.update({"fingerprint": fingerprint, "shards": [], "count": 0, "skipped": {},
                      "created": time.time(), MANIFEST_KEY: shard_dtype or self.shard_dtype})
        fresh.pop("weights_path", None)
        store = type(self)(self.root, fresh, self.checkpoint_generation)
        store._top = self._top
        store._committed_count = self._committed_count
        store._rewrite = True  # its first commit replaces everything: a checkpoint
        return store

    def for_fingerprint(self, fingerprint: dict[str, Any]) -> FeatureStore:
        """This store, checked to hold vectors comparable with ``fingerprint``
        (:class:`StoreMismatchError` otherwise). A store that holds nothing (an
        empty manifest left by an older version's failed first run) pins no model:
        a new store takes its place."""
        if self.count == 0 and not self.manifest["shards"] and self.fingerprint != fingerprint:
            return type(self).create(self.root, fingerprint, self.generation, self.shard_dtype)
        check_fingerprint(self.fingerprint, fingerprint, self.root)
        return self

    @classmethod
    def open_or_create(cls, root: str | os.PathLike[str], fingerprint: dict[str, Any]) -> FeatureStore:
        if cls.exists(root):
            return cls.open(root).for_fingerprint(fingerprint)
        return cls.create(root, fingerprint)

    def changed_on_disk(self) -> bool:
        """Whether a writer committed since this store was opened: a reader that
        met a missing or mismatching file then retries on the new state instead of
        calling the index damaged."""
        try:
            return read_state(self.root)[0]["generation"] != self.generation
        except CbirError:
            return True

    # -- reading -----------------------------------------------------------

    @property
    def fingerprint(self) -> dict[str, Any]:
        return self.manifest["fingerprint"]

    @property
    def dim(self) -> int:
        return int(self.fingerprint["dim"])

    @property
    def shard_dtype(self) -> str:
        """How the shards keep vectors: float32 or float16 (:mod:`.shard_format`)."""
        return shard_dtype_of(self.manifest)

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
        """:meth:`shard_file_problems` of every shard the manifest names (a reader's
        open runs this: one ``stat`` per file by name, ~20k files at 10M rows; a
        shard is looked at closely only when a size is off or a file missing)."""
        folder = os.fspath(self.shards_dir)
        problems = []
        for shard in self.manifest["shards"]:
            for suffix, size_key, _ in SHARD_FILES:
                try:
                    size = os.stat(os.path.join(folder, shard["name"] + suffix)).st_size
                except OSError:
                    size = -1
                if size < 0 or (size_key in shard and size != shard[size_key]):
                    problems += self.shard_file_problems(shard)
                    break
        return problems

    def shard_rows(self, shard: dict[str, Any], cache: bool = True) -> list[Row]:
        """A shard's rows; ``cache=False`` (reading a large store once, compactly)
        keeps no Row objects here."""
        name = shard["name"]
        rows = self._rows_cache.get(name)
        if rows is None:
            _, path = self.shard_paths(shard)
            try:
                data = path.read_bytes()
                if "rows_sha256" in shard and bytes_sha256(data) != shard["rows_sha256"]:
                    raise ValueError("checksum mismatch, damaged or replaced")
                rows = parse_rows(data)
            except (OSError, ValueError) as exc:
                raise CorruptStoreError(f"{path}: unreadable ({exc})") from None
            if len(rows) != shard["rows"]:
                raise CorruptStoreError(f"{path}: {len(rows)} rows, manifest says {shard['rows']}")
            if cache:
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

    def rows_by_sha(self, shas: Iterable[str]) -> dict[str, Row]:
        """sha256 -> a live row of that content, for each of ``shas`` stored (from
        the row catalog where attached: no read of every rows file)."""
        self.positions()
        return self._live_paths.rows_by_sha(self.manifest["shards"], self.shard_rows, shas)

    def attach_catalog(self) -> None:
        """Find rows through the on-disk row catalog (:mod:`.row_catalog`) from now
        on (a writer, on a committed store, before changing it)."""
        if self.committed and not self._changes and isinstance(self._live_paths, LivePaths):
            catalog = RowCatalog.attach(self.root, self.manifest)
            if catalog is None:
                return
            try:
                # O(rows) once, when it is stale; the rows are not kept (10M Row objects: GBs).
                catalog.build(self.manifest, lambda shard: self.shard_rows(shard, cache=False))
            except CorruptStoreError:
                catalog.close()  # a damaged rows file: the writer's repair comes first; next run builds it
                return
            self._live_paths = catalog

    def release(self) -> None:
        """Close the row catalog (uncommitted changes in it roll back)."""
        self._live_paths.close()
        self._live_paths = LivePaths()

    def read_shard(self, shard: dict[str, Any], mmap: bool) -> np.ndarray:
        """A shard's vectors: a full read is checked against the manifest's sha256
        (a flipped bit must not be served) and is float32; ``mmap`` (for a few rows)
        checks shape and dtype only and maps the rows as stored (:attr:`shard_dtype`)."""
        path, _ = self.shard_paths(shard)
        arr = read_shard_file(path, None if mmap else shard["sha256"], (shard["rows"], self.dim), self.shard_dtype)
        if not mmap:
            self.verified.add(shard["name"])
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
            parts.append(to_float32(arr))
        if not parts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.concatenate(parts, axis=0) if len(parts) > 1 else np.array(parts[0])

    def vectors_for(self, rows: Iterable[Row]) -> dict[int, np.ndarray]:
        """Vectors of specific live rows by id, to reuse for a moved or copied file.

        Only from shards whose checksum was verified in this process (read in full
        now if not yet), and only valid vectors (:mod:`.validity`): a row missing from
        the answer must be embedded again. A damaged shard is never a source."""
        import numpy as np

        wanted = {r.path: r.id for r in rows}
        found: dict[str, list[int]] = {}
        for name, row in self._live_paths.locate(self.manifest["shards"], self.shard_rows, wanted).values():
            found.setdefault(name, []).append(row)
        out: dict[int, np.ndarray] = {}
        positions = self.positions()
        for name, rows_hit in found.items():
            shard = self.manifest["shards"][positions[name]]
            ids = [r.id for r in self.shard_rows(shard)]
            hits = sorted(i for i in rows_hit if ids[i] in wanted.values())
            if not hits:
                continue
            try:
                arr = self.read_shard(shard, mmap=shard["name"] in self.verified)
            except CorruptStoreError:
                continue
            picked = np.array(arr[hits], dtype=np.float32)
            for i, vector, bad in zip(hits, picked, invalid_rows(picked)):
                if not bad:
                    out[ids[i]] = vector
        return out

    # -- writing -----------------------------------------------------------

    def add_shard(self, vectors: np.ndarray, items: Sequence[tuple[str, str, int]]) -> list[Row]:
        """Write a new shard for ``items`` = (path, sha256, size), rows aligned with
        ``vectors``. Live rows with the same paths are tombstoned (replaced). The change
        is durable only after :meth:`commit`."""
        vectors = encode(vectors, self.shard_dtype)  # checked as stored: float16 rounds
        if vectors.ndim != 2 or vectors.shape != (len(items), self.dim):
            raise ValueError(f"vectors shape {vectors.shape} does not match {len(items)} rows of dim {self.dim}")
        if invalid_rows(vectors).any():
            # Every writer comes through here (or staging.write_part, which refuses
            # the same): nothing can store a vector that would poison searches (see
            # .validity); the transaction filters them out first.
            raise ValueError(f"refusing to store {int(invalid_rows(vectors).sum())} invalid vector(s)")
        name = self.next_shard_name()
        data = npy_bytes(vectors, self.shard_dtype)
        self.shards_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.shards_dir / f"{name}.npy", data)
        return self.register_shard(name, items, bytes_sha256(data), len(data))

    def next_shard_name(self) -> str:
        """The name the next shard gets (its files: :meth:`shard_paths`)."""
        return f"shard-{self.manifest['next_shard']:06d}"

    def register_shard(self, name: str, items: Sequence[tuple[str, str, int]], sha256: str,
                       nbytes: int) -> list[Row]:
        """Give ``items`` ids, write the rows file beside ``shards/<name>.npy`` (of that
        sha256 and size), add the shard to the manifest (in one assignment, at the end)."""
        if name != self.next_shard_name() or len({path for path, _, _ in items}) != len(items):
            raise ValueError(f"shard {name}: not the next shard, or holds the same path twice")
        self.ensure_next_id()
        first_id = int(self.manifest["next_id"])
        rows = [Row(first_id + i, path, sha, size) for i, (path, sha, size) in enumerate(items)]
        rows_data = json_bytes([{"id": r.id, "path": r.path, "sha256": r.sha256, "size": r.size} for r in rows])
        atomic_write_bytes(self.shards_dir / f"{name}.rows.json", rows_data)
        self._rows_cache[name] = rows
        paths = {r.path for r in rows}
        self.positions()
        self._tombstone(self._live_paths.rows_of(self.manifest["shards"], self.shard_rows, paths))
        shard = {"name": name, "rows": len(rows), "sha256": sha256, "bytes": nbytes,
                 "rows_sha256": bytes_sha256(rows_data), "rows_bytes": len(rows_data), "removed": [],
                 "max_id": rows[-1].id}
        self.forget_skipped(p for p in paths if p in self.manifest["skipped"])
        positions = self.positions()
        positions[name] = len(self.manifest["shards"])
        self._changes.added(name)
        self._set([*self.manifest["shards"], shard], next_shard=self.manifest["next_shard"] + 1,
                  next_id=first_id + len(rows), count=self.count + len(rows))
        self._live_paths.moved(paths, (name, rows))
        return rows

    def ensure_next_id(self, every_row: bool = False) -> str | None:
        """Raise ``next_id`` above every stored id (:func:`.ids.repaired_ids`), once per
        store object, before ids are given out; returns what was repaired, or None.
        ``every_row``: read every rows file (a repair); a writer reads only those of
        shards whose recorded ``max_id`` is missing or not below ``next_id``."""
        if self._ids_checked:
            return None
        self._ids_checked = True
        repaired, note = repaired_ids(self.manifest, self.shard_rows, self.root / MANIFEST, not every_row)
        if note:
            self.set_shards(repaired["shards"])
            self.manifest["next_id"] = repaired["next_id"]
        return note
