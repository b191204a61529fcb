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


def iter_image_files(root: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield image files below ``root`` (by extension), sorted, depth-first.

    Symlinks to files are followed when read, but symlinked directories are not
    walked (that is how loops are avoided); a directory named like an image is
    not a file and is never yielded.
    """
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        for name in sorted(filenames):
            if is_image_name(name):
                yield Path(dirpath) / name


def image_folder(root: str | os.PathLike[str]) -> Path:
    """``root`` (user-expanded), checked to be an existing folder: a missing folder or
    a file instead of a folder is a :class:`CbirError` naming it."""
    root_path = Path(root).expanduser()
    if not root_path.exists():
        raise CbirError(f"{display_path(root_path)}: folder does not exist")
    if not root_path.is_dir():
        raise CbirError(f"{display_path(root_path)}: not a folder")
    return root_path


def no_images_error(root: str | os.PathLike[str]) -> CbirError:
    exts = ", ".join(sorted(IMAGE_EXTENSIONS))
    return CbirError(f"{display_path(Path(root).expanduser())}: no image files found (looked for {exts})")


def list_images(root: str | os.PathLike[str]) -> list[Path]:
    """All image files below ``root``, sorted, under the resolved root (absolute, no
    ``..``, no symlinked folders: the form the store keeps, see
    :func:`cbir_cli.paths.normalise_path`). A missing folder, a file instead of a
    folder, or a folder with no images is a :class:`CbirError`."""
    files = list(iter_image_files(image_folder(root).resolve()))
    if not files:
        raise no_images_error(root)
    return files
