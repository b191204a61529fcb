"""How an extraction runs (not *what* it embeds), and what it reports."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import CbirError
from ..imageio.nvimgcodec_decode import require_nvimgcodec
from ..models.loading import DEVICES, RUNTIMES
from ..models.quantize import PRECISIONS
from ..store.shard_format import SHARD_DTYPES
from ..store.transaction import DEFAULT_SHARD_SIZE

if TYPE_CHECKING:
    from ..models.registry import ModelConfig
    from ..search.backends import BackendSpec
    from ..search.dba import DbaSettings

# Where JPEGs are decoded: cpu (Pillow, in the workers), gpu (torchvision's
# decode_jpeg on the model's device, nvJPEG on CUDA), nvimgcodec (nvImageCodec on the
# model's device; optional extra) or auto (gpu when the model runs on CUDA). See
# cbir_cli.pipeline.local.resolve_decode.
DECODE_CHOICES = ("auto", "cpu", "gpu", "nvimgcodec")
# The choices that decode on the model's device, and the library each uses
# (cbir_cli.imageio.gpu_decode.DeviceJpegDecoder).
DEVICE_DECODE_LIBRARIES = {"gpu": "torchvision", "nvimgcodec": "nvimgcodec"}


def decode_for(decode: str, device: str | None, config: ModelConfig | None) -> str:
    """``cpu``, ``gpu`` or ``nvimgcodec``: where a model on ``device`` (None: a
    hand-crafted descriptor, which runs on PIL images in the workers) gets its JPEGs
    decoded. ``gpu`` means "decode with torchvision on the model's device": nvJPEG on
    CUDA, libjpeg in the main process on the CPU; ``nvimgcodec`` the same with
    nvImageCodec. ``auto``: gpu when the model runs on CUDA."""
    if decode not in DECODE_CHOICES:
        raise CbirError(f"unknown decode {decode!r}; choose one of: {', '.join(DECODE_CHOICES)}")
    if device is None or config is None:
        return "cpu"
    if not getattr(config, "gpu_decodable", True):
        # The device decoder resizes and centre-crops at one scale; full-image and
        # multi-scale inputs are made on the CPU (models.preprocess).
        return "cpu"
    if decode == "auto":
        return "gpu" if device.startswith("cuda") else "cpu"
    return decode


def default_workers() -> int:
    """Decoding processes: cores - 1 (one core feeds the model), at most 8. On a
    16-core H200 machine (bench/gpu_check.sh, 20,000 JPEGs, nvJPEG decode) 4 workers
    gave 2,637 img/s, 8 gave 2,957 and 15 gave 2,909: more than 8 buys nothing."""
    return max(1, min(8, (os.cpu_count() or 2) - 1))


@dataclass
class ExtractOptions:
    """How to run the embedding (not *what* to embed)."""

    batch_size: int = 32
    workers: int = field(default_factory=default_workers)
    shard_size: int = DEFAULT_SHARD_SIZE
    device: str = "auto"
    progress: bool = False
    # torch | onnx | auto (ONNX Runtime on CPU, PyTorch on CUDA; see models.loading).
    runtime: str = "auto"
    decode: str = "auto"  # see DECODE_CHOICES
    # fp32 | int8 (ONNX Runtime on the CPU, cbir_cli.models.quantize) | auto: what
    # the store already holds, else models.loading.default_precision (int8 on the CPU).
    precision: str = "auto"
    # float32 | float16 shards (cbir_cli.store.shard_format) for a new store or a
    # rebuild; None: the store's own (float32 for a new one).
    shard_dtype: str | None = None

    def __post_init__(self) -> None:
        for name, value in (("batch size", self.batch_size), ("shard size", self.shard_size)):
            if value < 1:
                raise CbirError(f"{name} must be >= 1 (got {value})")
        if self.workers < 0:
            raise CbirError(f"decoding workers must be >= 0 (got {self.workers})")
        for name, value, choices in (("decode", self.decode, DECODE_CHOICES), ("runtime", self.runtime, RUNTIMES),
                                     ("precision", self.precision, PRECISIONS)):
            if value not in choices:
                raise CbirError(f"unknown {name} {value!r}; choose one of: {', '.join(choices)}")
        if self.decode == "nvimgcodec":
            require_nvimgcodec()  # now, not after listing and hashing the folder
        if self.shard_dtype is not None and self.shard_dtype not in SHARD_DTYPES:
            raise CbirError(f"unknown shard dtype {self.shard_dtype!r}; choose one of: {', '.join(SHARD_DTYPES)}")
        if self.device not in DEVICES and not self.device.startswith("cuda:"):
            raise CbirError(f"unknown device {self.device!r}; choose one of: {', '.join(DEVICES)}")


@dataclass(frozen=True)
class IndexSettings:
    """How the search side of an index is kept (``cbir index``; not *what* is embedded).

    ``index_type``: see :data:`cbir_cli.search.faiss_backend.INDEX_TYPES` (None: the
    saved index's type, else auto). ``backend``: the search backend to use from now on
    (None: the recorded one, else Faiss). ``dba``: database-side augmentation for
    re-ranking (None: the saved one's, else on). ``rebuild_backend``: re-populate the
    backend from the shards instead of updating it."""

    index_type: str | None = None
    backend: BackendSpec | None = None
    dba: DbaSettings | None = None
    rebuild_backend: bool = False


@dataclass
class ExtractSummary:
    files: int = 0
    added: int = 0
    updated: int = 0
    removed: int = 0
    unchanged: int = 0
    reused: int = 0  # new paths whose content was already stored (moved/copied files)
    skipped: int = 0
    embedded: int = 0  # images that went through the model
    seconds: float = 0.0
    skipped_files: list[tuple[str, str]] = field(default_factory=list)
    store_count: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
