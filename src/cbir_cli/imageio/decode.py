"""Opening image files and decoding them into upright 8-bit RGB PIL images: the one
way every path (index, query, serve, evaluate) reads an image.

Everything that can go wrong with one file becomes an :class:`ImageError` carrying
the file and a short reason, so batch jobs can skip it, count it and go on; the
reasons are the same wherever the file is read.

Memory is bounded by bytes, not only pixels: a 190 KB PNG can declare 9400 x 9400
16-bit pixels. The decoded raster (bit depth and bands counted, after JPEG draft
reduction) must fit :data:`MAX_DECODE_BYTES`; a large raster is converted and
reduced in row chunks right after decoding, so conversion never copies it whole;
and a :class:`DecodeBudget` lets a server bound the bytes of all its concurrent
decodes together.
"""

from __future__ import annotations

import errno
import io
import os
import stat
import threading
import warnings
from typing import TYPE_CHECKING, BinaryIO

from ..errors import CbirError, ImageError
from ..paths import display_path
from .sources import is_object_uri

if TYPE_CHECKING:
    from PIL import Image as PILImage

# At most this many pixels decoded (after a JPEG's draft reduction): Pillow's own
# bomb limit (~89 Mpx), kept as a rule of ours. A 108-megapixel photo is decoded at
# 1/2..1/8 scale (draft) and passes; a PNG cannot be reduced while decoding.
MAX_IMAGE_PIXELS = 89_478_485
# At most this many bytes for one decoded raster as Pillow holds it (1 byte per
# pixel for 8-bit grey/palette, 2 for 16-bit grey, 4 for everything else).
MAX_DECODE_BYTES = 384 * 1024 * 1024
# Files larger than this are not images we read (and reading them could exhaust
# memory): the cap is checked before reading a byte.
MAX_FILE_BYTES = 256 * 1024 * 1024
# A raster above this is converted and reduced in chunks (see _reduce_in_chunks);
# smaller ones take the plain path (exactly today's pixels).
CHUNKED_ABOVE_BYTES = 64 * 1024 * 1024
CHUNK_PIXELS = 1 << 20
# Transient bytes of converting one chunk (float64 copies of a 16-bit band and RGB).
CHUNK_OVERHEAD_BYTES = CHUNK_PIXELS * 24
SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")
# Start-of-frame markers of Huffman-coded, non-hierarchical JPEGs (baseline,
# extended, progressive, lossless). Each codes every 8x8 block of a component with
# at least one bit (its DC Huffman code), so a file with fewer bytes than that
# cannot hold the pixels its header declares. Arithmetic coding can go below one
# bit a block: those files are not checked.
HUFFMAN_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3})
NOT_A_REGULAR_FILE = "not a regular file (pipe, socket or device)"
IS_A_FOLDER = "a folder, not an image file"


class DecodeBusy(CbirError):
    """The decode budget stayed exhausted for longer than the caller would wait."""


class DecodeBudget:
    """Bytes of decoded rasters that may exist at once across threads (a server's
    concurrent uploads and thumbnails). A decode reserves its raster's bytes before
    decoding and waits (up to ``timeout`` seconds, then :class:`DecodeBusy`) while
    the budget is spent; one image always fits (the per-image cap is lower)."""

    def __init__(self, max_bytes: int, timeout: float = 30.0) -> None:
        self.max_bytes = max_bytes
        self.timeout = timeout
        self.in_use = 0
        self._cond = threading.Condition()

    def reserve(self, nbytes: int) -> None:
        nbytes = min(nbytes, self.max_bytes)
        with self._cond:
            if not self._cond.wait_for(lambda: self.in_use + nbytes <= self.max_bytes, self.timeout):
                raise DecodeBusy("the server is decoding other large images; retry in a moment")
            self.in_use += nbytes

    def release(self, nbytes: int) -> None:
        with self._cond:
            self.in_use -= min(nbytes, self.max_bytes)
            self._cond.notify_all()


def oserror_reason(exc: OSError, path: str | os.PathLike[str] | None = None) -> str:
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, IsADirectoryError):
        return "is a directory"
    if isinstance(exc, FileNotFoundError):
        if path is not None and os.path.islink(path):
            return "file not found (dangling symlink)"
        return "file not found"
    if exc.errno == errno.ELOOP:
        return "symlink loop"
    return exc.strerror or str(exc)


def _megabytes(nbytes: int) -> str:
    return f"{nbytes / 1e6:.0f} MB" if nbytes >= 1e6 else f"{nbytes / 1e6:.2g} MB"


