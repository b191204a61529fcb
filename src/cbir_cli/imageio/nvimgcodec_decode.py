"""nvImageCodec as the device JPEG decoder (``decode="nvimgcodec"``; optional extra
``cbir-cli[nvimgcodec]``).

Why a second decoder: on an H100 the ``decode="gpu"`` pipeline (torchvision's
``decode_jpeg``) was bound by its main thread, 30 % of it inside the decoder, which
copies and colour-converts each image on its own (9,938 host-to-device copies and
8,000 conversion kernels for 8,000 images; README, GPU). nvImageCodec decodes the
whole list in one call -- parsing and Huffman decoding in its own C++ threads with
the GIL released, the GPU's hardware JPEG decoder where it has one -- and returns
planar RGB, the layout :mod:`.batched_resize` takes.

On a CPU device it runs its libjpeg-turbo backend, which gives the same pixels as
torchvision's CPU decoder (a test checks): that is how this path is tested on
machines without a GPU. The caller (:class:`~.gpu_decode.DeviceJpegDecoder`)
screens the files first and sends anything this decoder returns no image for
through the CPU path, which decodes it or says why not.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from types import ModuleType
from typing import TYPE_CHECKING

from ..errors import CbirError

if TYPE_CHECKING:
    import torch

MODULE = "nvidia.nvimgcodec"
INSTALL_HINT = "pip install 'cbir-cli[nvimgcodec]'"


def nvimgcodec_available() -> bool:
    try:
        return importlib.util.find_spec(MODULE) is not None
    except ModuleNotFoundError:  # no `nvidia` namespace package at all
        return False


def require_nvimgcodec() -> None:
    """A clear error, before any work, where the package is missing."""
    if not nvimgcodec_available():
        raise CbirError(f"decoding with nvImageCodec needs the nvidia-nvimgcodec package ({INSTALL_HINT})")


def _import_quietly() -> ModuleType:
    """``nvidia.nvimgcodec``, without its noise on stderr: the import reports every
    codec library it could not load (JPEG 2000, TIFF: not needed here), and each
    image it cannot decode is logged as well (those take the CPU path, which
    reports them the usual way). PYNVIMGCODEC_VERBOSITY set by the user wins."""
    import importlib
    import sys

    os.environ.setdefault("PYNVIMGCODEC_VERBOSITY", "0")
    if MODULE in sys.modules:
        return sys.modules[MODULE]
    # The load messages are printed by C++ to file descriptor 2, once per process:
    # silence the descriptor for the import only.
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
            return importlib.import_module(MODULE)
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class NvImageCodecJpegDecoder:
    """Encoded JPEGs -> uint8 (3, H, W) tensors on ``device`` (None where one cannot
    be decoded), as stored: EXIF orientation is left to the caller, which applies it
    the same way for every decoder."""

    def __init__(self, device: torch.device) -> None:
        require_nvimgcodec()
        nvimgcodec = _import_quietly()
        self.device = device
        if device.type == "cuda":
            import torch

            index = device.index if device.index is not None else torch.cuda.current_device()
            self._decoder = nvimgcodec.Decoder(device_id=index)
        else:
            self._decoder = nvimgcodec.Decoder(device_id=nvimgcodec.NVIMGCODEC_DEVICE_CPU_ONLY,
                                               backends=[nvimgcodec.Backend(nvimgcodec.BackendKind.CPU_ONLY)])
        self._params = nvimgcodec.DecodeParams(apply_exif_orientation=False, color_spec=nvimgcodec.ColorSpec.SRGB,
                                               sample_format=nvimgcodec.SampleFormat.P_RGB)

    def __call__(self, data: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
        """``data``: one uint8 CPU tensor of encoded bytes per image."""
        import numpy as np
        import torch

        encoded = [one.numpy() for one in data]  # views: no copy of the bytes
        if self.device.type != "cuda":
            images = self._decoder.decode(encoded, params=self._params)
            return [None if image is None else torch.from_numpy(np.asarray(image.cpu())) for image in images]
        # Decoded in the order of the current stream; DLPack hands each image over
        # without a copy, synchronised with that stream (to_dlpack with the stream,
        # as nvImageCodec's own torch sample does, not the __dlpack__ negotiation).
        stream = torch.cuda.current_stream(self.device).cuda_stream
        images = self._decoder.decode(encoded, params=self._params, cuda_stream=stream)
        return [None if image is None else torch.from_dlpack(image.to_dlpack(stream)) for image in images]
