"""A corpus of awkward and broken files, generated here: each is either embedded
correctly or skipped with a one-line reason; the run finishes and counts them."""

from __future__ import annotations

import io
import json
import os
import random
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import make_image
from PIL import Image
from typer.testing import CliRunner

from cbir_cli.cli import app
from cbir_cli.pipeline.options import ExtractOptions
from cbir_cli.pipeline.sync import sync_folder
from cbir_cli.search.check import check_index
from cbir_cli.store.feature_store import FeatureStore

OPTIONS = ExtractOptions(workers=0, batch_size=4, shard_size=4)
NON_UTF8_NAME = os.fsdecode(b"caf\xe9-non-utf8.jpg")
EXIF_ORIENTATION = 0x0112


def jpeg_bytes(img: Image.Image, **save_args) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, **save_args)
    return buf.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A valid 8x8 PNG whose header claims width x height (CRC fixed up)."""
    buf = io.BytesIO()
    Image.new("L", (8, 8)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    ihdr = bytearray(data[16:29])  # after signature (8), length (4), type (4)
    ihdr[0:8] = struct.pack(">II", width, height)
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)))
    return bytes(data)


# name -> reason (substring) it must be skipped with; None = must be embedded.
EXPECTED: dict[str, str | None] = {
    "zero.jpg": "empty file (0 bytes)",
    "truncated.jpg": "cannot decode: image file is truncated",
    "random.jpg": "not a recognised image format",
    "text.png": "not a recognised image format",
    "bomb.png": "image too large (100000x100000 pixels",
    "large.png": "image too large (10000x10000 pixels",  # Pillow's warning zone is refused too
    "loop.jpg": "symlink loop",
    "pipe.jpg": "not a regular file",
    "alpha.png": None,
    "anim.gif": None,
    "cmyk.jpg": None,
    "gray16.png": None,
    "exif_rotated.jpg": None,
    "album.jpg/inside.jpg": None,
    NON_UTF8_NAME: None,
    "plain.jpg": None,
}


def write_corpus(folder: Path) -> None:
    folder.mkdir(parents=True)
    base = make_image(1)
    rng = random.Random(0)
    (folder / "zero.jpg").write_bytes(b"")
    full = jpeg_bytes(base)
    (folder / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (folder / "random.jpg").write_bytes(bytes(rng.randrange(256) for _ in range(4096)))
    (folder / "text.png").write_text("this is not a picture\n")
    (folder / "bomb.png").write_bytes(png_declaring(100_000, 100_000))  # above Pillow's hard limit
    (folder / "large.png").write_bytes(png_declaring(10_000, 10_000))  # in Pillow's warning zone
    (folder / "loop.jpg").symlink_to("loop.jpg")
    os.mkfifo(folder / "pipe.jpg")
    rgba = base.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(base.size))
    rgba.save(folder / "alpha.png")
    frames = [make_image(s).convert("P", palette=Image.Palette.ADAPTIVE) for s in (2, 3, 4)]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    (folder / "cmyk.jpg").write_bytes(jpeg_bytes(make_image(5).convert("CMYK")))
    wide = (np.asarray(make_image(6).convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    Image.fromarray(wide).save(folder / "gray16.png")  # uint16 -> mode I;16
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6  # "rotate 90 degrees clockwise to display"
    (folder / "exif_rotated.jpg").write_bytes(jpeg_bytes(make_image(7), exif=exif.tobytes()))
    (folder / "album.jpg").mkdir()  # a directory named like an image: walked, not read
    make_image(8).save(folder / "album.jpg" / "inside.jpg", quality=90)
    make_image(9).save(folder / NON_UTF8_NAME, quality=90)
    make_image(10).save(folder / "plain.jpg", quality=90)


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    folder = tmp_path / "corpus"
    write_corpus(folder)
    return folder


def embed(embedder, img: Image.Image) -> np.ndarray:
    return embedder.embed_images([img])[0]


def test_each_bad_file_is_skipped_with_its_reason_and_the_rest_embedded(corpus, tmp_path, tiny_embedder):
    store_dir = tmp_path / "store"
    summary = sync_folder(corpus, store_dir, embedder=tiny_embedder, options=OPTIONS)

    bad = {name: reason for name, reason in EXPECTED.items() if reason}
    good = [name for name, reason in EXPECTED.items() if reason is None]
    skipped = dict(summary.skipped_files)
    assert sorted(skipped) == sorted(str(corpus / name) for name in bad)
    for name, reason in bad.items():
        assert reason in skipped[str(corpus / name)] and "\n" not in skipped[str(corpus / name)]
    assert (summary.skipped, summary.added, summary.embedded) == (len(bad), len(good), len(good))
    assert summary.files == len(EXPECTED)  # the directory album.jpg is not a file
    rows = FeatureStore.open(store_dir).rows_by_path()
    assert sorted(rows) == sorted(str(corpus / name) for name in good)
    assert check_index(store_dir).ok

    # A re-run reports the bad files again without decoding them.
    again = sync_folder(corpus, store_dir, embedder=tiny_embedder, options=OPTIONS)
    assert (again.skipped, again.embedded, again.unchanged) == (len(bad), 0, len(good))


def test_odd_formats_are_embedded_as_the_picture_they_show(corpus, tmp_path, tiny_embedder):
    sync_folder(corpus, tmp_path / "store", embedder=tiny_embedder, options=OPTIONS)
    store = FeatureStore.open(tmp_path / "store")
    stored = {Path(r.path).name: v for r, v in zip(store.live_rows(), store.load_vectors())}

    # EXIF orientation 6: the same vector as the pixels rotated by hand, not the raw ones.
    raw = Image.open(corpus / "exif_rotated.jpg")
    raw.load()
    upright = raw.convert("RGB").transpose(Image.Transpose.ROTATE_270)
    np.testing.assert_allclose(stored["exif_rotated.jpg"], embed(tiny_embedder, upright), atol=1e-5)
    assert not np.allclose(stored["exif_rotated.jpg"], embed(tiny_embedder, raw.convert("RGB")), atol=1e-2)

    # Alpha is composited on white (not dropped, which would expose hidden colours).
    rgba = Image.open(corpus / "alpha.png")
    white = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")
    np.testing.assert_allclose(stored["alpha.png"], embed(tiny_embedder, white), atol=1e-5)
    assert not np.allclose(stored["alpha.png"], embed(tiny_embedder, rgba.convert("RGB")), atol=1e-2)

    # 16-bit grey is rescaled to 8 bits, not clipped to white.
    grey8 = make_image(6).convert("L").convert("RGB")
    np.testing.assert_allclose(stored["gray16.png"], embed(tiny_embedder, grey8), atol=1e-5)

    # Animated GIF: its first frame. CMYK JPEG: close to the RGB picture it came from.
    first = Image.open(corpus / "anim.gif").convert("RGB")
    np.testing.assert_allclose(stored["anim.gif"], embed(tiny_embedder, first), atol=1e-5)
    assert float(stored["cmyk.jpg"] @ embed(tiny_embedder, make_image(5))) > 0.9

    # The non-UTF-8 name round-trips through the store (surrogate escapes).
    assert NON_UTF8_NAME in stored


def test_cli_warns_once_per_bad_file_on_one_line_naming_it(corpus, tmp_path):
    result = CliRunner().invoke(app, ["index", str(corpus), "--index", str(tmp_path / "index"),
                                      "--model", "test_tiny", "--workers", "0", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    bad = [name for name, reason in EXPECTED.items() if reason]
    assert summary["skipped"] == len(bad)
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == len(bad)
    for name in bad:
        (line,) = [w for w in warnings if f"skipped {corpus / name}: " in w]
        assert EXPECTED[name] in line


@pytest.mark.skipif(os.geteuid() == 0, reason="running as root: chmod 000 does not stop root from reading")
def test_unreadable_file_is_skipped_with_permission_denied(tmp_path, tiny_embedder):
    folder = tmp_path / "photos"
    folder.mkdir()
    make_image(1).save(folder / "ok.jpg")
    locked = folder / "locked.jpg"
    make_image(2).save(locked)
    locked.chmod(0)
    try:
        summary = sync_folder(folder, tmp_path / "store", embedder=tiny_embedder, options=OPTIONS)
    finally:
        locked.chmod(0o644)
    assert summary.skipped_files == [(str(locked), "permission denied")]
    assert summary.embedded == 1


def test_a_full_disk_is_one_line_and_keeps_what_was_committed(tmp_path, image_folder, monkeypatch):
    """ENOSPC while writing a shard: no traceback, one line naming the file and what
    the index keeps, no temporary left taking space; the next run completes."""
    import errno

    from cbir_cli import fsutil

    folder = image_folder(8)
    index = tmp_path / "index"
    shard_writes = []
    real_open = open

    def open_until_full(path, *args, **kwargs):
        if ".npy" in str(path) and "w" in (args[0] if args else kwargs.get("mode", "r")):
            shard_writes.append(path)
            if len(shard_writes) >= 3:
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(fsutil, "open", open_until_full, raising=False)
    args = ["index", str(folder), "--index", str(index), "--model", "test_tiny", "--workers", "0",
            "--batch-size", "2", "--shard-size", "2"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1 and result.exception is not None
    assert isinstance(result.exception, SystemExit), result.exception  # a clean exit, not an error escaping
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output
    assert "shard-000003.npy: cannot write (No space left on device)" in errors[0]
    assert "the index keeps the 4 images committed before; run the same command again to resume" in errors[0]
    assert FeatureStore.open(index).count == 4 and check_index(index).ok
    assert not [p for p in (index / "shards").iterdir() if ".tmp-" in p.name]

    monkeypatch.undo()
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert FeatureStore.open(index).count == 8
