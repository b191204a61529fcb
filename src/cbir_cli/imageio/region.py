"""A region of an image (``cbir query --box``, the page's rectangle): parsed from
``x0,y0,x1,y1`` in pixels or in fractions of the width and height, and cut out of
the upright image before it is embedded."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import CbirError

if TYPE_CHECKING:
    from PIL import Image as PILImage

# A region smaller than this (px, each side) holds too little to search with.
MIN_SIDE = 8


@dataclass(frozen=True)
class Box:
    """Left, top, right, bottom. All four within 0..1: fractions of the image's
    width and height; otherwise pixels of the upright image (a 1-pixel region is
    no query, so the two readings never collide in practice)."""

    x0: float
    y0: float
    x1: float
    y1: float

    @classmethod
    def parse(cls, text: str) -> Box:
        """``"x0,y0,x1,y1"`` -> a :class:`Box` (CbirError naming the problem)."""
        parts = [p.strip() for p in str(text).split(",")]
        try:
            values = [float(p) for p in parts]
        except ValueError:
            values = []
        if len(values) != 4 or any(v != v or v in (float("inf"), float("-inf")) for v in values):
            raise CbirError(f"a region is four numbers x0,y0,x1,y1 (pixels, or fractions 0-1); got {text!r:.60}")
        box = cls(*values)
        if box.x1 <= box.x0 or box.y1 <= box.y0 or min(values) < 0:
            raise CbirError(f"region {box.text}: needs 0 <= x0 < x1 and 0 <= y0 < y1")
        return box

    @property
    def fractional(self) -> bool:
        return max(self.x0, self.y0, self.x1, self.y1) <= 1.0

    @property
    def text(self) -> str:
        return ",".join(f"{v:g}" for v in (self.x0, self.y0, self.x1, self.y1))

    def pixels(self, width: int, height: int) -> tuple[int, int, int, int]:
        """The region in pixels of a ``width`` x ``height`` image, clipped to it."""
        if self.fractional:
            coords = (self.x0 * width, self.y0 * height, self.x1 * width, self.y1 * height)
        else:
            coords = (self.x0, self.y0, self.x1, self.y1)
        x0, y0 = max(0, round(coords[0])), max(0, round(coords[1]))
        x1, y1 = min(width, round(coords[2])), min(height, round(coords[3]))
        if x1 - x0 < MIN_SIDE or y1 - y0 < MIN_SIDE:
            raise CbirError(f"region {self.text} of a {width}x{height} image: less than {MIN_SIDE}x{MIN_SIDE} "
                            "pixels inside the image")
        return x0, y0, x1, y1

    def crop(self, image: PILImage.Image) -> PILImage.Image:
        """The region of ``image`` (upright, as decoded)."""
        return image.crop(self.pixels(*image.size))
