"""A stat fast path in front of content hashing: a re-run over an unchanged folder
does not read every file again.

The content hash (sha256) stays authoritative: this only remembers, per path,
which hash a file had when its ``(size, mtime_ns, ctime_ns, inode)`` were what
they are now. Any difference (a write, ``touch``, a file replaced by a rename, a
restored backup with an old mtime, which still changes ctime) means the file is
hashed again. Entries for files modified in the last :data:`RACY_SECONDS` before
hashing started are not kept (a write in the same timestamp tick as our read
could otherwise go unseen: git's "racily clean" rule).

It lives next to the manifest as ``stat-cache.json``, a derived file like the
saved search index: written atomically by the writer (under the store's lock) at
the end of a sync, never needed to read the store, ignored when missing or
unreadable (an older store simply hashes everything once and gains one), and
ignored by a rebuild, which must not trust anything about the old state.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

from ..fsutil import atomic_write_bytes
from .plan import HashResult

STAT_CACHE = "stat-cache.json"
FORMAT = 1
RACY_SECONDS = 2.0

Stamp = tuple[int, int, int, int]  # size, mtime_ns, ctime_ns, inode
HashFiles = Callable[[Sequence[Path | str]], Iterable[HashResult]]


def stamp_of(st: os.stat_result) -> Stamp:
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino


class StatCache:
    """path -> (stamp, sha256) for one store; see the module docstring."""

    def __init__(self, root: Path, entries: dict[str, tuple[Stamp, str]]) -> None:
        self.root = root
        self.entries = entries
        self._loaded = dict(entries)
        self._fresh: dict[str, tuple[Stamp, str]] = {}

    @classmethod
    def load(cls, root: Path, trusted: bool = True) -> StatCache:
        """The cache of the store at ``root``; empty when missing, unreadable or not
        ``trusted`` (a rebuild hashes everything)."""
        entries: dict[str, tuple[Stamp, str]] = {}
        if trusted:
            try:
                data = json.loads((root / STAT_CACHE).read_bytes())
                if data.get("format") == FORMAT:
                    entries = {path: (tuple(e[:4]), e[4]) for path, e in data["entries"].items()}  # type: ignore[misc]
            except (OSError, ValueError, TypeError, KeyError, AttributeError, IndexError):
                entries = {}
        return cls(root, entries)

    def hash_files(self, paths: Sequence[Path | str], hash_files: HashFiles) -> Iterator[HashResult]:
        """One :class:`HashResult` per path: from the cache when the file's stamp is
        unchanged, else from ``hash_files`` (the executor's content hashing)."""
        started_ns = time.time_ns()
        misses: list[str] = []
        stamps: dict[str, Stamp] = {}
        for path in map(str, paths):
            try:
                stamp = stamp_of(os.stat(path))
            except OSError:
                misses.append(path)  # hashing says why it cannot be read
                continue
            known = self.entries.get(path)
            if known is not None and known[0] == stamp:
                self._fresh[path] = known
                yield HashResult(path, known[1], stamp[0])
                continue
            stamps[path] = stamp
            misses.append(path)
        settled_ns = started_ns - int(RACY_SECONDS * 1e9)
        for result in hash_files(misses):
            stamp = stamps.get(result.path)
            # Stamp taken before reading: a write during the read changes it, so
            # the next run hashes again.
            if result.sha256 is not None and stamp is not None and stamp[0] == result.size and stamp[1] < settled_ns:
                self._fresh[result.path] = (stamp, result.sha256)
            yield result

    def save(self, keep_unlisted: bool) -> None:
        """Write the stamps of this run's files (plus, with ``keep_unlisted``, the
        older entries of files this run did not list: ``cbir evaluate``'s cache is
        synced in subsets). Nothing is written when nothing changed."""
        entries = {**self._loaded, **self._fresh} if keep_unlisted else dict(self._fresh)
        if entries == self._loaded:
            return
        data = {"format": FORMAT, "entries": {p: [*stamp, sha] for p, (stamp, sha) in entries.items()}}
        try:
            atomic_write_bytes(self.root / STAT_CACHE, json.dumps(data, separators=(",", ":")).encode("ascii"))
        except OSError:
            pass  # only a cache: the next run hashes again
        self._loaded = entries
