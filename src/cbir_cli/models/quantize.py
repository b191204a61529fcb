"""int8 models for the CPU: ONNX Runtime static quantisation of the fp32 ONNX export.

Per-channel S8 weights, U8 activations, QOperator format (QLinearConv...): on the
2-core AVX-512 VNNI machine MobileNetV2 runs ~2.7x faster than fp32 (QDQ format
gave no speed-up). It is generic over whatever graph the export produces (pooling
variants included): calibration only runs the graph on real pixels.

**Calibration.** Activation ranges come from :data:`CALIBRATION_IMAGES` images
sampled with a fixed seed from the collection being indexed (its sorted file
list): images like the ones that will be embedded, spread over the whole folder
(the first N of a folder sorted by class would see a few classes only), and no
dataset has to ship with the package. The calibration is part of the vectors'
identity: the fingerprint gains ``precision: int8`` and ``calibration: <id>`` (a
hash of the images' contents and the quantisation settings) and lists the images
(``calibration_images``: path, sha256), so an index keeps using the model it was
built with and a cleared cache re-creates it from the same files (refused, with
a clear error, if they changed or are gone). The quantised model is cached next
to the fp32 export (``<cache>/onnx/``). Calibrating takes minutes on a CPU, so it
runs once per model + weights + descriptor: later new indexes reuse the first
one's calibration (:mod:`.calibration_cache`), and it announces itself.

int8 vectors differ from fp32 ones (MobileNetV2 on Oxford-17: cosine 0.93-1.0,
mean 0.98), so an int8 store never mixes with an fp32 one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CbirError
from ..fsutil import atomic_write_bytes
from .registry import ModelConfig

PRECISIONS = ("auto", "fp32", "int8")
CALIBRATION_IMAGES = 320
# Pixels per calibration run (8 images of 224 x 224). The calibration graph (every
# tensor also reduced to its min/max) needs ONNX Runtime's arena for a whole batch:
# peak RSS of `cbir evaluate --precision int8` on Oxford-17 (MobileNetV2, centre
# crops) was 3.5 GB at 32 images, 1.0 GB at 8; whole images at two scales in
# batches of 8 (up to 320 x 1280 px each) took 3.6 GB, hence a pixel budget: a
# batch holds fewer of the larger inputs. MinMax ranges do not depend on the batching.
CALIBRATION_PIXELS = 8 * 224 * 224
log = logging.getLogger(__name__)
# Everything that shapes the quantised graph besides its inputs (part of the id).
QUANT_SETTINGS = {"format": "QOperator", "per_channel": True, "activations": "U8", "weights": "S8",
                  "method": "MinMax", "version": 1}


@dataclass(frozen=True)
class Calibration:
    """The images an int8 model was calibrated on: (path, sha256) pairs, and the
    index that keeps a copy of the model (:mod:`.int8_store`; not part of the identity)."""

    images: tuple[tuple[str, str], ...]
    index_dir: str | None = field(default=None, compare=False)

    @property
    def id(self) -> str:
        blob = json.dumps([QUANT_SETTINGS, sorted(sha for _, sha in self.images)]).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def fingerprint(self) -> dict[str, Any]:
        """What an int8 store records in addition to the model's fingerprint."""
        return {"precision": "int8", "calibration": self.id, "calibration_images": [list(i) for i in self.images]}

    @classmethod
    def from_fingerprint(cls, fingerprint: dict[str, Any],
                         index_dir: str | os.PathLike[str] | None = None) -> Calibration | None:
        """The calibration an int8 store was built with; None for fp32 stores.
        ``index_dir``: the store's folder, where its int8 model is kept."""
        if fingerprint.get("precision", "fp32") != "int8":
            return None
        images = fingerprint.get("calibration_images")
        if not isinstance(images, list) or not images:
            raise CbirError("the index says int8 but does not list its calibration images; rebuild it")
        return cls(tuple((str(p), str(s)) for p, s in images), None if index_dir is None else str(index_dir))


def sample_calibration(paths: Sequence[str | os.PathLike[str]],
                       hash_files: Callable[[Sequence[str]], Iterable[Any]],
                       count: int = CALIBRATION_IMAGES) -> Calibration:
    """``count`` of a collection's image ``paths``, chosen with a fixed seed from
    the sorted list (the same folder always gives the same calibration), with
    their content hashes (``hash_files``: the executor's, yielding results with
    ``path`` and ``sha256``; unreadable files are left out)."""
    import numpy as np

    ordered = sorted(map(str, paths))
    picks = np.random.default_rng(0).choice(len(ordered), size=min(count, len(ordered)), replace=False)
    hashed = {r.path: r.sha256 for r in hash_files([ordered[i] for i in sorted(picks)]) if r.sha256}
    if not hashed:
        raise CbirError("int8 needs images to calibrate on, and none could be read")
    return Calibration(tuple(sorted(hashed.items())))


