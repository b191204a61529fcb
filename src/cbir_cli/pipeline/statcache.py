"""A stat fast path in front of content hashing: a re-run over an unchanged folder
does not read every file again.

The content hash (sha256) stays authoritative: this only remembers, per key (a
path, or an object's URI), which hash an image had when its stamp
``(size, mtime_ns, etag)`` was what it is now -- for a local file the etag is
``inode:ctime_ns``, for an object the store's ETag, both taken from the image
source (:meth:`cbir_cli.imageio.sources.ImageSource.stat`; for an object store,
from the listing itself: no request per object). Any difference (a write,
``touch``, a file replaced by a rename, a restored backup with an old mtime, which
still changes ctime, an object overwritten) means the image is hashed again.
Entries for files modified in the last :data:`RACY_SECONDS` before hashing
started are not kept (a write in the same timestamp tick as our read could
otherwise go unseen: git's "racily clean" rule); an object store's ETag changes
with every write, so its entries are kept at once.

It lives next to the manifest as ``stat-cache.json``, a derived file like the
saved search index: written atomically by the writer (under the store's lock) at
the end of a sync, never needed to read the store, ignored when missing or
unreadable (an older store simply hashes everything once and gains one), and
ignored by a rebuild, which must not trust anything about the old state.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

from ..fsutil import atomic_write_bytes
from ..imageio.files import stat_local
from ..imageio.sources import SourceEntry
from ..store.verdicts import RACY_SECONDS  # one "racily clean" rule for images and store files
from .plan import HashResult

STAT_CACHE = "stat-cache.json"
# 2: entries [size, mtime_ns, etag, sha256]. Format 1's [size, mtime_ns, ctime_ns,
# inode, sha256] (local files only) is read as the same stamp: no re-hashing.
FORMAT = 2

Stamp = tuple[int, int, str]  # size, mtime_ns, etag (see the module docstring)
HashFiles = Callable[[Sequence[Path | str]], Iterable[HashResult]]
StatEntry = Callable[[str], SourceEntry]


def _entry(e: list, fmt: int) -> tuple[Stamp, str]:
    if fmt == 1:
        size, mtime_ns, ctime_ns, inode, sha = e
        return (size, mtime_ns, f"{inode}:{ctime_ns}"), sha
    size, mtime_ns, etag, sha = e
    return (size, mtime_ns, str(etag)), sha


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
                if data.get("format") in (1, FORMAT):
                    entries = {path: _entry(e, data["format"]) for path, e in data["entries"].items()}
            except (OSError, ValueError, TypeError, KeyError, AttributeError, IndexError):
                entries = {}
        return cls(root, entries)

    def hash_files(self, paths: Sequence[Path | str], hash_files: HashFiles) -> Iterator[HashResult]:
        """One :class:`HashResult` per path: from the cache when the file's stamp is
        unchanged, else from ``hash_files`` (the executor's content hashing). The
        stamps come from ``paths.source`` where the listing has one
        (:class:`~cbir_cli.imageio.files.ImageList`), else from the local file."""
        source = getattr(paths, "source", None)
        stat: StatEntry = source.stat if source is not None else stat_local
        exact = bool(getattr(source, "exact_stamps", False))
        started_ns = time.time_ns()
        misses: list[str] = []
        stamps: dict[str, Stamp] = {}
        for path in map(str, paths):
            try:
                stamp = stat(path).stamp
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
            if (result.sha256 is not None and stamp is not None and stamp[0] == result.size
                    and (exact or stamp[1] < settled_ns)):
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
