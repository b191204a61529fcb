"""One way to open an image for every path (issue 10, items 7 and 8): regular files
only, a size cap, the same one-line reasons; memory bounded by bytes; large JPEGs
decoded at reduced size instead of refused."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import make_image
from PIL import Image

from cbir_cli.errors import ImageError
from cbir_cli.imageio import decode
from cbir_cli.imageio.decode import decode_image, load_image, read_image_bytes


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def run_cli_bounded(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`cbir ARGS` in a child with 2 GB of address space and 120 s: an unbounded read
    fails here instead of taking the machine down, a hang times out."""
    import resource

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))

    return subprocess.run([sys.executable, "-m", "cbir_cli.cli", *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd, preexec_fn=limit, env={**os.environ, "CBIR_OFFLINE": "1"})


@pytest.fixture
def index_of_two(tmp_path, image_folder, tiny_embedder) -> Path:
    from cbir_cli.pipeline.options import ExtractOptions
    from cbir_cli.pipeline.sync import index_folder

    index_dir = tmp_path / "index"
    index_folder(image_folder(2), index_dir, embedder=tiny_embedder, options=ExtractOptions(workers=0))
    return index_dir


@pytest.mark.parametrize("kind", ["fifo", "dev-zero"])
def test_query_refuses_what_is_not_a_regular_file_at_once(tmp_path, index_of_two, kind):
    target = tmp_path / "query.jpg"
    if kind == "fifo":
        os.mkfifo(target)
    else:
        target.symlink_to("/dev/zero")
    result = run_cli_bounded(["query", str(target), "--index", str(index_of_two)], tmp_path)
    assert result.returncode == 1, result.stderr[-2000:]
    assert result.stderr.strip() == f"error: {target}: not a regular file (pipe, socket or device)"


def test_query_with_a_folder_is_one_line_not_a_traceback(tmp_path, index_of_two):
    folder = tmp_path / "photos"
    folder.mkdir()
    result = run_cli_bounded(["query", str(folder), "--index", str(index_of_two)], tmp_path)
    assert result.returncode == 1, result.stderr[-2000:]
    assert result.stderr.strip() == f"error: {folder}: a folder, not an image file"
    with pytest.raises(ImageError, match=r"photos: a folder, not an image file$"):
        read_image_bytes(folder)


def test_the_same_reasons_on_every_path(tmp_path):
    missing, dangling = tmp_path / "missing.jpg", tmp_path / "dangling.jpg"
    dangling.symlink_to(tmp_path / "nowhere.jpg")
    with pytest.raises(ImageError, match=r"missing.jpg: file not found$"):
        load_image(missing)
    with pytest.raises(ImageError, match=r"dangling.jpg: file not found \(dangling symlink\)$"):
        load_image(dangling)
    big = tmp_path / "big.jpg"
    make_image(1).save(big)
    with pytest.raises(ImageError, match=r"big.jpg: file too large \(0.\d+ MB, limit 1e-06 MB\)"):
        read_image_bytes(big, max_bytes=1)
    from cbir_cli.pipeline.plan import hash_one

    os.mkfifo(tmp_path / "pipe.jpg")
    assert hash_one(tmp_path / "pipe.jpg").error == "not a regular file (pipe, socket or device)"
    assert hash_one(missing).error == "file not found"


def test_a_108_megapixel_jpeg_is_decoded_at_reduced_size_not_refused():
    photo = Image.new("L", (12_000, 9_000), 90)  # grey keeps the test light; same JPEG path
    buf = io.BytesIO()
    photo.save(buf, "JPEG", quality=70)
    img = decode_image(buf.getvalue(), "photo.jpg", draft_size=256)
    assert img.mode == "RGB" and img.size == (1_500, 1_125)  # libjpeg's 1/8 scale
    assert abs(int(np.asarray(img).mean()) - 90) <= 2
    with pytest.raises(ImageError, match="image too large"):  # all 108 Mpx: refused
        decode_image(buf.getvalue(), "photo.jpg")


def test_a_16_bit_bomb_is_decoded_in_chunks_to_the_right_picture(monkeypatch):
    """9400 x 9400 16-bit grey compresses to a few hundred KB; it is converted and
    reduced band by band (the memory figure is bench/serve_uploads.py's)."""
    seen = []
    real = decode._reduce_in_chunks
    monkeypatch.setattr(decode, "_reduce_in_chunks", lambda img, f: seen.append((img.size, f)) or real(img, f))
    wide = np.full((9_400, 9_400), 40_000, dtype=np.uint16)
    wide[:, :4_700] = 10_000  # left half darker
    data = png_bytes(Image.fromarray(wide))
    assert len(data) < 2_000_000
    img = decode_image(data, "wide.png", draft_size=224)
    assert seen == [((9_400, 9_400), 41)]
    assert img.size == (230, 230)
    pixels = np.asarray(img)
    assert abs(int(pixels[100, 20, 0]) - round(10_000 * 255 / 65535)) <= 1
    assert abs(int(pixels[100, 200, 0]) - round(40_000 * 255 / 65535)) <= 1


def test_raster_bytes_count_bit_depth_and_bands():
    assert decode.raster_bytes("L", (100, 10)) == 1_000
    assert decode.raster_bytes("I;16", (100, 10)) == 2_000
    assert decode.raster_bytes("RGB", (100, 10)) == 4_000  # Pillow stores RGB in 32 bits
    assert decode.raster_bytes("RGBA", (100, 10)) == 4_000


def test_decode_budget_bounds_concurrent_bytes_and_gives_up_after_its_timeout():
    from cbir_cli.imageio.decode import DecodeBudget, DecodeBusy

    budget = DecodeBudget(max_bytes=100, timeout=0.05)
    budget.reserve(80)
    with pytest.raises(DecodeBusy):
        budget.reserve(30)
    released = threading.Timer(0.01, budget.release, args=(80,))
    budget.timeout = 5
    released.start()
    budget.reserve(30)  # waits for the release
    assert budget.in_use == 30
    budget.release(30)
    budget.reserve(10_000)  # one image always fits: it takes the whole budget
    assert budget.in_use == 100


def test_an_unreadable_sub_folder_is_warned_about_and_its_entries_kept(tmp_path, image_folder, tiny_embedder,
                                                                      monkeypatch):
    """(Simulated: the tests may run as root, whom chmod 000 does not stop.)"""
    from cbir_cli.pipeline.options import ExtractOptions
    from cbir_cli.pipeline.sync import index_folder

    folder = image_folder(2)
    sub = folder / "sub"
    sub.mkdir()
    for i in range(2):
        make_image(20 + i).save(sub / f"s{i}.jpg")
    index_dir = tmp_path / "index"
    options = ExtractOptions(workers=0)
    assert index_folder(folder, index_dir, embedder=tiny_embedder, options=options).store_count == 4

    real_scandir = os.scandir

    def scandir(path="."):
        if os.fspath(path) == str(sub.resolve()):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    notices: list[str] = []
    summary = index_folder(folder, index_dir, embedder=tiny_embedder, options=options, on_notice=notices.append)
    assert (summary.removed, summary.store_count) == (0, 4)
    assert notices == [f"warning: cannot read folder {sub.resolve()} (permission denied); "
                       "what was indexed from it is kept"]
    monkeypatch.setattr(os, "scandir", real_scandir)
    (sub / "s0.jpg").unlink()  # readable again: a real deletion is still seen
    assert index_folder(folder, index_dir, embedder=tiny_embedder, options=options).removed == 1
