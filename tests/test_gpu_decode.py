"""``--decode gpu``: JPEGs decoded by torchvision on the model's device.

The device is a parameter of the path, so these tests run the same code with
``decode_jpeg(..., device="cpu")`` (the tiny model on the CPU) and compare it with
the Pillow path: pixels, vectors, EXIF orientation, bad files and ordering. Where a
CUDA GPU is present they run again with the tiny model (and nvJPEG) on it.
"""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_image, mobilenet_weights_path
from PIL import Image

from cbir_cli.errors import CbirError
from cbir_cli.imageio.gpu_decode import device_jpeg
from cbir_cli.pipeline.local import iter_batches, resolve_decode
from cbir_cli.pipeline.options import ExtractOptions
from cbir_cli.pipeline.sync import sync_folder
from cbir_cli.store.feature_store import FeatureStore

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason="no CUDA GPU"))]


@pytest.fixture(params=DEVICES)
def embedder(request, tiny_crop_embedder):
    """The tiny model with the centre-crop input (the one the device decoder makes)
    on each available device (decoding follows the model)."""
    if request.param == "cpu":
        return tiny_crop_embedder
    from cbir_cli.models.loading import load_embedder
    from cbir_cli.models.registry import LEGACY_DESCRIPTOR

    return load_embedder("test_tiny", device=request.param, descriptor=LEGACY_DESCRIPTOR)


# Mean absolute pixel difference (0-255) allowed between the decode paths. On the CPU
# both use libjpeg-turbo (measured < 0.05); nvJPEG's IDCT and chroma upsampling
# differ slightly (measured 0.95-1.6 on an H200). A wrong crop or rotation is > 20.
MAX_MEAN_ABS = 2.0

# Sizes where Pillow's draft mode does not shrink the JPEG for the tiny model's
# 72 px resize, so both paths start from the same full-size pixels.
SIZES = [(160, 120), (120, 160), (200, 90), (90, 130)]


def pixel_batches(paths: list[str], embedder, decode: str, **kwargs) -> list[tuple]:
    """iter_batches' output with the pixels brought to the CPU."""
    options = ExtractOptions(decode=decode, **{"batch_size": 16, "workers": 0, **kwargs})
    return [(i, torch.as_tensor(pixels).cpu(), failed) for i, pixels, failed in iter_batches(paths, embedder, options)]


def stored(store_dir: Path) -> tuple[list[str], np.ndarray]:
    store = FeatureStore.open(store_dir)
    return [Path(r.path).name for r in store.live_rows()], store.load_vectors()


def sync_both(folder: Path, tmp_path: Path, embedder, **kwargs):
    """Sync ``folder`` with each decode path into its own store."""
    out = {}
    for decode in ("cpu", "gpu"):
        skipped: list[tuple[str, str]] = []
        options = ExtractOptions(decode=decode, **{"batch_size": 16, "workers": 0, **kwargs})
        summary = sync_folder(folder, tmp_path / f"store_{decode}", embedder=embedder, options=options,
                              on_skip=lambda p, r, skipped=skipped: skipped.append((Path(p).name, r)))
        out[decode] = (summary, skipped, *stored(tmp_path / f"store_{decode}"))
    return out


def write_jpegs(folder: Path, sizes: list[tuple[int, int]]) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, size in enumerate(sizes):
        path = folder / f"img_{i:03d}.jpg"
        make_image(i, size).save(path, quality=90)
        paths.append(str(path))
    return paths


def test_device_preprocessing_matches_pillow(tmp_path, embedder):
    paths = write_jpegs(tmp_path / "images", SIZES)
    [(cpu_idx, cpu_pixels, cpu_failed)] = pixel_batches(paths, embedder, "cpu")
    [(gpu_idx, gpu_pixels, gpu_failed)] = pixel_batches(paths, embedder, "gpu")
    assert cpu_idx == gpu_idx == list(range(len(SIZES)))
    assert cpu_failed == gpu_failed == []
    assert gpu_pixels.dtype == cpu_pixels.dtype and gpu_pixels.shape == cpu_pixels.shape == (len(SIZES), 3, 64, 64)
    mean_abs = (gpu_pixels.float() - cpu_pixels.float()).abs().mean(dim=(1, 2, 3))
    assert mean_abs.max() < MAX_MEAN_ABS, mean_abs
    # The comparison can fail: another image's pixels are far off.
    assert (gpu_pixels[0].float() - cpu_pixels[1].float()).abs().mean() > 20


def test_same_vectors_either_path(tmp_path, embedder):
    # 333x251 and 640x480 are shrunk by Pillow's draft mode on the CPU path only.
    write_jpegs(tmp_path / "images", [*SIZES, (333, 251), (640, 480)])
    both = sync_both(tmp_path / "images", tmp_path, embedder, batch_size=4)
    names_cpu, vectors_cpu = both["cpu"][2:]
    names_gpu, vectors_gpu = both["gpu"][2:]
    assert names_gpu == names_cpu and len(names_cpu) == 6
    cosine = (vectors_cpu * vectors_gpu).sum(axis=1)
    assert cosine.min() >= 0.99, cosine


def test_exif_orientation_applied(tmp_path, embedder):
    """All eight EXIF orientations come out upright, as Pillow's exif_transpose has them."""
    folder = tmp_path / "images"
    folder.mkdir()
    paths = []
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        path = folder / f"orientation_{orientation}.jpg"
        make_image(3, (200, 120)).save(path, quality=95, exif=exif)
        paths.append(str(path))
    [(_, cpu_pixels, _)] = pixel_batches(paths, embedder, "cpu")
    [(_, gpu_pixels, _)] = pixel_batches(paths, embedder, "gpu")
    mean_abs = (gpu_pixels.float() - cpu_pixels.float()).abs().mean(dim=(1, 2, 3))
    assert mean_abs.max() < MAX_MEAN_ABS, mean_abs
    # The orientations do give different pixels, so ignoring one would be caught.
    assert (cpu_pixels[5].float() - cpu_pixels[0].float()).abs().mean() > 20


