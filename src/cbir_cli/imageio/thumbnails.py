"""Thumbnails and thumbnail grids: what every visual output is made of (the
``cbir evaluate`` report, ``cbir query --report/--grid``, the ``cbir dedup``
report). Pillow only.

* :func:`thumbnail` -- an image file (or a decoded image) shrunk into a square box;
* :class:`ThumbnailFolder` -- thumbnails written once as JPEGs under a report's
  ``thumbs/`` folder (for its HTML) and kept in memory (for its PNG grids);
* :func:`compose_grid` -- rows of framed tiles, each with an optional caption line
  (a score, a name), as one image.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ImageError
from .decode import DecodeBudget, load_image

if TYPE_CHECKING:
    from PIL import Image as PILImage

FRAME = 5  # coloured frame around each tile, px
GAP = 4
CAPTION_HEIGHT = 18
WHITE = (255, 255, 255)
MISSING = (200, 200, 200)


def thumbnail(source: str | os.PathLike[str] | PILImage.Image, size: int,
              budget: DecodeBudget | None = None) -> PILImage.Image:
    """``source`` (a file, decoded with a JPEG draft near ``size``, or an image)
    shrunk to fit ``size`` x ``size``, aspect kept. A file that cannot be read
    raises :class:`ImageError`; ``budget``: the memory its decoding shares (a server's)."""
    if isinstance(source, (str, os.PathLike)):
        img = load_image(source, draft_size=size, budget=budget)
    else:
        img = source.copy()
    img.thumbnail((size, size))
    return img


class ThumbnailFolder:
    """Thumbnails of ``size`` px written once under ``out_dir/thumbs/`` (named by a
    hash of their key, so any path is a safe file name) and kept in memory
    (``out_dir`` None: in memory only, for a grid without a page)."""

    def __init__(self, out_dir: Path | None, size: int) -> None:
        self.folder = out_dir / "thumbs" if out_dir is not None else None
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
        self.size = size
        self._images: dict[str, PILImage.Image | None] = {}

    def name(self, key: str) -> str:
        """The file name under ``thumbs/`` of the thumbnail of ``key`` (a path)."""
        return hashlib.sha256(os.fsencode(key)).hexdigest()[:16] + ".jpg"

    def get(self, path: str) -> PILImage.Image | None:
        """The thumbnail of image file ``path`` (None if it cannot be read)."""
        if path not in self._images:
            try:
                self.put(path, load_image(path, draft_size=self.size))
            except ImageError:
                self._images[path] = None
        return self._images[path]

    def put(self, key: str, image: PILImage.Image) -> PILImage.Image:
        """Store the thumbnail of an image that is not a file of its own (an upload,
        a region of a photo) under ``key``."""
        small = thumbnail(image, self.size)
        if self.folder is not None:
            small.save(self.folder / self.name(key), quality=85)
        self._images[key] = small
        return small


@dataclass(frozen=True)
class Tile:
    """One cell of a grid: a thumbnail (None: unreadable, drawn grey), the colour of
    its frame and an optional caption under it."""

    image: PILImage.Image | None
    colour: tuple[int, int, int]
    caption: str | None = None


def _tile_image(tile: Tile, box: int, caption_height: int) -> PILImage.Image:
    from PIL import Image, ImageDraw, ImageFont

    side = box + 2 * FRAME
    canvas = Image.new("RGB", (side, side + caption_height), WHITE)
    canvas.paste(Image.new("RGB", (side, side), tile.colour), (0, 0))
    inner = Image.new("RGB", (box, box), WHITE if tile.image is not None else MISSING)
    if tile.image is not None:
        inner.paste(tile.image, ((box - tile.image.width) // 2, (box - tile.image.height) // 2))
    canvas.paste(inner, (FRAME, FRAME))
    if tile.caption and caption_height:
        font = ImageFont.load_default(size=caption_height - 4)
        ImageDraw.Draw(canvas).text((FRAME, side + 1), tile.caption, fill=(20, 20, 20), font=font)
    return canvas


def compose_grid(rows: list[list[Tile]], box: int, columns: int | None = None) -> PILImage.Image:
    """One image of ``rows`` of tiles (``box`` px thumbnails, framed), ``columns``
    wide (default: the longest row); a caption line is added under every tile when
    any tile has a caption."""
    from PIL import Image

    captions = CAPTION_HEIGHT if any(t.caption for row in rows for t in row) else 0
    side = box + 2 * FRAME
    columns = columns if columns is not None else max((len(r) for r in rows), default=1)
    width = columns * side + (columns + 1) * GAP
    row_height = side + captions + GAP
    canvas = Image.new("RGB", (width, max(1, len(rows)) * row_height + GAP), WHITE)
    for r, row in enumerate(rows):
        for c, tile in enumerate(row):
            canvas.paste(_tile_image(tile, box, captions), (GAP + c * (side + GAP), GAP + r * row_height))
    return canvas