def open_image_file(path: str | os.PathLike[str], max_bytes: int = MAX_FILE_BYTES) -> tuple[BinaryIO, int]:
    """Open ``path`` for reading if it is a regular file of at most ``max_bytes``:
    (file, size). Opened non-blocking, so a named pipe is refused instead of hanging,
    and checked on the open descriptor (no race with a swap after a check): a
    symlink to ``/dev/zero`` is a device, not an image. A URL (``s3://...``) is
    opened from its store (:mod:`.fsspec_source`). Raises :class:`ImageError`."""
    if is_object_uri(path):
        from .fsspec_source import open_object

        return open_object(str(path), max_bytes)
    name = display_path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    except OSError as exc:
        raise ImageError(name, oserror_reason(exc, path)) from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise ImageError(name, IS_A_FOLDER)
        if not stat.S_ISREG(info.st_mode):
            raise ImageError(name, NOT_A_REGULAR_FILE)
        if info.st_size > max_bytes:
            raise ImageError(name, f"file too large ({_megabytes(info.st_size)}, limit {_megabytes(max_bytes)})")
    except BaseException:
        os.close(fd)
        raise
    # Only now: a file object over a folder's descriptor raises IsADirectoryError.
    return open(fd, "rb"), info.st_size


def read_image_bytes(path: str | os.PathLike[str], max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """A file's bytes (see :func:`open_image_file`); never more than ``max_bytes``
    even if the file grows while it is read."""
    fh, _ = open_image_file(path, max_bytes)
    with fh:
        try:
            data = fh.read(max_bytes + 1)
        except OSError as exc:
            raise ImageError(display_path(path), oserror_reason(exc, path)) from None
    if not data:
        raise ImageError(display_path(path), "empty file (0 bytes)")
    if len(data) > max_bytes:
        raise ImageError(display_path(path), f"file too large (over {_megabytes(max_bytes)})")
    return data


def raster_bytes(mode: str, size: tuple[int, int]) -> int:
    """Bytes Pillow holds for a decoded image: 1 per pixel for 8-bit one-band modes
    (L, P, 1), 2 for 16-bit grey, 4 for every other mode (multi-band pixels are
    stored in 32 bits)."""
    if mode in ("1", "L", "P"):
        per_pixel = 1
    elif mode.startswith("I;16"):
        per_pixel = 2
    else:
        per_pixel = 4
    return size[0] * size[1] * per_pixel


def decode_image(data: bytes, name: str = "<upload>", draft_size: int | None = None,
                 budget: DecodeBudget | None = None) -> PILImage.Image:
    """Decode bytes into an 8-bit RGB image, upright.

    ``draft_size``: the smallest side the caller needs. JPEGs are decoded by
    libjpeg at a reduced scale while both sides stay >= it (a large speed-up for a
    224 px model and a 12 Mpx photo; the later resize gives practically the same
    pixels), and a large raster of any format is reduced (box filter) to about
    that size as it is converted. ``budget``: reserve the raster's bytes there
    first (see :class:`DecodeBudget`).
    """
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise ImageError(name, "empty file (0 bytes)")
    # Our limits below replace Pillow's pixel-count bomb check, which runs before a
    # JPEG's draft reduction and so refused genuine 108-megapixel photos.
    Image.MAX_IMAGE_PIXELS = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if img.format == "JPEG" and (short := jpeg_data_too_short(data, img)):
                raise ImageError(name, short)
            if draft_size and img.format == "JPEG":
                img.draft("RGB", (draft_size, draft_size))
            (w, h), needed = img.size, raster_bytes(img.mode, img.size)
            if w * h > MAX_IMAGE_PIXELS:
                raise ImageError(name, f"image too large ({w}x{h} pixels, limit {MAX_IMAGE_PIXELS})")
            if needed > MAX_DECODE_BYTES:
                raise ImageError(name, f"image too large to decode ({w}x{h} {img.mode} needs "
                                       f"{_megabytes(needed)}, limit {_megabytes(MAX_DECODE_BYTES)})")
            # The raster, plus what converting it needs at most (a chunk, or a copy).
            reserved = needed + min(needed, CHUNK_OVERHEAD_BYTES)
            if budget is not None:
                budget.reserve(reserved)
            try:
                return _decode_upright_rgb(img, needed, draft_size)
            finally:
                if budget is not None:
                    budget.release(reserved)
    except (ImageError, DecodeBusy):
        raise
    except UnidentifiedImageError:
        raise ImageError(name, "not a recognised image format") from None
    except (Image.DecompressionBombError, MemoryError) as exc:
        raise ImageError(name, f"decompression bomb refused ({exc})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        reason = str(exc) or type(exc).__name__
        raise ImageError(name, f"cannot decode: {reason}") from None


def _start_of_frame(data: bytes) -> int | None:
    """The SOFn marker byte of a JPEG's frame header (None if not found before the scan)."""
    pos = 2
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xFF:  # a fill byte before the marker
            pos += 1
        elif 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return marker
        elif marker in (0xDA, 0xD9):  # start of scan / end of image: no frame header before
            return None
        elif marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            pos += 2
        else:
            pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
    return None


def jpeg_data_too_short(data: bytes, img: PILImage.Image) -> str | None:
    """Why a JPEG cannot hold the pixels its header declares, or None. A header
    patched to 65000x65000 on a few KB of data otherwise decodes "successfully"
    (libjpeg fills what is missing with grey) into a raster of hundreds of MB.
    The bound is exact, not a guess: at least one bit per 8x8 block of the
    largest component (see :data:`HUFFMAN_SOF_MARKERS`). A genuine photo has
    ~100 bits per block, so a truncated one keeps Pillow's own verdict."""
    import math

    w, h = img.size
    layers = getattr(img, "layer", None) or [("", 1, 1, 0)]
    if not (w and h) or _start_of_frame(data) not in HUFFMAN_SOF_MARKERS:
        return None
    h_max, v_max = max(layer[1] for layer in layers) or 1, max(layer[2] for layer in layers) or 1
    blocks = max(math.ceil(math.ceil(w * hc / h_max) / 8) * math.ceil(math.ceil(h * vc / v_max) / 8)
                 for _, hc, vc, _ in layers)
    if len(data) * 8 >= blocks:
        return None
    return (f"truncated or corrupt JPEG data: declares {w}x{h} pixels, which need at least "
            f"{_megabytes(blocks // 8)}, but the file has {len(data):,} bytes")


def _decode_upright_rgb(img: PILImage.Image, needed: int, draft_size: int | None) -> PILImage.Image:
    from PIL import ImageOps

    orientation = img.getexif().get(0x0112, 1)  # read before the pixels: reduction drops the EXIF
    img.load()
    if needed <= CHUNKED_ABOVE_BYTES:
        # In place: without an orientation tag exif_transpose would copy the image (~0.25 ms).
        ImageOps.exif_transpose(img, in_place=True)
        return to_rgb(img)
    factor = max(1, min(img.size) // draft_size) if draft_size else 1
    out = _reduce_in_chunks(img, factor)
    method = {2: 0, 3: 3, 4: 1, 5: 5, 6: 4, 7: 6, 8: 2}.get(orientation if isinstance(orientation, int) else 1)
    return out.transpose(method) if method is not None else out


def _reduce_in_chunks(img: PILImage.Image, factor: int) -> PILImage.Image:
    """``to_rgb(img).reduce(factor)`` without ever holding a converted copy of the
    whole raster: bands of rows (a multiple of ``factor`` high, so the boxes are
    those of a whole-image reduce) are converted and reduced one at a time."""
    from PIL import Image

    w, h = img.size
    scale = _sixteen_bit_scale(img)
    out = Image.new("RGB", (-(-w // factor), -(-h // factor)))
    band = factor * max(1, CHUNK_PIXELS // (w * factor))
    for top in range(0, h, band):
        chunk = to_rgb(img.crop((0, top, w, min(h, top + band))), scale)
        out.paste(chunk.reduce(factor) if factor > 1 else chunk, (0, top // factor))
    return out


def _sixteen_bit_scale(img: PILImage.Image) -> float:
    """How 16/32-bit grey maps to 8 bits: 255/65535 when any value exceeds 255
    (a 16-bit image), else 1 (values already in 0..255)."""
    if img.mode not in SIXTEEN_BIT_MODES:
        return 1.0
    hi = img.getextrema()[1]
    return 255.0 / 65535.0 if float(hi) > 255 else 1.0


def load_image(path: str | os.PathLike[str], draft_size: int | None = None,
               budget: DecodeBudget | None = None) -> PILImage.Image:
    """Open (regular files only, size-capped), read and decode one image file."""
    return decode_image(read_image_bytes(path), display_path(path), draft_size, budget)


def to_rgb(img: PILImage.Image, sixteen_bit_scale: float | None = None) -> PILImage.Image:
    """Convert any Pillow mode to 8-bit RGB. Transparency is composited on white
    (transparent pixels have no defined colour); 16/32-bit grey is rescaled rather
    than clipped (Pillow's plain convert would saturate it to white), row block by
    row block so the float temporaries stay small."""
    from PIL import Image

    mode = img.mode
    if mode == "RGB":
        return img
    if mode in SIXTEEN_BIT_MODES:
        import numpy as np

        scale = _sixteen_bit_scale(img) if sixteen_bit_scale is None else sixteen_bit_scale
        w, h = img.size
        out = np.empty((h, w), dtype=np.uint8)
        rows = max(1, CHUNK_PIXELS // max(1, w))
        for top in range(0, h, rows):
            block = np.asarray(img.crop((0, top, w, min(h, top + rows))), dtype=np.float64)
            out[top:top + rows] = np.clip(block * scale + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(out, "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")
