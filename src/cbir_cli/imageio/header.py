"""What an image file's header says, without decoding its pixels."""

from __future__ import annotations

import os

from ..errors import ImageError
from .decode import open_image_file

# EXIF orientations that turn the picture by 90 degrees: width and height swap.
_QUARTER_TURNS = (5, 6, 7, 8)


def image_size(path: str | os.PathLike[str]) -> tuple[int, int] | None:
    """(width, height) of the picture as shown (upright, EXIF orientation applied),
    from the header only; None when the file cannot be read as an image. Opened the
    one way image files are (:func:`~.decode.open_image_file`: regular files only)."""
    from PIL import Image

    try:
        fh, _ = open_image_file(path)
    except ImageError:
        return None
    with fh:
        try:
            with Image.open(fh) as img:
                size = img.size
                orientation = img.getexif().get(0x0112, 1)
        except Exception:  # noqa: BLE001 - any unreadable file simply has no known size
            return None
    return (size[1], size[0]) if orientation in _QUARTER_TURNS else size
