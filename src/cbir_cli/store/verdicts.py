"""Checksums of the large derived files a reader loads (the saved search index,
the DBA vectors), verified once per change of the file instead of once per open.

A one-shot ``cbir query`` is a new process each time, so the verdict must outlive
the process: ``verified.json`` beside the files remembers, per file name, the
sha256 the file had when its ``(size, mtime_ns, ctime_ns, inode)`` stamp was what
it is now (the rule of :mod:`cbir_cli.pipeline.statcache` for images). Any write,
``touch``, rename over it or restore changes the stamp, and the file is hashed
again. A verdict is only kept when the file was last changed more than
:data:`RACY_SECONDS` before hashing began (a write in the same timestamp tick
could otherwise go unseen) and the stamp did not change while it was hashed.

The record is best effort: written atomically, ignored when missing, unreadable
or unwritable (a read-only index is hashed on every open, as before). It holds
hashes only, never a verdict about what they should be: the caller's meta file
says that. ``cbir check`` does not use it: it hashes everything itself.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from ..errors import CorruptStoreError
from ..fsutil import atomic_write_bytes, atomic_write_json, file_sha256

VERDICTS = "verified.json"
FORMAT = 1
RACY_SECONDS = 2.0

Stamp = tuple[int, int, int, int]  # size, mtime_ns, ctime_ns, inode


def stamp_of(st: os.stat_result) -> Stamp:
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino


def file_stamp(path: Path) -> Stamp:
    """The file's stamp; :class:`CorruptStoreError` when it cannot be read."""
    try:
        return stamp_of(os.stat(path))
    except OSError as exc:
        raise CorruptStoreError(f"{path}: unreadable ({exc.strerror or exc})") from None


def _entries(record: Path) -> dict[str, list[object]]:
    try:
        data = json.loads(record.read_bytes())
        if isinstance(data, dict) and data.get("format") == FORMAT and isinstance(data.get("files"), dict):
            return data["files"]
    except (OSError, ValueError):
        pass
    return {}


def _remember(record: Path, name: str, stamp: Stamp, sha256: str) -> None:
    entries = {k: v for k, v in _entries(record).items() if (record.parent / k).exists()}
    entries[name] = [*stamp, sha256]
    try:
        atomic_write_json(record, {"format": FORMAT, "files": entries})
    except OSError:
        pass  # a read-only index: verified again at the next open


def verify_file(path: Path, sha256: str, described_by: str) -> Stamp:
    """Check that ``path`` has the ``sha256`` its meta file ``described_by`` recorded,
    hashing it only when no verdict for its current stamp is remembered (see the
    module docstring). Returns the stamp verified (a caller that reads the file by
    name afterwards compares it to be sure it read the file verified);
    :class:`CorruptStoreError` when it does not match or cannot be read."""
    stamp = file_stamp(path)
    record = path.parent / VERDICTS
    known = _entries(record).get(path.name)
    if isinstance(known, list) and len(known) == 5 and tuple(known[:4]) == stamp:
        actual = known[4]
    else:
        started_ns = time.time_ns()
        try:
            actual = file_sha256(path)
        except OSError as exc:
            raise CorruptStoreError(f"{path}: unreadable ({exc.strerror or exc})") from None
        settled = max(stamp[1], stamp[2]) < started_ns - int(RACY_SECONDS * 1e9)
        if settled and file_stamp(path) == stamp:
            _remember(record, path.name, stamp, actual)
    if actual != sha256:
        raise CorruptStoreError(f"{path}: checksum mismatch (damaged, or {described_by} is)")
    return stamp


