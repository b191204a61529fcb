"""Reading image files and decoding them into upright 8-bit RGB PIL images.

Everything that can go wrong with one file becomes an :class:`ImageError` carrying
the file and a short reason, so batch jobs can skip it, count it and go on.
"""

from __future__ import annotations

import errno
import io
import os
import warnings
from typing import TYPE_CHECKING

from ..errors import ImageError
from ..paths import display_path

if TYPE_CHECKING:
    from PIL import Image as PILImage

# Pillow's default bomb limit (~89 Mpx) already refuses absurd sizes; we make its
# *warning* zone (between 1x and 2x the limit) an error too, so a crafted header can
# never make a worker allocate gigabytes.
MAX_IMAGE_PIXELS = 89_478_485


def oserror_reason(exc: OSError) -> str:
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, IsADirectoryError):
        return "is a directory"
    if isinstance(exc, FileNotFoundError):
        return "file not found (dangling symlink?)"
    if exc.errno == errno.ELOOP:
        return "symlink loop"
    return exc.strerror or str(exc)


def read_image_bytes(path: str | os.PathLike[str]) -> bytes:
    """Read a file's bytes, turning OS errors into :class:`ImageError`."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise ImageError(display_path(path), oserror_reason(exc)) from None
    if not data:
        raise ImageError(display_path(path), "empty file (0 bytes)")
    return data


def decode_image(data: bytes, name: str = "<upload>", draft_size: int | None = None) -> PILImage.Image:
    """Decode bytes into an 8-bit RGB image, upright.

    ``draft_size``: for JPEGs, let libjpeg decode at a reduced scale as long as both
    sides stay >= ``draft_size`` (a large speed-up when the model wants 224 px and
    the photo is 12 Mpx; the later resize gives practically the same pixels).
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not data:
        raise ImageError(name, "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > MAX_IMAGE_PIXELS:
                raise ImageError(name, f"image too large ({w}x{h} pixels, limit {MAX_IMAGE_PIXELS})")
            if draft_size and img.format == "JPEG":
                img.draft("RGB", (draft_size, draft_size))
            img.load()
            # In place: without an orientation tag exif_transpose would copy the image (~0.25 ms).
            ImageOps.exif_transpose(img, in_place=True)
            return to_rgb(img)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(name, "not a recognised image format") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(name, f"decompression bomb refused ({exc})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        reason = str(exc) or type(exc).__name__
        raise ImageError(name, f"cannot decode: {reason}") from None


def load_image(path: str | os.PathLike[str], draft_size: int | None = None) -> PILImage.Image:
    """Read and decode one image file (see :func:`decode_image`)."""
    return decode_image(read_image_bytes(path), display_path(path), draft_size)


def to_rgb(img: PILImage.Image) -> PILImage.Image:
    """Convert any Pillow mode to 8-bit RGB. Transparency is composited on white
    (transparent pixels have no defined colour); 16/32-bit grey is rescaled rather
    than clipped (Pillow's plain convert would saturate it to white)."""
    from PIL import Image

    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        import numpy as np

        arr = np.asarray(img, dtype=np.float64)
        hi = float(arr.max()) if arr.size else 0.0
        scale = 255.0 / 65535.0 if hi > 255 else 1.0
        arr8 = np.clip(arr * scale + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")
