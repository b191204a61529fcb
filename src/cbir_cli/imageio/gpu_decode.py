"""Decoding JPEGs on the model's device (nvJPEG on CUDA, via torchvision or
nvImageCodec: :mod:`.nvimgcodec_decode`): the workers only read the files and check
their headers (:class:`EncodedJpegDataset`), the main process decodes a whole batch
at once, turns it upright and resizes + centre-crops it there, all sizes together
(:class:`DeviceJpegDecoder`, :mod:`.batched_resize`). Anything the device cannot
take goes through the CPU path with the same verdicts."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..errors import ImageError
from .batched_resize import SUPPORTS, resize_crop_batch
from .decode import MAX_IMAGE_PIXELS, jpeg_data_too_short, read_image_bytes
from .nvimgcodec_decode import NvImageCodecJpegDecoder
from .readers import EncodedJpeg, ImageFolderDataset, ReadChunk, pixels_or_reason, stack_rows

if TYPE_CHECKING:
    import torch

# The libraries that decode on the device: torchvision (nvJPEG on CUDA, libjpeg on
# a CPU device) or nvImageCodec (optional extra; see its module).
JPEG_LIBRARIES = ("torchvision", "nvimgcodec")
JPEG_MAGIC = b"\xff\xd8\xff"
JPEG_END = b"\xff\xd9"
EXIF_ORIENTATION = 0x0112


def device_jpeg(data: bytes) -> EncodedJpeg | None:
    """The JPEG for the device decoder, or None when the file should take the CPU path.

    It needs JPEG magic bytes, a header Pillow parses (only the header: cheap),
    colour RGB/YCbCr or grey, no more pixels than ``MAX_IMAGE_PIXELS`` and the
    end-of-image marker last. Everything else (PNG, CMYK JPEGs, oversized or broken
    headers, truncated files, data after the image, a header declaring more
    pixels than the data can hold) takes the CPU path, which
    decodes it or refuses it with the usual reason: the decompression-bomb rule is
    the same on both paths, and so is the verdict on a truncated file, which nvJPEG
    would decode without complaint (grey where data is missing).

    The EXIF orientation is read here because nvJPEG ignores it (torchvision's
    ``apply_exif_orientation`` works on the CPU decoder only, as of 0.26)."""
    import io
    import warnings

    from PIL import Image

    if not data.startswith(JPEG_MAGIC) or not data.endswith(JPEG_END):
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
                if img.format != "JPEG" or img.mode not in ("RGB", "L") or width * height > MAX_IMAGE_PIXELS \
                        or jpeg_data_too_short(data, img):
                    return None
                orientation = img.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - whatever it is, the CPU path decodes it or says why
        return None
    return EncodedJpeg(data, orientation if orientation in range(1, 9) else 1)


def apply_exif_orientation(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """(3, H, W) as stored -> upright, as ``PIL.ImageOps.exif_transpose`` does."""
    import torch

    if orientation == 2:
        return image.flip(-1)
    if orientation == 3:
        return image.flip(-1, -2)
    if orientation == 4:
        return image.flip(-2)
    if orientation == 5:
        return image.transpose(-1, -2)
    if orientation == 6:
        return torch.rot90(image, -1, (-2, -1))
    if orientation == 7:
        return image.transpose(-1, -2).flip(-1, -2)
    if orientation == 8:
        return torch.rot90(image, 1, (-2, -1))
    return image


class EncodedJpegDataset(ImageFolderDataset):
    """For decoding on the device: index -> (index, :class:`EncodedJpeg`) for JPEGs,
    else what :class:`ImageFolderDataset` gives (pixels decoded here, or a reason)."""

    def __getitem__(self, i: int) -> tuple[int, Any]:
        try:
            data = read_image_bytes(self.paths[i])
        except ImageError as exc:
            return i, exc.reason
        jpeg = device_jpeg(data)
        if jpeg is not None:
            return i, jpeg
        return i, pixels_or_reason(lambda: self.decode_on_cpu(i, data))


class DeviceJpegDecoder:
    """Decode JPEG bytes on the embedder's device and resize + centre-crop them there,
    as the model's preprocessing does on the CPU (short side to ``resize_size``,
    same output-size rounding and filter with antialiasing, centre crop).

    A batch is decoded in one call of ``library`` (:data:`JPEG_LIBRARIES`). If that
    raises, its files are decoded one by one on the device, and a file that still
    fails (or that the library returns no image for) goes through the CPU path
    (:meth:`ImageFolderDataset.decode_on_cpu`): it is decoded by Pillow after all, or
    skipped with exactly the CPU path's reason."""

    def __init__(self, dataset: ImageFolderDataset, config: Any, device: Any, library: str = "torchvision") -> None:
        import torch

        if library not in JPEG_LIBRARIES:
            raise ValueError(f"unknown JPEG library {library!r}; choose one of: {', '.join(JPEG_LIBRARIES)}")
        self.dataset = dataset
        self.config = config
        self.device = torch.device(device)
        self._nvimgcodec = NvImageCodecJpegDecoder(self.device) if library == "nvimgcodec" else None
        self._warned = False

    def _decode(self, data: list[torch.Tensor]) -> list[torch.Tensor | None]:
        if self._nvimgcodec is not None:
            return self._nvimgcodec(data)
        return list(self._decode_torchvision(data))

    def _decode_torchvision(self, data: list[torch.Tensor]) -> list[torch.Tensor]:
        import warnings

        from torchvision.io import ImageReadMode, decode_jpeg

        with warnings.catch_warnings():
            # torchvision 0.29 deprecates its decoders in favour of TorchCodec, which
            # is not a dependency; the message would be printed once per run.
            warnings.filterwarnings("ignore", category=DeprecationWarning, module="torchvision")
            # Orientation is applied by us (apply_exif_orientation), the same on every device.
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)

    def decode(self, indices: Sequence[int], data: Sequence[torch.Tensor],
               orientations: Sequence[int]) -> tuple[dict[int, torch.Tensor], list[tuple[int, str]]]:
        """{index: uint8 (3, S, S) on the device} and [(index, reason)] for ``data``."""
        import torch

        try:
            images = self._decode(list(data))
        except Exception as exc:  # noqa: BLE001 - one bad file fails the whole batch: find it
            if self._nvimgcodec is not None and not self._warned:
                # nvImageCodec answers a bad file with None, not an exception: this is
                # the decoder itself failing, and every file would quietly take the
                # slow CPU path. Say so once.
                self._warned = True
                message = str(exc).strip()
                logging.getLogger(__name__).warning(
                    "warning: nvImageCodec failed on a batch (%s); its files are decoded on the CPU instead",
                    message.splitlines()[-1] if message else type(exc).__name__)
            images = []
            for one in data:
                try:
                    images.append(self._decode([one])[0])
                except Exception:  # noqa: BLE001 - this file goes to the CPU path, which says why
                    images.append(None)
        images = [None if image is None else apply_exif_orientation(image, orientation)
                  for image, orientation in zip(images, orientations)]
        decoded = dict(zip(indices, self.resize_crop(images)))
        failures = []
        for i, one, image in zip(indices, data, images):
            if image is not None:
                continue
            pixels = pixels_or_reason(lambda i=i, one=one: self.dataset.decode_on_cpu(i, one.numpy().tobytes()))
            if isinstance(pixels, str):
                failures.append((i, pixels))
            else:
                decoded[i] = torch.as_tensor(pixels).to(self.device)
        return {i: t for i, t in decoded.items() if t is not None}, failures

    def resize_crop(self, images: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
        """Preprocess on the device: the whole batch in a few kernels
        (:func:`~cbir_cli.imageio.batched_resize.resize_crop_batch`), whatever its
        mix of sizes; torchvision per shape for filters it does not implement."""
        present = [k for k, image in enumerate(images) if image is not None]
        out: list[torch.Tensor | None] = [None] * len(images)
        if not present:
            return out
        if self.config.interpolation in SUPPORTS:
            batch = resize_crop_batch([images[k] for k in present], self.config.resize_size,
                                      self.config.input_size, self.config.interpolation)
            for k, image in zip(present, batch):
                out[k] = image
            return out
        import torchvision.transforms.v2.functional as F
        from torchvision.transforms import InterpolationMode

        interpolation = InterpolationMode(self.config.interpolation)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for k in present:
            by_shape.setdefault(tuple(images[k].shape), []).append(k)  # type: ignore[union-attr]
        for positions in by_shape.values():
            batch = stack_rows([images[k] for k in positions])  # type: ignore[misc]
            batch = F.resize(batch, [self.config.resize_size], interpolation=interpolation, antialias=True)
            batch = F.center_crop(batch, [self.config.input_size])
            for k, image in zip(positions, batch):
                out[k] = image
        return out

    def assemble(self, chunks: Sequence[ReadChunk]) -> tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]:
        """One model batch from worker chunks: rows in input order, on the device."""
        import torch

        rows: dict[int, torch.Tensor] = {}
        failures = [f for chunk in chunks for f in chunk.failures]
        indices, data, orientations = [], [], []
        for chunk in chunks:
            if chunk.pixels is not None:
                rows.update(zip(chunk.pixel_indices, torch.as_tensor(chunk.pixels).to(self.device, non_blocking=True)))
            if chunk.jpeg_bytes is not None:
                indices += chunk.jpeg_indices
                data += list(torch.split(torch.as_tensor(chunk.jpeg_bytes), chunk.jpeg_sizes))
                orientations += chunk.jpeg_orientations
        if data:
            decoded, decode_failures = self.decode(indices, data, orientations)
            rows.update(decoded)
            failures += decode_failures
        order = sorted(rows)
        batch = stack_rows([rows[i] for i in order]) if order else None
        return order, batch, sorted(failures)