class VerdictRecord:
    """Many files' verdicts in one record, read once and written once: a writer
    checking every shard of a store at its start (:func:`.repair.drop_damaged_shards`)
    hashes only the shards whose files changed since they were last verified, so a
    run costs one ``stat`` per shard file, not a read of every vector. Keys are
    paths relative to the record's folder; the rules are the module docstring's.

    The record is a journal, one line per verdict (``key size mtime_ns ctime_ns
    inode sha256``; a later line wins), so a run appends what it verified instead
    of rewriting ~20k entries (10M rows); it is rewritten with the live entries
    only once it holds twice as many lines as those. A record in the older JSON
    format is read and rewritten as a journal."""

    def __init__(self, record: Path) -> None:
        self.record = record
        self._entries: dict[str, list[object]] = {}
        self._lines = 0
        self._rewrite = False
        self._new: dict[str, list[object]] = {}
        self._raw: dict[str, str] = {}
        self._started_ns = time.time_ns()
        try:
            data = record.read_bytes().decode("ascii")
        except (OSError, ValueError):
            return
        if data.startswith("{"):  # the JSON record of earlier versions
            try:
                loaded = json.loads(data)
                if isinstance(loaded, dict) and loaded.get("format") == FORMAT and \
                        isinstance(loaded.get("files"), dict):
                    self._entries = dict(loaded["files"])
            except ValueError:
                pass
            self._rewrite = True
            return
        lines = data.splitlines()
        self._lines = len(lines)
        # Parsed when looked up (a large store's start looks up one slice of them).
        # A torn last line (a crash while appending) has fewer fields: skipped, so
        # the verdict before it stands.
        self._raw = dict(line.split(" ", 1) for line in lines if line.count(" ") == 5)

    def _key(self, path: Path) -> str:
        return path.relative_to(self.record.parent).as_posix()

    def knows(self, key: str) -> bool:
        """Whether there is a verdict for the path ``key`` (relative to the record's
        folder), whatever its stamp."""
        return key in self._entries or key in self._raw

    def _entry(self, key: str) -> list[object] | None:
        if key not in self._entries and key in self._raw:
            fields = self._raw[key].split(" ")
            if len(fields) == 5 and all(f.isdigit() for f in fields[:4]):  # a torn last line is skipped
                self._entries[key] = [int(f) for f in fields[:4]] + [fields[4]]
        return self._entries.get(key)

    def holds(self, path: Path, stamp: Stamp, sha256: str | None) -> bool:
        """Whether ``path`` was verified to have ``sha256`` when its stamp was ``stamp``."""
        return self.holds_key(self._key(path), stamp, sha256)

    def holds_key(self, key: str, stamp: Stamp, sha256: str | None) -> bool:
        """:meth:`holds` by the path relative to the record's folder (a writer's start
        checks every shard with it: no Path objects per file)."""
        known = self._entry(key)
        return (sha256 is not None and isinstance(known, list) and len(known) == 5
                and tuple(known[:4]) == stamp and known[4] == sha256)

    def remember(self, path: Path, stamp: Stamp, sha256: str) -> None:
        """``path`` (stamped ``stamp`` before it was read) was just verified to hold
        ``sha256``; kept only when it was settled before this record was opened."""
        if max(stamp[1], stamp[2]) < self._started_ns - int(RACY_SECONDS * 1e9) and " " not in self._key(path):
            self._entries[self._key(path)] = self._new[self._key(path)] = [*stamp, sha256]

    def save(self, keep: set[str]) -> None:
        """Record what was verified (best effort: a read-only store is verified again
        next time); entries not in ``keep`` (relative paths) are dropped when the
        journal is rewritten."""
        try:
            if self._rewrite or self._lines + len(self._new) > 2 * len(keep) + 64:
                live = {k: v for k in keep if (v := self._entry(k)) is not None and " " not in k}
                atomic_write_bytes(self.record, _journal(live))
            elif self._new:
                with open(self.record, "ab") as fh:  # a torn line is skipped when read
                    fh.write(_journal(self._new))
        except OSError:
            pass


def _journal(entries: dict[str, list[object]]) -> bytes:
    return "".join(f"{key} {' '.join(str(v) for v in value)}\n" for key, value in entries.items()).encode("ascii")