def truncated_jpeg(path: Path) -> None:
    """A JPEG whose header parses (so it is sent to the device) but whose data ends halfway."""
    buffer = io.BytesIO()
    make_image(99, (160, 120)).save(buffer, "JPEG", quality=90)
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])


def corrupt_jpeg(path: Path) -> None:
    """Header and end marker intact, a bogus Huffman table: Pillow's header parser skips
    DHT segments, so the file reaches the device decoder, which fails on it (and so
    fails its whole batch)."""
    buffer = io.BytesIO()
    make_image(97, (160, 120)).save(buffer, "JPEG", quality=90)
    data = bytearray(buffer.getvalue())
    dht = data.index(b"\xff\xc4")
    data[dht + 5: dht + 21] = b"\xff" * 16  # symbol counts summing far over 256
    path.write_bytes(bytes(data))


def oversized_header_jpeg(path: Path) -> None:
    """A small JPEG whose SOF header claims 10000x10000 pixels (over MAX_IMAGE_PIXELS)."""
    buffer = io.BytesIO()
    make_image(98, (64, 48)).save(buffer, "JPEG", quality=90)
    data = bytearray(buffer.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5: sof + 9] = struct.pack(">HH", 10000, 10000)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_files_skipped_rows_keep_order(tmp_path, embedder, workers):
    folder = tmp_path / "images"
    write_jpegs(folder, SIZES * 2)
    corrupt_jpeg(folder / "img_002.jpg")  # in the middle of the first model batch
    assert device_jpeg((folder / "img_002.jpg").read_bytes()) is not None
    truncated_jpeg(folder / "img_003.jpg")
    oversized_header_jpeg(folder / "img_005.jpg")
    make_image(50).save(folder / "img_004b.png")
    make_image(51).convert("CMYK").save(folder / "img_006b.jpg", quality=90)  # nvJPEG has no CMYK

    both = sync_both(folder, tmp_path, embedder, batch_size=4, workers=workers)
    cpu_summary, cpu_skipped, names_cpu, vectors_cpu = both["cpu"]
    gpu_summary, gpu_skipped, names_gpu, vectors_gpu = both["gpu"]
    # img_005's header claims 10000x10000: both paths decode it at 1/8 scale (JPEG
    # draft), as any large JPEG, instead of refusing it as a decompression bomb.
    bad = ["img_002.jpg", "img_003.jpg"]
    assert [name for name, _ in gpu_skipped] == bad
    assert gpu_skipped == cpu_skipped  # same files, same reasons
    assert "truncated" in gpu_skipped[1][1]
    expected = sorted(f.name for f in folder.iterdir() if f.name not in bad)
    assert names_gpu == names_cpu == expected
    assert gpu_summary.embedded == cpu_summary.embedded == len(expected)
    cosine = (vectors_cpu * vectors_gpu).sum(axis=1)
    assert cosine.min() >= 0.99, dict(zip(names_gpu, cosine))


def test_decode_choice(embedder):
    assert resolve_decode("auto", embedder) == ("gpu" if embedder.on_cuda else "cpu")  # follows the model
    assert resolve_decode("gpu", embedder) == "gpu"

    class Descriptor:  # hand-crafted descriptors have no device: always Pillow
        on_cuda = False

    assert resolve_decode("gpu", Descriptor()) == "cpu"
    with pytest.raises(CbirError, match="unknown decode"):
        ExtractOptions(decode="nvjpeg")


def test_cli_decode_option(tmp_path, image_folder):
    from typer.testing import CliRunner

    from cbir_cli.cli import app

    folder = image_folder(5)
    result = CliRunner().invoke(app, ["extract", str(folder), "--out", str(tmp_path / "out"), "--model",
                                      "test_tiny", "--device", "cpu", "--decode", "gpu", "--workers", "0", "--json"])
    assert result.exit_code == 0, result.output
    assert FeatureStore.open(tmp_path / "out").count == 5
    bad = CliRunner().invoke(app, ["extract", str(folder), "--out", str(tmp_path / "bad"), "--decode", "fast"])
    assert bad.exit_code != 0 and not (tmp_path / "bad").exists()


@pytest.mark.real
@pytest.mark.slow
def test_real_weights_same_vectors_on_ukbench(tmp_path, shared_dir):
    folder = shared_dir / "datasets" / "ukbench_mini"
    if not folder.is_dir():
        pytest.skip(f"{folder} not found")
    if mobilenet_weights_path() is None:
        pytest.skip("mobilenet_v2 weights not installed (cbir weights install mobilenet_v2)")
    from cbir_cli.models.loading import load_embedder

    # ONNX Runtime on the CPU (3x faster than PyTorch here): same vectors, same inputs.
    embedder = load_embedder("mobilenet_v2", device="cpu", runtime="auto")
    both = sync_both(folder, tmp_path, embedder, batch_size=32, workers=1)
    names_cpu, vectors_cpu = both["cpu"][2:]
    names_gpu, vectors_gpu = both["gpu"][2:]
    assert names_gpu == names_cpu and len(names_cpu) == 56
    cosine = (vectors_cpu * vectors_gpu).sum(axis=1)
    assert cosine.min() >= 0.99, dict(zip(names_gpu, cosine))
