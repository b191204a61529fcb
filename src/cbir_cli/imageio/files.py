"""Finding images below a location: the local folder as an
:class:`~.sources.ImageSource` (:class:`LocalFolderSource`), and
:func:`list_images` for a folder or a URL (:mod:`.fsspec_source`)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from ..errors import CbirError
from ..paths import display_path
from .sources import IMAGE_EXTENSIONS, JPEG_EXTENSIONS, ImageSource, SourceEntry, is_image_name, is_object_uri

__all__ = ["IMAGE_EXTENSIONS", "JPEG_EXTENSIONS", "ImageList", "LocalFolderSource", "image_folder", "is_image_name",
           "is_under", "iter_image_files", "list_images", "listing_error", "open_source", "source_location",
           "stat_local"]


class ImageList(list):
    """Images found below a location (a list of paths or URIs), the sub-folders that
    could not be read: ``unreadable`` = [(folder, reason)] -- whatever was stored
    from an unreadable folder must be kept, not taken for deleted -- and the
    ``source`` they came from (its :meth:`~.sources.ImageSource.stat` is what the
    stat cache compares; None: a local folder)."""

    unreadable: list[tuple[str, str]]
    source: ImageSource | None = None


def iter_image_files(root: str | os.PathLike[str],
                     unreadable: list[tuple[str, str]] | None = None) -> Iterator[Path]:
    """Yield image files below ``root`` (by extension), sorted, depth-first.

    Symlinks to files are followed when read, but symlinked directories are not
    walked (that is how loops are avoided); a directory named like an image is
    not a file and is never yielded. A sub-folder that cannot be listed is
    appended to ``unreadable`` as (folder, reason) instead of being skipped silently.
    """
    from .decode import oserror_reason

    def failed(exc: OSError) -> None:
        if unreadable is not None and exc.filename is not None:
            unreadable.append((os.fspath(exc.filename), oserror_reason(exc)))

    for dirpath, dirnames, filenames in os.walk(root, onerror=failed, followlinks=False):
        dirnames.sort()
        for name in sorted(filenames):
            if is_image_name(name):
                yield Path(dirpath) / name


def is_under(path: str, folders: list[str]) -> bool:
    """Whether ``path`` is one of ``folders`` or inside one."""
    return any(path == f or path.startswith(f.rstrip(os.sep) + os.sep) for f in folders)


def image_folder(root: str | os.PathLike[str]) -> Path:
    """``root`` (user-expanded), checked to be an existing folder: a missing folder or
    a file instead of a folder is a :class:`CbirError` naming it."""
    root_path = Path(root).expanduser()
    if not root_path.exists():
        raise CbirError(f"{display_path(root_path)}: folder does not exist")
    if not root_path.is_dir():
        raise CbirError(f"{display_path(root_path)}: not a folder")
    return root_path


def listing_error(root_path: Path | str, files: list, unreadable: list[tuple[str, str]]) -> CbirError | None:
    """What makes a listing of ``root_path`` (a folder, or a URI) a failure: the
    folder itself could not be read, or it holds no image (and nothing unreadable
    that might)."""
    root_key = root_path if isinstance(root_path, str) else str(root_path.resolve())
    if unreadable and unreadable[0][0] == root_key:
        return CbirError(f"{display_path(root_path)}: cannot read the folder ({unreadable[0][1]})")
    if not files and not unreadable:
        exts = ", ".join(sorted(IMAGE_EXTENSIONS))
        return CbirError(f"{display_path(root_path)}: no image files found (looked for {exts})")
    return None


def stat_local(path: str) -> SourceEntry:
    """A local file's entry (``os.stat``, following a symlinked file); ``OSError`` when
    it cannot be stat'ed."""
    return local_entry(path, os.stat(path))


def local_entry(path: str, st: os.stat_result) -> SourceEntry:
    """The entry of a local file from its stat result (also an open file's ``fstat``):
    its etag is ``inode:ctime_ns``, which a rename over it or any write changes."""
    return SourceEntry(path, st.st_size, st.st_mtime_ns, f"{st.st_ino}:{st.st_ctime_ns}")


class LocalFolderSource:
    """The images below a local folder (see :func:`iter_image_files` for what is
    walked); keys are plain absolute paths, as every index has always stored them."""

    movable = True
    exact_stamps = False

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.location = str(image_folder(root).resolve())

    def entries(self, unreadable: list[tuple[str, str]]) -> Iterator[SourceEntry]:
        for path in iter_image_files(self.location, unreadable):
            try:
                yield stat_local(str(path))
            except OSError:
                yield SourceEntry(str(path), 0, 0, "")  # opening it says why it cannot be read

    def stat(self, uri: str) -> SourceEntry:
        return stat_local(uri)

    def open(self, uri: str, max_bytes: int) -> tuple[BinaryIO, int]:
        from .decode import open_image_file

        return open_image_file(uri, max_bytes)


def source_location(root: str | os.PathLike[str]) -> Path | str:
    """What the user named, as a location: a URL as given (without a trailing
    ``/``), else the user-expanded folder path."""
    if is_object_uri(root):
        return str(root).rstrip("/")
    return Path(root).expanduser()


def open_source(root: str | os.PathLike[str]) -> ImageSource:
    """The :class:`~.sources.ImageSource` for a folder path or a URL; a missing
    folder, a file instead of a folder, or a URL whose package is not installed is a
    :class:`CbirError`."""
    if is_object_uri(root):
        from .fsspec_source import FsspecSource

        return FsspecSource(str(root))
    return LocalFolderSource(root)


def list_images(root: str | os.PathLike[str]) -> ImageList:
    """All images below ``root``, sorted: for a folder, its files under the resolved
    root (absolute, no ``..``, no symlinked folders: the form the store keeps, see
    :func:`cbir_cli.paths.normalise_path`); for a URL (``s3://bucket/prefix``), the
    objects' URIs, listed with what tells a change (:class:`ImageList`'s
    ``source``). A missing folder or prefix, a file instead of a folder, an
    unreadable folder or one with no images is a :class:`CbirError`."""
    if is_object_uri(root):
        source = open_source(root)
        unreadable: list[tuple[str, str]] = []
        files = ImageList(entry.uri for entry in source.entries(unreadable))
        files.unreadable, files.source = unreadable, source
        error = listing_error(source.location, files, unreadable)
        if error is not None:
            raise error
        return files
    root_path = image_folder(root)
    unreadable = []
    files = ImageList(iter_image_files(root_path.resolve(), unreadable))
    files.unreadable = unreadable
    error = listing_error(root_path, files, unreadable)
    if error is not None:
        raise error
    return files
