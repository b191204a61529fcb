"""Finding image files below a folder."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from ..errors import CbirError
from ..paths import display_path

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
)
JPEG_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe"})

def is_image_name(path: str | os.PathLike[str]) -> bool:
    return os.path.splitext(os.fspath(path))[1].lower() in IMAGE_EXTENSIONS


class ImageList(list):
    """Image files found below a folder (a list of paths), and the sub-folders that
    could not be read: ``unreadable`` = [(folder, reason)]. Whatever was stored from
    an unreadable folder must be kept, not taken for deleted."""

    unreadable: list[tuple[str, str]]


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


def listing_error(root_path: Path, files: list[Path], unreadable: list[tuple[str, str]]) -> CbirError | None:
    """What makes a listing of ``root_path`` a failure: the folder itself could not be
    read, or it holds no image (and nothing unreadable that might)."""
    if unreadable and unreadable[0][0] == str(root_path.resolve()):
        return CbirError(f"{display_path(root_path)}: cannot read the folder ({unreadable[0][1]})")
    if not files and not unreadable:
        exts = ", ".join(sorted(IMAGE_EXTENSIONS))
        return CbirError(f"{display_path(root_path)}: no image files found (looked for {exts})")
    return None


def list_images(root: str | os.PathLike[str]) -> ImageList:
    """All image files below ``root``, sorted, under the resolved root (absolute, no
    ``..``, no symlinked folders: the form the store keeps, see
    :func:`cbir_cli.paths.normalise_path`), with the sub-folders that could not be
    read (:class:`ImageList`). A missing folder, a file instead of a folder, an
    unreadable folder or a folder with no images is a :class:`CbirError`."""
    root_path = image_folder(root)
    unreadable: list[tuple[str, str]] = []
    files = ImageList(iter_image_files(root_path.resolve(), unreadable))
    files.unreadable = unreadable
    error = listing_error(root_path, files, unreadable)
    if error is not None:
        raise error
    return files
