"""Is the file at an indexed path still the image that was indexed? What a server
checks before it sends, thumbnails or decodes an indexed file, so that a file
swapped for a symlink (to ``/etc/passwd``, say) or overwritten after indexing is
never served in its place.

:meth:`IndexedFiles.open` opens the row's path (regular files only, size-capped:
:func:`~cbir_cli.imageio.decode.open_image_file`) and checks the opened
descriptor, so a swap after the check cannot change what is read:

1. **Where**: the file's real path (every symlink resolved) lies inside the
   indexed folders (the index's roots, recorded already resolved at indexing:
   :mod:`cbir_cli.store.roots`), and that real path is the opened file (same device and
   inode). A symlink, or a folder swapped for one, that leads outside is refused,
   even to a copy of the indexed bytes.
   An object-store URI (``s3://...``) has no symlinks to resolve: its key is
   what was indexed.
2. **Unchanged**: its size equals the row's; then, when its ``(size, mtime_ns,
   inode:ctime_ns)`` equal the store's stat cache entry (:mod:`.statcache`) with
   the row's hash, it is unchanged without reading it; otherwise the opened file
   is hashed and must match the row's sha256. The verdict is remembered per
   stamp, so repeated requests do not hash again (not for a file modified in the
   last :data:`~.statcache.RACY_SECONDS`: git's "racily clean" rule).

Refusals are :class:`NotTheIndexedFile` and name no path (they are answered to
web clients): ``changed`` tells "changed since indexing" (HTTP 410) from "gone,
unreadable or outside the indexed folder" (404).
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from ..errors import CbirError, ImageError
from ..imageio.decode import open_image_file
from ..imageio.files import is_under, local_entry
from ..imageio.fsspec_source import forget_cached_info, opened_entry
from ..imageio.sources import is_object_uri
from .plan import hash_open_file
from .statcache import RACY_SECONDS, STAT_CACHE, Stamp, StatCache

if TYPE_CHECKING:
    from ..search.searcher import Searcher
    from ..store.manifest import Row

VERDICTS_KEPT = 100_000  # (path, sha256, stamp) -> verdict: ~200 bytes each


class NotTheIndexedFile(CbirError):
    """The file at an indexed path is not (or no longer) the image that was
    indexed; the message names the image by id, never by path."""

    def __init__(self, message: str, changed: bool = False) -> None:
        super().__init__(message)
        self.changed = changed


class IndexedFiles:
    """Opens indexed files after checking them (see the module docstring); one per
    server, shared by its threads."""

    def __init__(self, capacity: int = VERDICTS_KEPT) -> None:
        self.capacity = capacity
        self.hashed = 0  # files read to hash them (the slow path)
        self._verdicts: OrderedDict[tuple[str, str, Stamp], bool] = OrderedDict()
        self._stat_cache: tuple[tuple[str, int, int, int] | None, dict[str, tuple[Stamp, str]]] = (None, {})
        self._lock = threading.Lock()

    def open(self, searcher: Searcher, row: Row) -> BinaryIO:
        """The indexed file of ``row`` (of ``searcher``'s index), open and checked,
        positioned at its start. Raises :class:`NotTheIndexedFile`."""
        remote = is_object_uri(row.path)
        try:
            if remote:
                forget_cached_info(row.path)  # this server may have listed it long ago
            fh, _ = open_image_file(row.path)
        except ImageError as exc:
            raise NotTheIndexedFile(f"image {row.id} is in the index but cannot be read: {exc.reason}") from None
        try:
            if remote:  # stamped as opened (its ETag: exact); no symlinks to resolve
                stamp = opened_entry(row.path, fh).stamp
            else:
                info = os.fstat(fh.fileno())
                self._check_location(row, searcher.roots, info)
                stamp = local_entry(row.path, info).stamp
            if stamp[0] != row.size:
                raise NotTheIndexedFile(f"image {row.id} changed since it was indexed (size)", changed=True)
            if not self._unchanged(fh, row, stamp, Path(searcher.store.root)):
                raise NotTheIndexedFile(f"image {row.id} changed since it was indexed (content)", changed=True)
            fh.seek(0)
        except OSError:
            fh.close()
            raise NotTheIndexedFile(f"image {row.id} is in the index but cannot be read") from None
        except BaseException:
            fh.close()
            raise
        return fh

    @staticmethod
    def _check_location(row: Row, roots: list[str], info: os.stat_result) -> None:
        try:
            real = os.path.realpath(row.path, strict=True)
            found = os.stat(real)
        except OSError:
            found = None  # swapped again since it was opened
        if found is None or (found.st_dev, found.st_ino) != (info.st_dev, info.st_ino):
            raise NotTheIndexedFile(f"image {row.id} is in the index but its file changed place while being opened")
        if not is_under(real, roots):
            raise NotTheIndexedFile(f"image {row.id} is in the index but its file now resolves outside the "
                                    "indexed folder (a symlink?)")

    def _unchanged(self, fh: BinaryIO, row: Row, stamp: Stamp, store_root: Path) -> bool:
        key = (row.path, row.sha256, stamp)
        with self._lock:
            verdict = self._verdicts.get(key)
            if verdict is not None:
                self._verdicts.move_to_end(key)
                return verdict
        if self._cached_stamps(store_root).get(row.path) == (stamp, row.sha256):
            verdict = True
        else:
            try:
                sha256, size = hash_open_file(fh)
            except OSError:
                raise NotTheIndexedFile(f"image {row.id} is in the index but cannot be read") from None
            self.hashed += 1
            verdict = sha256 == row.sha256 and size == row.size
        if is_object_uri(row.path) or stamp[1] < time.time_ns() - int(RACY_SECONDS * 1e9):
            with self._lock:
                self._verdicts[key] = verdict
                while len(self._verdicts) > self.capacity:
                    self._verdicts.popitem(last=False)
        return verdict

    def _cached_stamps(self, store_root: Path) -> dict[str, tuple[Stamp, str]]:
        """The store's stat cache entries, read again only when its file changes."""
        try:
            st = os.stat(store_root / STAT_CACHE)
            key: tuple[str, int, int, int] | None = (str(store_root), st.st_ino, st.st_mtime_ns, st.st_size)
        except OSError:
            key = None
        with self._lock:
            if self._stat_cache[0] == key:
                return self._stat_cache[1]
        entries = StatCache.load(store_root).entries if key is not None else {}
        with self._lock:
            self._stat_cache = (key, entries)
        return entries
