"""Decoding: every Pillow mode ends as upright 8-bit RGB; failures name the reason."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from cbir_cli.errors import CbirError, ImageError
from cbir_cli.imageio.decode import decode_image, load_image
from cbir_cli.imageio.files import list_images
from tests.conftest import make_image


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def test_rgba_is_composited_on_white_not_black():
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red
    out = decode_image(encode(rgba, "PNG"))
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (255, 255, 255)


def test_16bit_grey_is_rescaled_not_saturated():
    arr = np.full((4, 4), 32768, dtype=np.uint16)  # mid-grey in 16 bits
    out = decode_image(encode(Image.fromarray(arr), "PNG"))
    assert out.mode == "RGB" and abs(out.getpixel((0, 0))[0] - 128) <= 1


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "1"])
def test_other_modes_become_rgb(mode):
    src = make_image(1, (64, 48)).convert(mode)
    fmt = "JPEG" if mode in ("L", "CMYK") else "PNG"
    out = decode_image(encode(src, fmt))
    assert out.mode == "RGB" and out.size == (64, 48)


def test_exif_orientation_is_applied():
    img = make_image(2, (80, 40))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    out = decode_image(encode(img, "JPEG", exif=exif, quality=95))
    assert out.size == (40, 80)


def test_jpeg_draft_decodes_smaller_but_not_below_target():
    big = make_image(3, (1600, 1200))
    out = decode_image(encode(big, "JPEG", quality=90), draft_size=256)
    assert 256 <= min(out.size) < 1200


@pytest.mark.parametrize(
    "data, reason",
    [(b"", "empty file (0 bytes)"), (b"hello world", "not a recognised image format")],
)
def test_undecodable_bytes_raise_image_error_with_reason(data, reason):
    with pytest.raises(ImageError) as info:
        decode_image(data, "x.jpg")
    assert info.value.reason == reason and str(info.value) == f"x.jpg: {reason}"


def test_truncated_jpeg_is_an_error_not_a_grey_image(tmp_path):
    data = encode(make_image(4), "JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match=r"cut\.jpg: cannot decode"):
        load_image(path)


def test_list_images_is_sorted_recursive_and_ignores_non_images(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "a.jpg").write_bytes(b"x")
    (tmp_path / "b" / "c.PNG").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "dir.jpg").mkdir()  # a folder named like an image is not an image
    assert [p.name for p in list_images(tmp_path)] == ["a.jpg", "c.PNG"]
    with pytest.raises(CbirError, match="folder does not exist"):
        list_images(tmp_path / "missing")
    with pytest.raises(CbirError, match="not a folder"):
        list_images(tmp_path / "a.jpg")
