"""Preprocessing derived from a :class:`~cbir_cli.models.registry.ModelConfig`:
RGB PIL image -> uint8 (3, S, S) pixels, with Pillow and numpy only (no torch on
the query path)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image as PILImage

    from .registry import ModelConfig

# PIL resampling filters by torchvision InterpolationMode name.
_PIL_FILTERS = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}


def preprocess_image(img: PILImage.Image, config: ModelConfig) -> np.ndarray:
    """RGB PIL image -> uint8 array (3, input_size, input_size): resize the short
    side to ``resize_size``, centre-crop ``input_size``.

    What torchvision's ``resize``/``center_crop``/``pil_to_tensor`` do to a PIL
    image (same output-size rounding, same Pillow filter, same crop offsets; pixels
    within 1/255, a test checks), written with Pillow and numpy alone so that
    the query path on ONNX Runtime never imports torch (~7 s of a cold
    ``cbir query``). Normalisation happens on the batch, on the model's device (see
    :meth:`TorchEmbedder.embed`), which keeps worker-to-main transfers 4x smaller.
    """
    import numpy as np

    w, h = img.size
    size = config.resize_size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    crop = config.input_size
    if crop > min(new_w, new_h):
        raise ValueError(f"crop {crop} larger than resized image {new_w}x{new_h}")
    top = round((new_h - crop) / 2.0)
    left = round((new_w - crop) / 2.0)
    if (new_w, new_h) == (w, h):
        img = img.crop((left, top, left + crop, top + crop))
    else:
        # Resample only the crop: ``box`` is the crop's region in source pixels, so
        # Pillow computes the same filter taps as a full resize followed by the crop
        # (pixels within 1/255, vectors cosine >= 0.9998 on Oxford-17) at about half
        # the cost (bench/extract.py --decode-check: 2.2 -> 1.2 ms per 500x700 photo).
        sx, sy = w / new_w, h / new_h
        img = img.resize((crop, crop), _PIL_FILTERS[config.interpolation],
                         box=(left * sx, top * sy, (left + crop) * sx, (top + crop) * sy))
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))


def image_preprocessor(config: ModelConfig) -> Callable[[PILImage.Image], np.ndarray]:
    """A picklable preprocessing function (usable in decoding worker processes)."""
    return partial(preprocess_image, config=config)


