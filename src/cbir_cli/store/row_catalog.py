"""The row catalog: where each live row is, on disk, so that a writer finds the
rows of given paths (to replace or remove them) or of given contents (to reuse a
stored vector) without reading every rows file of the store.

``rows.sqlite`` (SQLite, from the standard library): path -> (id, sha256, size,
shard, row) of every live row, indexed by sha256. Derived, never the source of
truth (like the stat cache): it is stamped with the state it reflects (the store's
``created`` time and generation); a catalog that is missing, unreadable or stamped
with any other state is brought up to date at first use: from the commit log when
it holds every commit since the catalog's generation (O(what changed): a crash
between the store's commit and the catalog's leaves it one commit behind), else
rebuilt from the rows files -- once, O(rows); after that each writer keeps it in step: its changes go into one SQLite
transaction that is committed, with the new stamp, right after the store's own
commit (so a crash between the two leaves a stale stamp, never a wrong catalog).
WAL journal, ``synchronous=NORMAL``: an interrupted catalog commit rolls back.

The in-memory :class:`~.live_paths.LivePaths` has the same interface and serves
stores that have no committed state to catalog (a new store, a rebuild's successor).
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from .manifest import Row

CATALOG = "rows.sqlite"
Shard = dict[str, Any]
_CHUNK = 500  # host parameters per query (SQLite allows 999 at least)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS rows (path BLOB PRIMARY KEY, id INTEGER NOT NULL, sha256 TEXT NOT NULL,
                                 size INTEGER NOT NULL, shard TEXT NOT NULL, row INTEGER NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS rows_by_sha ON rows (sha256);
CREATE INDEX IF NOT EXISTS rows_by_shard ON rows (shard, row);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


def _key(path: str) -> bytes:
    # Paths may hold lone surrogates (non-UTF-8 file names): kept byte-exact.
    return path.encode("utf-8", "surrogatepass")


def _chunks(values: Sequence[Any]) -> Iterable[Sequence[Any]]:
    for i in range(0, len(values), _CHUNK):
        yield values[i:i + _CHUNK]


def stamp_of(manifest: dict[str, Any]) -> str:
    """Which state a catalog reflects."""
    return f"{manifest.get('created')!r}:{manifest['generation']}"


class RowCatalog:
    """See the module docstring. Changes are kept in an open SQLite transaction
    until :meth:`committed`."""

    def __init__(self, path: Path, stamp: str) -> None:
        self.path = path
        # The pipeline's writer thread adds shards the main thread opened the store
        # for; the store is used by one thread at a time (its callers serialise).
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.executescript(_SCHEMA)
        found = self._conn.execute("SELECT value FROM meta WHERE key = 'stamp'").fetchone()
        self._stale = found is None or found[0] != stamp
        self._found_stamp, self._stamp = (found[0] if found else None), stamp
        self._conn.execute("BEGIN")
        self.rebuilt = False  # whether this object rebuilt it (tests, the bench)
        self.caught_up = False  # whether it was brought up to date from the log

    @classmethod
    def attach(cls, root: Path, manifest: dict[str, Any]) -> RowCatalog | None:
        """The catalog of the committed state ``manifest`` of the store at ``root``
        (rebuilt at first use if stale); None when SQLite cannot keep one there."""
        path = root / CATALOG
        for _ in range(2):
            try:
                return cls(path, stamp_of(manifest))
            except sqlite3.Error:
                for suffix in ("", "-wal", "-shm"):  # unreadable: derived, so started afresh
                    with contextlib.suppress(OSError):
                        path.with_name(path.name + suffix).unlink()
        return None

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._conn.rollback()
        self._conn.close()

    def build(self, manifest: dict[str, Any], shard_rows: Callable[[Shard], list[Row]]) -> None:
        """Rebuild a stale catalog from the committed state ``manifest`` now, and
        commit it stamped (before the writer changes anything)."""
        self._fresh(manifest["shards"], shard_rows)
        self.committed(manifest)

    def _fresh(self, shards: Sequence[Shard], shard_rows: Callable[[Shard], list[Row]]) -> None:
        if not self._stale:
            return
        if self._catch_up(shards, shard_rows):
            self._stale, self.caught_up = False, True
            return
        self._conn.execute("DELETE FROM rows")
        self._conn.execute("DELETE FROM meta")
        for shard in shards:
            removed = set(shard["removed"])
            name = shard["name"]
            self._conn.executemany("INSERT OR REPLACE INTO rows VALUES (?, ?, ?, ?, ?, ?)",
                                   ((_key(r.path), r.id, r.sha256, r.size, name, i)
                                    for i, r in enumerate(shard_rows(shard)) if i not in removed))
        self._stale, self.rebuilt = False, True

    def _catch_up(self, shards: Sequence[Shard], shard_rows: Callable[[Shard], list[Row]]) -> bool:
        """Apply the log entries after the catalog's generation (the module
        docstring); False, with nothing changed, when the log lacks any of them."""
        from .commit_log import entry_path

        if self._found_stamp is None:
            return False
        created, _, generation = self._found_stamp.rpartition(":")
        want_created, _, want = self._stamp.rpartition(":")
        if created != want_created or not generation.isdigit() or not want.isdigit() or int(generation) > int(want):
            return False
        entries = []
        for g in range(int(generation) + 1, int(want) + 1):
            try:
                entry = json.loads(entry_path(self.path.parent, g).read_bytes())
            except (OSError, ValueError):
                return False  # held by a checkpoint now (or never readable): rebuild
            if not isinstance(entry, dict) or not isinstance(entry.get("shards"), list) or \
                    not isinstance(entry.get("dropped"), list):
                return False
            entries.append(entry)
        current = {shard["name"]: shard for shard in shards}
        added: dict[str, Shard] = {}
        for entry in entries:
            for name in entry["dropped"]:
                self._conn.execute("DELETE FROM rows WHERE shard = ?", (name,))
                added.pop(name, None)
            for shard in entry["shards"]:
                name = shard["name"]
                known = name not in added and self._conn.execute(
                    "SELECT 1 FROM rows WHERE shard = ? LIMIT 1", (name,)).fetchone() is not None
                if known:  # new tombstones in a shard the catalog holds
                    self._conn.executemany("DELETE FROM rows WHERE shard = ? AND row = ?",
                                           ((name, int(r)) for r in shard["removed"]))
                else:
                    added[name] = shard
        for name in added:
            shard = current.get(name)
            if shard is None:
                continue  # dropped since
            removed = set(shard["removed"])
            self._conn.executemany("INSERT OR REPLACE INTO rows VALUES (?, ?, ?, ?, ?, ?)",
                                   ((_key(r.path), r.id, r.sha256, r.size, name, i)
                                    for i, r in enumerate(shard_rows(shard)) if i not in removed))
        return True

    def rows_of(self, shards: Sequence[Shard], shard_rows: Callable[[Shard], list[Row]],
                paths: Iterable[str]) -> dict[str, set[int]]:
        """Shard name -> the live row numbers holding any of ``paths``."""
        self._fresh(shards, shard_rows)
        hits: dict[str, set[int]] = {}
        for chunk in _chunks([_key(p) for p in paths]):
            marks = ",".join("?" * len(chunk))
            for shard, row in self._conn.execute(f"SELECT shard, row FROM rows WHERE path IN ({marks})", chunk):
                hits.setdefault(shard, set()).add(row)
        return hits

    def rows_by_sha(self, shards: Sequence[Shard], shard_rows: Callable[[Shard], list[Row]],
                    shas: Iterable[str]) -> dict[str, Row]:
        """sha256 -> a live row of that content (one of them)."""
        self._fresh(shards, shard_rows)
        out: dict[str, Row] = {}
        for chunk in _chunks(list(set(shas))):
            marks = ",".join("?" * len(chunk))
            for path, rid, sha, size in self._conn.execute(
                    f"SELECT path, id, sha256, size FROM rows WHERE sha256 IN ({marks})", chunk):
                out[sha] = Row(rid, path.decode("utf-8", "surrogatepass"), sha, size)
        return out

    def locate(self, shards: Sequence[Shard], shard_rows: Callable[[Shard], list[Row]],
               paths: Iterable[str]) -> dict[str, tuple[str, int]]:
        """path -> (shard name, row number) of the live rows of ``paths``."""
        self._fresh(shards, shard_rows)
        out: dict[str, tuple[str, int]] = {}
        for chunk in _chunks([_key(p) for p in paths]):
            marks = ",".join("?" * len(chunk))
            for path, shard, row in self._conn.execute(
                    f"SELECT path, shard, row FROM rows WHERE path IN ({marks})", chunk):
                out[path.decode("utf-8", "surrogatepass")] = (shard, row)
        return out

    def moved(self, gone: Iterable[str], added: tuple[str, list[Row]] | None = None) -> None:
        """Record a change just made to the store (as :meth:`LivePaths.moved`)."""
        if self._stale:
            return  # rebuilt from the state at the next lookup
        self._conn.executemany("DELETE FROM rows WHERE path = ?", ((_key(p),) for p in gone))
        if added is not None:
            name, rows = added
            self._conn.executemany("INSERT OR REPLACE INTO rows VALUES (?, ?, ?, ?, ?, ?)",
                                   ((_key(r.path), r.id, r.sha256, r.size, name, i) for i, r in enumerate(rows)))

    def invalidate(self) -> None:
        """The shard list was changed in memory (a repair dropped shards): rebuilt
        from it at the next lookup (the log knows nothing of that change)."""
        self._stale, self._found_stamp = True, None

    def committed(self, manifest: dict[str, Any]) -> None:
        """The store just committed ``manifest``: commit the catalog's changes with
        its stamp (a stale catalog stays unstamped until rebuilt)."""
        try:
            if not self._stale:
                self._conn.execute("INSERT OR REPLACE INTO meta VALUES ('stamp', ?)", (stamp_of(manifest),))
            self._conn.execute("COMMIT")
            self._conn.execute("BEGIN")
        except sqlite3.Error:
            self._stale = True  # a full disk...: rebuilt next time