def _calibration_pixels(path: str, sha: str, preprocess: Any, draft_size: int) -> Any | None:
    """One calibration image's pixels; None when it cannot be decoded (it calibrates
    nothing; indexing skips it too). Decoded with Pillow here: the models layer may
    not use imageio's decoder, and calibration only needs plausible pixels."""
    import io

    from PIL import Image, ImageOps

    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError:
        raise CbirError(f"{path}: int8 calibration image unreadable, and neither the index nor the model cache "
                        "holds the int8 model; rebuild the index to calibrate again") from None
    if hashlib.sha256(data).hexdigest() != sha:
        raise CbirError(f"{path}: changed since it calibrated this index's int8 model; "
                        "rebuild the index to calibrate again")
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.draft("RGB", (draft_size, draft_size))
            upright = ImageOps.exif_transpose(img).convert("RGB")
        return preprocess(upright)
    except Exception:  # noqa: BLE001 - an undecodable file is simply not used
        return None


def _calibration_batches(calibration: Calibration, preprocess: Any, draft_size: int) -> Iterator[Any]:
    """uint8 batches of the calibration images, each checked against its recorded
    hash: exactly the arrays the embedder runs on. One image may give several
    arrays (one per scale) of shapes that vary from image to image (full-image
    inputs keep their aspect ratio; see :mod:`.preprocess`), and the graph's height
    and width are dynamic, so arrays are grouped by shape and each batch holds one
    shape -- never padded, as :mod:`.scales` never pads -- and at most
    :data:`CALIBRATION_PIXELS` pixels (at least one array)."""
    import numpy as np

    groups: dict[tuple[int, ...], list[Any]] = {}
    usable = 0
    for path, sha in _with_progress(calibration.images):
        pixels = _calibration_pixels(path, sha, preprocess, draft_size)
        if pixels is None:
            continue
        usable += 1
        for array in pixels if isinstance(pixels, tuple) else (pixels,):
            group = groups.setdefault(np.shape(array), [])
            group.append(array)
            if len(group) >= max(1, CALIBRATION_PIXELS // (array.shape[-2] * array.shape[-1])):
                yield np.stack(group)
                group.clear()
    for group in groups.values():
        if group:
            yield np.stack(group)
    if not usable:
        raise CbirError("none of the int8 calibration images could be decoded; rebuild the index")


def _with_progress(images: Sequence[tuple[str, str]]) -> Iterable[tuple[str, str]]:
    """The calibration images, announced (a ``note:`` line: the CLI shows it) and,
    on a terminal, counted by a progress bar: calibration is the slow part of a
    first int8 index, and it once sat silent for minutes."""
    import sys

    log.info("note: calibrating the int8 model on %d photos (once per model, weights and descriptor; "
             "later indexes reuse it)", len(images))
    if not sys.stderr.isatty():
        return images
    from tqdm import tqdm

    return tqdm(images, desc="calibrating int8", unit="img", leave=False)


def quantize_onnx(fp32_path: Path, out_path: Path, calibration: Calibration, config: ModelConfig,
                  preprocess: Any) -> None:
    """Statically quantise the fp32 export at ``fp32_path`` into ``out_path`` (atomically)."""
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            # Decoded like the images indexed (JPEG draft down to the descriptor's
            # largest input), so the ranges are those of the pixels embedded.
            self.batches = _calibration_batches(calibration, preprocess, config.draft_size)

        def get_next(self) -> dict[str, Any] | None:
            batch = next(self.batches, None)
            return None if batch is None else {"pixels": batch}

    tmp = out_path.with_name(f".{out_path.name}.quantize-{os.getpid()}")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    previous = ort.get_default_logger_severity() if hasattr(ort, "get_default_logger_severity") else 2
    ort.set_default_logger_severity(3)  # one warning per unused initializer otherwise
    try:
        with _without_quantiser_advice():
            quantize_static(str(fp32_path), str(tmp), Reader(), quant_format=QuantFormat.QOperator,
                            per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        atomic_write_bytes(out_path, tmp.read_bytes())
    finally:
        ort.set_default_logger_severity(previous)
        tmp.unlink(missing_ok=True)
        for leftover in out_path.parent.glob(f"{tmp.name}*"):
            leftover.unlink(missing_ok=True)


class _DropOnnxRuntimeRecords(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "onnxruntime" not in record.pathname


@contextmanager
def _without_quantiser_advice() -> Iterator[None]:
    """ONNX Runtime's quantiser advises "Please consider to run pre-processing before
    quantization" through the root logger, twice per run -- nothing a user of
    ``cbir index`` can act on -- and ``logging.warning`` would also install a stderr
    handler on the root logger for the rest of the process (``basicConfig``). A
    handler that writes nothing stands in while it runs, and its records are dropped."""
    root = logging.getLogger()
    stand_in, drop = logging.NullHandler(), _DropOnnxRuntimeRecords()
    root.addHandler(stand_in)
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)
        root.removeHandler(stand_in)


def quantized_path(fp32_path: Path, calibration: Calibration) -> Path:
    """The cached int8 model made from the fp32 export at ``fp32_path``."""
    return fp32_path.with_name(f"{fp32_path.stem}-int8-{calibration.id}.onnx")
