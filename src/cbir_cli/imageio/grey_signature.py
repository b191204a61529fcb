"""A colour-blind signature of a whole picture: its grey levels at 16 x 16, mean
removed, unit length (cosine compares two), and whether the picture is grey.

Why: a greyscale copy of a colour photo has the photo's grey levels exactly, while
a CNN descriptor of it moves far from the photo's (colour is much of what it
sees). For a grey picture, the most similar signatures are where its original
is; local features then verify it (:mod:`cbir_cli.search.verify`). Cheap: a
reduced (draft) decode and a 256-value vector per picture.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image as PILImage

SIDE = 16
DRAFT = 128  # decode JPEGs at >= this size (the signature needs 16 px)
# A picture is grey when its channels differ by at most this many levels on
# average (a greyscale copy re-encoded as colour JPEG keeps them within ~2).
GREY_MAX_CHANNEL_DIFF = 3.0


def grey_signature(img: PILImage.Image) -> tuple[np.ndarray, bool]:
    """(signature, is_grey) of ``img``."""
    import numpy as np
    from PIL import Image

    small = img.convert("RGB").resize((64, 64), Image.Resampling.BILINEAR)
    rgb = np.asarray(small, dtype=np.float32)
    channel_diff = float(np.abs(rgb - rgb.mean(axis=2, keepdims=True)).mean())
    grey = np.asarray(img.convert("L").resize((SIDE, SIDE), Image.Resampling.BOX), dtype=np.float32).ravel()
    grey -= grey.mean()
    norm = float(np.linalg.norm(grey))
    return (grey / norm if norm > 0 else grey), channel_diff <= GREY_MAX_CHANNEL_DIFF


def signature_file(path: str | os.PathLike[str]) -> tuple[np.ndarray, bool] | None:
    """:func:`grey_signature` of an image file (reduced decode); ``None`` if unreadable."""
    from ..errors import ImageError
    from .decode import load_image

    try:
        return grey_signature(load_image(str(path), draft_size=DRAFT))
    except ImageError:
        return None
