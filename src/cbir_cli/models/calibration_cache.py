"""One int8 calibration per model + weights + descriptor, shared by every new index.

Calibrating (:mod:`.quantize`) runs the fp32 graph, every tensor reduced to its
min/max, over a few hundred photos: minutes on 2 cores, against seconds to embed
them. Doing that for every new index -- on each one's own photos -- made the first
`cbir index` of any folder sit for minutes. So the first calibration of a model
(with a sample of at least :data:`SHARED_MINIMUM` photos) is recorded next to its
cached fp32 export, and a new int8 index of the same model, weights and descriptor
takes that calibration (its image list and id) and its quantised model instead of
calibrating again; each index still keeps its own copy of the model
(:mod:`.int8_store`), so it never needs the cache or those photos afterwards.

The record is written once and never replaced (every index made from it agrees);
delete it (``<cache>/onnx/<model>-<key>-int8-shared.json``) to calibrate anew. A
sample smaller than :data:`SHARED_MINIMUM` (the eight quick-start images) still
calibrates its own index, but is not offered to the next one.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..fsutil import atomic_write_json, file_sha256
from .quantize import QUANT_SETTINGS, Calibration, quantized_path

# A calibration on fewer photos describes too few kinds of picture to stand for
# every later collection of the model.
SHARED_MINIMUM = 64


def _record_path(fp32_export: Path) -> Path:
    return fp32_export.with_name(f"{fp32_export.stem}-int8-shared.json")


def shared_calibration(fp32_export: Path) -> Calibration | None:
    """The calibration recorded for the model whose fp32 export is (or would be)
    cached at ``fp32_export``, when its quantised model is cached intact; else None."""
    try:
        record = json.loads(_record_path(fp32_export).read_text(encoding="utf-8"))
        calibration = Calibration.from_fingerprint({"precision": "int8",
                                                    "calibration_images": record["calibration_images"]})
        if calibration is None or record.get("quantisation") != QUANT_SETTINGS:
            return None
        model = quantized_path(fp32_export, calibration)
        return calibration if file_sha256(model) == record.get("sha256") else None
    except Exception:  # noqa: BLE001 - a missing or damaged record (or model) only means: calibrate
        return None


def share_calibration(fp32_export: Path, calibration: Calibration, model: Path) -> None:
    """Offer ``calibration`` (quantised into ``model``) to every later new index of
    this model, unless one is already recorded or its sample is too small."""
    record = _record_path(fp32_export)
    if len(calibration.images) < SHARED_MINIMUM or shared_calibration(fp32_export) is not None:
        return
    atomic_write_json(record, {"calibration": calibration.id, "quantisation": QUANT_SETTINGS,
                               "sha256": file_sha256(model),
                               "calibration_images": [list(i) for i in calibration.images]})
