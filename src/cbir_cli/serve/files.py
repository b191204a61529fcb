"""The indexed files over HTTP: ``/api/images/<id>`` (the original, as stored) and
``/api/thumbnails/<id>`` (a cached JPEG). Each is sent only while the file is still
the image that was indexed (:mod:`cbir_cli.pipeline.indexed_files`), from the very
descriptor that was checked.
"""

from __future__ import annotations

import mimetypes
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, BinaryIO

from ..errors import ImageError
from ..imageio import thumbnails
from ..imageio.decode import DecodeBudget, decode_image
from ..paths import lossless_path
from .api_errors import ApiError

if TYPE_CHECKING:
    from flask import Flask

    from ..pipeline.indexed_files import IndexedFiles
    from ..search.searcher import Searcher
    from ..store.feature_store import Row
    from .live import LiveSearcher

THUMBNAIL_SIZE = 256
THUMBNAIL_CACHE_ENTRIES = 512  # ~10 KB each: a few MB at most


class ThumbnailCache:
    """A small thread-safe LRU of JPEG thumbnails keyed by image id and content hash
    (so a re-indexed, changed file never gets its old thumbnail)."""

    def __init__(self, capacity: int = THUMBNAIL_CACHE_ENTRIES, size: int = THUMBNAIL_SIZE) -> None:
        self.capacity = capacity
        self.size = size
        self._entries: OrderedDict[tuple[int, str], bytes] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: tuple[int, str], source: str | os.PathLike[str] | BinaryIO,
            budget: DecodeBudget | None = None) -> bytes:
        """The thumbnail of ``key``, made from ``source`` (an image file, or one
        already open) only when it is not cached."""
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
        # Made outside the lock: decoding a large photo must not block other thumbnails.
        data = make_thumbnail(source, self.size, budget)
        with self._lock:
            self._entries[key] = data
            self._entries.move_to_end(key)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
        return data


def make_thumbnail(source: str | os.PathLike[str] | BinaryIO, size: int = THUMBNAIL_SIZE,
                   budget: DecodeBudget | None = None) -> bytes:
    """A JPEG no larger than ``size`` x ``size`` (aspect kept) of an image file
    (a path, or a file already open and checked). Raises ImageError."""
    import io

    if isinstance(source, (str, os.PathLike)):
        img = thumbnails.thumbnail(source, size, budget)
    else:
        img = thumbnails.thumbnail(decode_image(read_checked(source), "indexed image", size, budget), size)
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=85)
    return out.getvalue()


def read_checked(fh: BinaryIO) -> bytes:
    """All of an opened (checked, size-capped) indexed file."""
    try:
        return fh.read()
    except OSError as exc:
        raise ImageError("indexed image", exc.strerror or str(exc)) from None


def content_disposition(path: str) -> str:
    """``inline`` with the file's name for the browser, whatever bytes it holds
    (newlines, non-UTF-8...): an ASCII fallback plus the RFC 5987 ``filename*``."""
    from urllib.parse import quote

    name = os.fsencode(os.path.basename(path)).decode("utf-8", "replace")
    fallback = "".join(c if 32 <= ord(c) < 127 and c not in '"\\' else "_" for c in name)
    return f"inline; filename=\"{fallback}\"; filename*=UTF-8''{quote(name, safe='')}"


def register_file_routes(app: Flask, live: LiveSearcher, files: IndexedFiles, budget: DecodeBudget,
                         lookup: Callable[[Searcher, int], Row]) -> None:
    """Add the original and thumbnail routes to ``app``."""
    from flask import send_file

    thumbnail_cache = ThumbnailCache()

    @app.get("/api/images/<int:image_id>")
    def original(image_id: int):
        searcher = live.current()
        row = lookup(searcher, image_id)
        fh = files.open(searcher, row)  # still the indexed image; sent from this very descriptor
        mimetype = mimetypes.guess_type(row.path)[0] or "application/octet-stream"
        response = send_file(fh, mimetype=mimetype, conditional=True, etag=row.sha256[:32], max_age=3600)
        response.headers["Content-Disposition"] = content_disposition(row.path)
        raw_name = lossless_path(os.path.basename(row.path))
        if raw_name is not None:  # filename* shows U+FFFD for the bytes that are not UTF-8
            response.headers["X-Filename-Bytes"] = raw_name
        return response

    @app.get("/api/thumbnails/<int:image_id>")
    def thumbnail(image_id: int):
        import io

        searcher = live.current()
        row = lookup(searcher, image_id)
        try:
            with files.open(searcher, row) as fh:  # checked on every request, cached or not
                data = thumbnail_cache.get((image_id, row.sha256), fh, budget)
        except ImageError as exc:
            raise ApiError(f"image {image_id} is in the index but cannot be read: {exc.reason}", 404) from None
        return send_file(io.BytesIO(data), mimetype="image/jpeg", max_age=3600)
