"""Preprocessing derived from a :class:`~cbir_cli.models.registry.CnnConfig` and
its :class:`~cbir_cli.models.registry.DescriptorSettings`: RGB PIL image -> uint8
pixels, with Pillow and numpy only (no torch on the query path).

One scale gives one uint8 ``(3, H, W)`` array, several scales a tuple of them
(smallest scale first). ``crop`` inputs are squares of one size; ``full`` inputs
keep the image's aspect ratio, so their shapes vary from image to image: sizes are
rounded to multiples of the network's stride, which makes many images share a
shape (they batch together; see :mod:`.scales`) and never pads anything (padding
changes the descriptor).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image as PILImage

    from .registry import CnnConfig

# PIL resampling filters by torchvision InterpolationMode name.
_PIL_FILTERS = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}
# Full-image inputs keep at most this long/short side ratio (the centre of a wider
# panorama): bounds the work and memory of one image.
MAX_ASPECT = 4.0

# One image's model input: an array per scale (a bare array for one scale).
Pixels = Any


def centre_crop_pixels(img: PILImage.Image, resize: int, crop: int, interpolation: str) -> np.ndarray:
    """Resize the short side to ``resize``, centre-crop ``crop`` x ``crop``.

    What torchvision's ``resize``/``center_crop``/``pil_to_tensor`` do to a PIL
    image (same output-size rounding, same Pillow filter, same crop offsets; pixels
    within 1/255, a test checks), written with Pillow and numpy alone so that
    the query path on ONNX Runtime never imports torch (~7 s of a cold
    ``cbir query``). Normalisation happens on the batch, on the model's device (see
    :meth:`TorchEmbedder.embed`), which keeps worker-to-main transfers 4x smaller.
    """
    import numpy as np

    w, h = img.size
    if w <= h:
        new_w, new_h = resize, int(resize * h / w)
    else:
        new_w, new_h = int(resize * w / h), resize
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
        img = img.resize((crop, crop), _PIL_FILTERS[interpolation],
                         box=(left * sx, top * sy, (left + crop) * sx, (top + crop) * sy))
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))


def full_image_size(width: int, height: int, short: int, config: CnnConfig,
                    step: int | None = None) -> tuple[int, int]:
    """Model input (width, height) for a full image of ``width`` x ``height`` whose
    short side becomes ``short``: the long side keeps the aspect ratio (at most
    :data:`MAX_ASPECT`), rounded to a multiple of ``step`` (default: the stride)."""
    step = step or config.stride
    ratio = min(MAX_ASPECT, max(width, height) / max(1, min(width, height)))
    long = max(short, round(short * ratio / step) * step)
    return (long, short) if width > height else (short, long)


def full_image_pixels(img: PILImage.Image, short: int, config: CnnConfig, step: int | None = None) -> np.ndarray:
    """The whole image (the centre of one wider than :data:`MAX_ASPECT`) resized to
    :func:`full_image_size`."""
    import numpy as np

    w, h = img.size
    if max(w, h) > MAX_ASPECT * min(w, h):
        keep = round(MAX_ASPECT * min(w, h))
        left, top = ((w - keep) // 2, 0) if w > h else (0, (h - keep) // 2)
        img = img.crop((left, top, left + min(w, keep), top + min(h, keep)))
    size = full_image_size(*img.size, short, config, step)
    if size != img.size:
        img = img.resize(size, _PIL_FILTERS[config.interpolation])
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))


def preprocess_image(img: PILImage.Image, config: CnnConfig) -> Pixels:
    """RGB PIL image -> the model input of ``config`` (see the module docstring):
    ``crop`` resizes the short side to ``resize_size`` x scale and takes the centre
    square of ``input_size`` x scale (rounded to the stride when scaled); ``full``
    resizes the short side to ``input_size`` x scale, rounded to the stride."""
    descriptor = config.descriptor
    out = []
    for scale in descriptor.scales:
        if descriptor.input == "crop":
            resize, crop = round(config.resize_size * scale), config.scaled(config.input_size * scale)
            out.append(centre_crop_pixels(img, resize, crop, config.interpolation))
        else:
            out.append(full_image_pixels(img, config.scaled(config.input_size * scale), config))
    return out[0] if len(out) == 1 else tuple(out)


def image_preprocessor(config: CnnConfig) -> Callable[[PILImage.Image], Pixels]:
    """A picklable preprocessing function (usable in decoding worker processes)."""
    return partial(preprocess_image, config=config)

