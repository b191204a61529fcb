"""A JPEG whose header declares more pixels than its data can hold is refused with
one reason (issue 20, item 7): libjpeg would "decode" it, filling the missing
pixels with grey, into a raster of hundreds of MB. Genuine JPEGs, even the most
compressible ones, and ordinary truncated files keep their behaviour."""

from __future__ import annotations

import io

import numpy as np
import pytest
from conftest import make_image
from PIL import Image

from cbir_cli.errors import ImageError
from cbir_cli.imageio.decode import decode_image, load_image


def jpeg(img: Image.Image, **save) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", **save)
    return buf.getvalue()


def declaring(data: bytes, width: int, height: int) -> bytes:
    """``data`` with its SOF0 header patched to declare width x height."""
    patched = bytearray(data)
    sof = patched.index(b"\xff\xc0")
    patched[sof + 5:sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(patched)


@pytest.mark.parametrize(("width", "height", "draft"), [(65000, 65000, 224), (4000, 3000, None)])
def test_a_header_declaring_more_pixels_than_the_data_holds_is_refused(tmp_path, width, height, draft):
    path = tmp_path / "patched.jpg"
    path.write_bytes(declaring(jpeg(make_image(1), quality=90), width, height))
    with pytest.raises(ImageError) as caught:
        load_image(path, draft_size=draft)
    message = str(caught.value)
    assert message.startswith(f"{path}: truncated or corrupt JPEG data: declares {width}x{height} pixels")
    assert "\n" not in message


@pytest.mark.parametrize("save", [
    {"quality": 90},
    {"quality": 90, "progressive": True},
    {"quality": 75, "subsampling": 0},
    {"quality": 75, "subsampling": 2},
])
def test_genuine_jpegs_still_decode(save):
    img = make_image(3, (300, 200))
    for mode in ("RGB", "L", "CMYK"):
        assert decode_image(jpeg(img.convert(mode), **save), "ok.jpg").size == (300, 200)


def test_the_most_compressible_genuine_jpeg_is_not_taken_for_corrupt():
    # One flat colour with optimised Huffman tables: about the fewest bits a
    # Huffman-coded JPEG spends per 8x8 block, still above the bound.
    flat = Image.new("RGB", (2400, 1600), (120, 130, 140))
    data = jpeg(flat, quality=10, optimize=True, subsampling=2)
    decoded = decode_image(data, "flat.jpg", draft_size=224)
    assert np.abs(np.asarray(decoded, dtype=int) - (120, 130, 140)).max() <= 10  # quality 10


def test_an_ordinary_truncated_jpeg_keeps_its_reason():
    full = jpeg(make_image(1), quality=90)
    with pytest.raises(ImageError, match="cannot decode: image file is truncated"):
        decode_image(full[: len(full) // 2], "truncated.jpg")


def test_the_device_decoder_is_not_given_it():
    pytest.importorskip("torch")
    from cbir_cli.imageio.gpu_decode import device_jpeg

    genuine = jpeg(make_image(1), quality=90)
    assert device_jpeg(genuine) is not None
    assert device_jpeg(declaring(genuine, 9000, 9000)) is None  # the CPU path refuses it with the reason
