"""The image-source seam: where images come from (a local folder, an object store)
as one small :class:`ImageSource` protocol, so listing, change detection, hashing
and decoding do not care which.

Implementations: :class:`~.files.LocalFolderSource` (today's folder walk: regular
files only, symlinked folders not followed, unreadable sub-folders reported) and
:class:`~.fsspec_source.FsspecSource` (``s3://``, ``gs://``, ``az://``, ``file://``
URLs through fsspec). :func:`~.files.open_source` picks one for a location.

Rows are keyed by what :meth:`ImageSource.entries` yields: a plain absolute path for
a local folder (so existing indexes keep their keys), the full URI otherwise. Every
image is opened by key through :func:`~.decode.open_image_file`, which sends a URI
to its store; so readers, hashing, ``serve`` and ``query`` need no source object.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from typing import BinaryIO, NamedTuple, Protocol

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
)
JPEG_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe"})


def is_image_name(path: str | os.PathLike[str]) -> bool:
    return os.path.splitext(os.fspath(path))[1].lower() in IMAGE_EXTENSIONS


# scheme:// -- two letters at least, so a Windows drive (C:\\) is never a URI.
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")


def is_object_uri(location: object) -> bool:
    """Whether ``location`` is a URL (``s3://...``, ``file://...``) rather than a local path."""
    return isinstance(location, str) and _URI.match(location) is not None


class SourceEntry(NamedTuple):
    """One image of a source as listed: its key, and what tells a change without
    reading it. ``etag``: the object store's ETag (or generation); for a local
    file ``"<inode>:<ctime_ns>"`` (a replaced or rewritten file changes it)."""

    uri: str
    size: int
    mtime_ns: int
    etag: str

    @property
    def stamp(self) -> tuple[int, int, str]:
        """What the stat cache compares (see :mod:`cbir_cli.pipeline.statcache`)."""
        return self.size, self.mtime_ns, self.etag


class ImageSource(Protocol):
    """Images below one location. Listing streams (a bucket of 10M objects is never
    one list in here); ``stat`` and ``open`` take the keys ``entries`` yields."""

    #: The canonical location: a resolved folder path, or a URI without a trailing "/".
    location: str
    #: Whether files can be moved within it (``cbir dedup --move-to``): local folders only.
    movable: bool
    #: Whether every write changes an entry's etag (an object store's ETag), so the
    #: stamp of an image written a moment ago can be trusted; a local file's
    #: timestamps can miss a write in the same clock tick (git's "racily clean").
    exact_stamps: bool

    def entries(self, unreadable: list[tuple[str, str]]) -> Iterator[SourceEntry]:
        """Image entries below the location, sorted within each folder; a sub-folder
        (prefix) that cannot be listed is appended to ``unreadable`` as (key, reason)."""
        ...

    def stat(self, uri: str) -> SourceEntry:
        """The entry of one key now (``OSError`` when it cannot be read)."""
        ...

    def open(self, uri: str, max_bytes: int) -> tuple[BinaryIO, int]:
        """(binary file object, size) of one key; :class:`~cbir_cli.errors.ImageError`
        when it is not a readable image of at most ``max_bytes``."""
        ...
