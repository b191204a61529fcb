"""``--decode gpu`` and ``--decode nvimgcodec``: JPEGs decoded by torchvision or by
nvImageCodec on the model's device.

The device is a parameter of the path, so these tests run the same code with
``decode_jpeg(..., device="cpu")`` or nvImageCodec's CPU backend (the tiny model on
the CPU) and compare it with the Pillow path: pixels, vectors, EXIF orientation, bad
files and ordering. Where a CUDA GPU is present they run again with the tiny model
(and nvJPEG) on it.
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
from cbir_cli.imageio.nvimgcodec_decode import nvimgcodec_available
from cbir_cli.pipeline.local import iter_batches, resolve_decode
from cbir_cli.pipeline.options import ExtractOptions
from cbir_cli.pipeline.sync import sync_folder
from cbir_cli.store.feature_store import FeatureStore

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason="no CUDA GPU"))]


# The decode choices that decode on the model's device (one library each).
DEVICE_DECODES = ["gpu", pytest.param("nvimgcodec", marks=pytest.mark.skipif(
    not nvimgcodec_available(), reason="nvImageCodec not installed (pip install 'cbir-cli[nvimgcodec]')"))]


@pytest.fixture(params=DEVICE_DECODES)
def device_decode(request) -> str:
    return request.param


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


def sync_both(folder: Path, tmp_path: Path, embedder, device_decode: str = "gpu", **kwargs):
    """Sync ``folder`` with Pillow ("cpu") and with ``device_decode`` ("device"), each
    into its own store."""
    out = {}
    for key, decode in (("cpu", "cpu"), ("device", device_decode)):
        skipped: list[tuple[str, str]] = []
        options = ExtractOptions(decode=decode, **{"batch_size": 16, "workers": 0, **kwargs})
        summary = sync_folder(folder, tmp_path / f"store_{key}", embedder=embedder, options=options,
                              on_skip=lambda p, r, skipped=skipped: skipped.append((Path(p).name, r)))
        out[key] = (summary, skipped, *stored(tmp_path / f"store_{key}"))
    return out


def write_jpegs(folder: Path, sizes: list[tuple[int, int]]) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, size in enumerate(sizes):
        path = folder / f"img_{i:03d}.jpg"
        make_image(i, size).save(path, quality=90)
        paths.append(str(path))
    return paths


def test_device_preprocessing_matches_pillow(tmp_path, embedder, device_decode):
    paths = write_jpegs(tmp_path / "images", SIZES)
    [(cpu_idx, cpu_pixels, cpu_failed)] = pixel_batches(paths, embedder, "cpu")
    [(gpu_idx, gpu_pixels, gpu_failed)] = pixel_batches(paths, embedder, device_decode)
    assert cpu_idx == gpu_idx == list(range(len(SIZES)))
    assert cpu_failed == gpu_failed == []
    assert gpu_pixels.dtype == cpu_pixels.dtype and gpu_pixels.shape == cpu_pixels.shape == (len(SIZES), 3, 64, 64)
    mean_abs = (gpu_pixels.float() - cpu_pixels.float()).abs().mean(dim=(1, 2, 3))
    assert mean_abs.max() < MAX_MEAN_ABS, mean_abs
    # The comparison can fail: another image's pixels are far off.
    assert (gpu_pixels[0].float() - cpu_pixels[1].float()).abs().mean() > 20


def test_same_vectors_either_path(tmp_path, embedder, device_decode):
    # 333x251 and 640x480 are shrunk by Pillow's draft mode on the CPU path only.
    write_jpegs(tmp_path / "images", [*SIZES, (333, 251), (640, 480)])
    both = sync_both(tmp_path / "images", tmp_path, embedder, device_decode, batch_size=4)
    names_cpu, vectors_cpu = both["cpu"][2:]
    names_gpu, vectors_gpu = both["device"][2:]
    assert names_gpu == names_cpu and len(names_cpu) == 6
    cosine = (vectors_cpu * vectors_gpu).sum(axis=1)
    assert cosine.min() >= 0.99, cosine


def test_exif_orientation_applied(tmp_path, embedder, device_decode):
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
    [(_, gpu_pixels, _)] = pixel_batches(paths, embedder, device_decode)
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
    """A small JPEG whose SOF header claims 10000x10000 pixels (over MAX_IMAGE_PIXELS,
    and far more than its data can hold)."""
    buffer = io.BytesIO()
    make_image(98, (64, 48)).save(buffer, "JPEG", quality=90)
    data = bytearray(buffer.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5: sof + 9] = struct.pack(">HH", 10000, 10000)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_files_skipped_rows_keep_order(tmp_path, embedder, device_decode, workers):
    folder = tmp_path / "images"
    write_jpegs(folder, SIZES * 2)
    corrupt_jpeg(folder / "img_002.jpg")  # in the middle of the first model batch
    assert device_jpeg((folder / "img_002.jpg").read_bytes()) is not None
    truncated_jpeg(folder / "img_003.jpg")
    oversized_header_jpeg(folder / "img_005.jpg")
    make_image(50).save(folder / "img_004b.png")
    make_image(51).convert("CMYK").save(folder / "img_006b.jpg", quality=90)  # nvJPEG has no CMYK

    both = sync_both(folder, tmp_path, embedder, device_decode, batch_size=4, workers=workers)
    cpu_summary, cpu_skipped, names_cpu, vectors_cpu = both["cpu"]
    gpu_summary, gpu_skipped, names_gpu, vectors_gpu = both["device"]
    # img_005's header claims 10000x10000 on 64x48 pixels' data: both paths refuse it
    # as corrupt (issue 20; it used to be decoded at 1/8 scale, grey where data was missing).
    bad = ["img_002.jpg", "img_003.jpg", "img_005.jpg"]
    assert [name for name, _ in gpu_skipped] == bad
    assert gpu_skipped == cpu_skipped  # same files, same reasons
    assert "truncated" in gpu_skipped[1][1]
    assert "truncated or corrupt JPEG data: declares 10000x10000" in gpu_skipped[2][1]
    expected = sorted(f.name for f in folder.iterdir() if f.name not in bad)
    assert names_gpu == names_cpu == expected
    assert gpu_summary.embedded == cpu_summary.embedded == len(expected)
    cosine = (vectors_cpu * vectors_gpu).sum(axis=1)
    assert cosine.min() >= 0.99, dict(zip(names_gpu, cosine))


def test_decode_choice(embedder):
    assert resolve_decode("auto", embedder) == ("gpu" if embedder.on_cuda else "cpu")  # follows the model
    assert resolve_decode("gpu", embedder) == "gpu"
    assert resolve_decode("nvimgcodec", embedder) == "nvimgcodec"

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
    names_gpu, vectors_gpu = both["device"][2:]
    assert names_gpu == names_cpu and len(names_cpu) == 56
    cosine = (vectors_cpu * vectors_gpu).sum(axis=1)
    assert cosine.min() >= 0.99, dict(zip(names_gpu, cosine))


@pytest.mark.skipif(not nvimgcodec_available(), reason="nvImageCodec not installed")
def test_nvimgcodec_gives_torchvision_pixels_on_the_cpu(tmp_path):
    """Its CPU backend and torchvision's CPU decoder are both libjpeg-turbo: the same
    pixels, in the same (3, H, W) RGB layout, grey JPEGs as three equal channels."""
    from torchvision.io import ImageReadMode, decode_jpeg

    from cbir_cli.imageio.nvimgcodec_decode import NvImageCodecJpegDecoder

    encoded = []
    for i, (mode, size, subsampling) in enumerate([("RGB", (160, 120), 2), ("RGB", (90, 131), 0),
                                                   ("L", (120, 77), 0), ("RGB", (33, 200), 1)]):
        buffer = io.BytesIO()
        make_image(i, size).convert(mode).save(buffer, "JPEG", quality=90, subsampling=subsampling)
        encoded.append(torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8))
    decoded = NvImageCodecJpegDecoder(torch.device("cpu"))(encoded)
    for data, image in zip(encoded, decoded):
        expected = decode_jpeg(data, mode=ImageReadMode.RGB)
        assert image is not None and image.dtype == torch.uint8 and image.device.type == "cpu"
        assert image.shape == expected.shape and torch.equal(image, expected)
    assert torch.equal(decoded[2][0], decoded[2][1]) and torch.equal(decoded[2][0], decoded[2][2])
    assert not torch.equal(decoded[0][0], decoded[0][2])  # colour kept: channels differ


@pytest.mark.skipif(not nvimgcodec_available(), reason="nvImageCodec not installed")
def test_nvimgcodec_returns_none_for_what_it_cannot_decode(tmp_path):
    from cbir_cli.imageio.nvimgcodec_decode import NvImageCodecJpegDecoder

    corrupt_jpeg(tmp_path / "corrupt.jpg")
    write_jpegs(tmp_path, [(64, 48)])
    data = [torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8)
            for p in (tmp_path / "corrupt.jpg", tmp_path / "img_000.jpg")]
    corrupt, good = NvImageCodecJpegDecoder(torch.device("cpu"))(data)
    assert corrupt is None and good is not None and good.shape == (3, 48, 64)


@pytest.mark.skipif(not nvimgcodec_available(), reason="nvImageCodec not installed")
def test_nvimgcodec_import_is_quiet():
    """Its import prints a paragraph per codec library it cannot load (JPEG 2000,
    TIFF) straight to file descriptor 2: none of that may reach a user's terminal."""
    import subprocess
    import sys

    code = ("import torch; from cbir_cli.imageio.nvimgcodec_decode import NvImageCodecJpegDecoder; "
            "NvImageCodecJpegDecoder(torch.device('cpu'))([]); import sys; print('after', file=sys.stderr)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "after\n"  # the descriptor works again after the import


def test_nvimgcodec_missing_is_one_clear_line(tmp_path, image_folder, monkeypatch):
    from typer.testing import CliRunner

    from cbir_cli.cli import app
    from cbir_cli.imageio import nvimgcodec_decode

    monkeypatch.setattr(nvimgcodec_decode, "nvimgcodec_available", lambda: False)
    with pytest.raises(CbirError, match=r"pip install 'cbir-cli\[nvimgcodec\]'"):
        ExtractOptions(decode="nvimgcodec")
    folder = image_folder(3)
    result = CliRunner().invoke(app, ["extract", str(folder), "--out", str(tmp_path / "out"), "--model", "test_tiny",
                                      "--device", "cpu", "--decode", "nvimgcodec", "--workers", "0"])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error: ") and "nvimgcodec" in lines[0]
    assert not (tmp_path / "out").exists()  # refused before any work


@pytest.mark.skipif(not nvimgcodec_available(), reason="nvImageCodec not installed")
def test_nvimgcodec_failing_as_a_whole_is_said_once_and_nothing_is_lost(tmp_path, tiny_crop_embedder, monkeypatch,
                                                                        caplog):
    """A bad file is None from nvImageCodec, so an exception is the decoder itself
    failing: every file then quietly took the slow CPU path. It still does (nothing
    lost, same vectors), but one warning says so."""
    from cbir_cli.imageio.nvimgcodec_decode import NvImageCodecJpegDecoder

    def broken(self, data):
        raise RuntimeError("CUDA Runtime failure: '#35'")

    monkeypatch.setattr(NvImageCodecJpegDecoder, "__call__", broken)
    write_jpegs(tmp_path / "images", SIZES * 3)
    with caplog.at_level("WARNING", logger="cbir_cli"):
        both = sync_both(tmp_path / "images", tmp_path, tiny_crop_embedder, "nvimgcodec", batch_size=4)
    assert both["device"][1] == [] and both["device"][2] == both["cpu"][2] and len(both["cpu"][2]) == 12
    np.testing.assert_allclose(both["device"][3], both["cpu"][3], atol=1e-6)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == ["warning: nvImageCodec failed on a batch (CUDA Runtime failure: '#35'); its files are "
                        "decoded on the CPU instead"]
