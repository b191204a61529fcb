"""Images in object storage (and any fsspec URL): ``s3://bucket/prefix``,
``gs://``, ``az://``, ``file://``, as an :class:`~.sources.ImageSource`.

fsspec and the store's own filesystem package are optional (``pip install
'cbir-cli[s3]'``: fsspec + s3fs; ``gcsfs`` for ``gs://``, ``adlfs`` for ``az://``)
and imported only when a URL is used. Credentials and the endpoint come from where
the filesystem package looks for them: for S3 the usual AWS variables and files
(``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``,
``AWS_ENDPOINT_URL`` or ``AWS_ENDPOINT_URL_S3`` for an S3-compatible server), or
fsspec's configuration (``FSSPEC_S3='{"client_kwargs": {"endpoint_url": ...}}'``).

Objects have no symlinks, pipes or devices: every key below the prefix with an
image extension is an image (keys ending in ``/``, folder markers, are not). A
``file://`` URL is checked like a local file before it is opened (a regular file,
size-capped), since fsspec's local open would block on a named pipe.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import Any, BinaryIO

from ..errors import CbirError, ImageError
from .sources import SourceEntry, is_image_name

# Which package serves which scheme, for the one-line error when it is missing.
PACKAGES = {"s3": "s3fs (pip install 'cbir-cli[s3]')", "s3a": "s3fs (pip install 'cbir-cli[s3]')",
            "gs": "gcsfs (pip install gcsfs)", "gcs": "gcsfs (pip install gcsfs)",
            "az": "adlfs (pip install adlfs)", "abfs": "adlfs (pip install adlfs)"}


def _megabytes(nbytes: int) -> str:
    return f"{nbytes / 1e6:.0f} MB" if nbytes >= 1e6 else f"{nbytes / 1e6:.2g} MB"


def split_uri(uri: str) -> tuple[str, Any, str]:
    """(scheme, fsspec filesystem, path within it) for ``uri``; a missing package or an
    unknown scheme is a :class:`CbirError` naming the URL and what to install."""
    scheme = uri.split("://", 1)[0].lower()
    try:
        from fsspec.core import url_to_fs

        fs, path = url_to_fs(uri)
    except ImportError:
        needed = PACKAGES.get(scheme, "fsspec (pip install 'cbir-cli[s3]')")
        raise CbirError(f"{uri}: reading {scheme}:// URLs needs {needed}") from None
    except ValueError as exc:  # fsspec: "Protocol not known"
        raise CbirError(f"{uri}: not a supported URL ({exc})") from None
    return scheme, fs, path


def _mtime_ns(info: dict[str, Any]) -> int:
    """Modification time of an fsspec ``info`` dict, whatever the filesystem calls it."""
    for key in ("LastModified", "mtime", "last_modified", "updated", "created"):
        value = info.get(key)
        if isinstance(value, dt.datetime):
            return int(value.timestamp() * 1e9)
        if isinstance(value, (int, float)):
            return int(value * 1e9)
        if isinstance(value, str):
            try:
                return int(dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp() * 1e9)
            except ValueError:
                continue
    return 0


def _etag(info: dict[str, Any]) -> str:
    """What changes whenever the object is written: the store's ETag (or generation);
    for a local file, its inode and ctime (as :class:`~.files.LocalFolderSource`)."""
    for key in ("ETag", "etag", "generation", "md5Hash", "content_settings"):
        value = info.get(key)
        if value:
            return str(value).strip('"')
    if "ino" in info:
        return f"{info['ino']}:{int(float(info.get('created') or 0) * 1e9)}"
    return ""


def _reason(exc: BaseException) -> str:
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, IsADirectoryError):
        return "a folder, not an image file"
    if isinstance(exc, FileNotFoundError):
        return "file not found"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return f"{type(exc).__name__}: {exc}".splitlines()[0]


def open_object(uri: str, max_bytes: int) -> tuple[BinaryIO, int]:
    """Open the object at ``uri`` for reading if it is a file of at most
    ``max_bytes``: (file, size); :class:`ImageError` naming the URI otherwise."""
    _, fs, path = split_uri(uri)
    try:
        info = fs.info(path)  # after a listing, from fsspec's listing cache
        if info.get("type") == "directory":
            raise ImageError(uri, "a folder, not an image file")
        if info.get("type") != "file":
            raise ImageError(uri, "not a regular file (pipe, socket or device)")
        size = int(info.get("size") or 0)
        if size > max_bytes:
            raise ImageError(uri, f"file too large ({_megabytes(size)}, limit {_megabytes(max_bytes)})")
        return fs.open(path, "rb"), size
    except ImageError:
        raise
    except Exception as exc:  # noqa: BLE001 - network, credential and client errors: one line, the run goes on
        raise ImageError(uri, _reason(exc)) from None


def forget_cached_info(uri: str) -> None:
    """Drop what fsspec remembers of ``uri`` from an earlier listing, so that the
    next open asks the store (a long-running server must see an overwrite)."""
    _, fs, path = split_uri(uri)
    fs.invalidate_cache(path)


def opened_entry(uri: str, fh: Any) -> SourceEntry:
    """The entry (size, time, ETag) of an object as it was when ``fh`` was opened:
    s3fs reads an opened file on condition of that ETag, so what is read is what is
    stamped (the object-store twin of ``fstat`` on an open file)."""
    details = getattr(fh, "details", None)
    if not isinstance(details, dict):
        _, fs, path = split_uri(uri)
        details = fs.info(path)
    return SourceEntry(uri, int(details.get("size") or 0), _mtime_ns(details), _etag(details))


class FsspecSource:
    """An :class:`~.sources.ImageSource` over an fsspec URL (see the module docstring)."""

    movable = False

    def __init__(self, location: str) -> None:
        self.scheme, self.fs, root = split_uri(location)
        self.root = root.rstrip("/") or root
        self.location = self.uri(self.root)
        # A local file (file://) is stamped by its timestamps and inode, which a write
        # in the same clock tick can leave as they were; an object by its ETag.
        self.exact_stamps = self.scheme != "file"
        self._listed: dict[str, SourceEntry] = {}

    def uri(self, name: str) -> str:
        return f"{self.scheme}://{name}"

    def _entry(self, info: dict[str, Any]) -> SourceEntry:
        return SourceEntry(self.uri(info["name"].rstrip("/")), int(info.get("size") or 0), _mtime_ns(info),
                           _etag(info))

    def entries(self, unreadable: list[tuple[str, str]]) -> Iterator[SourceEntry]:
        """Depth-first, sorted within each prefix, one listing call per prefix (a
        stream: nothing below holds more than one prefix's listing, plus the entries
        remembered for :meth:`stat`). The location itself not being listable is a
        :class:`CbirError`; a sub-prefix is reported in ``unreadable``."""
        # A listing cached by an earlier run in this process (a server, the tests)
        # would hide objects written since: this run's changes must be seen.
        self.fs.invalidate_cache()
        try:
            top = self.fs.ls(self.root, detail=True)
        except FileNotFoundError:
            raise CbirError(f"{self.location}: no such bucket, container or prefix") from None
        except Exception as exc:  # noqa: BLE001 - any client error: one line
            raise CbirError(f"{self.location}: cannot list it ({_reason(exc)})") from None
        yield from self._walk(self.root, top, unreadable)

    def _walk(self, prefix: str, listing: list[dict[str, Any]],
              unreadable: list[tuple[str, str]]) -> Iterator[SourceEntry]:
        folders = []
        for info in sorted(listing, key=lambda i: i["name"]):
            name = info["name"].rstrip("/")
            if info.get("type") == "directory" or info["name"].endswith("/"):
                # A folder marker (or the prefix itself) is not an image; a local
                # symlinked folder is not walked (loops), as in a local folder.
                if name != prefix and not info.get("islink"):
                    folders.append(name)
            elif info.get("type") == "file" and is_image_name(name):
                entry = self._entry(info)
                self._listed[entry.uri] = entry
                yield entry
        for folder in folders:
            try:
                listing = self.fs.ls(folder, detail=True)
            except Exception as exc:  # noqa: BLE001 - reported, what was stored from it is kept
                unreadable.append((self.uri(folder), _reason(exc)))
                continue
            yield from self._walk(folder, listing, unreadable)

    def stat(self, uri: str) -> SourceEntry:
        """From the listing when this run listed ``uri`` (no request), else asked."""
        listed = self._listed.get(uri)
        if listed is not None:
            return listed
        _, fs, path = split_uri(uri)
        try:
            return self._entry(fs.info(path))
        except OSError:
            raise
        except Exception as exc:  # noqa: BLE001 - the stat cache treats any failure as "read it"
            raise OSError(_reason(exc)) from None

    def open(self, uri: str, max_bytes: int) -> tuple[BinaryIO, int]:
        return open_object(uri, max_bytes)
