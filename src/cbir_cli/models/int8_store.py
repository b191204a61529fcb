"""An int8 index carries its own quantised model (``<index>/int8/``).

Calibration reads a sample of the photos being indexed (:mod:`.quantize`); if the
index only listed those photos, a cleared model cache on a machine where one of
them was deleted or moved (``dedup --move-to``) would leave the index unqueryable
and unable to grow. So the quantised ONNX file that made the index's vectors is
copied into the index, with a JSON sidecar recording its sha256 and identity.

Why the model rather than the calibrator's activation ranges: the file *is* what
made the vectors, so a query on another machine reproduces them bit for bit
whatever ONNX Runtime or torch version it has (re-quantising stored ranges
depends on both, and on ORT internals that differ across versions), and no fp32
weights are needed to query. Its cost is a few MB (MobileNetV2 ~3.5 MB,
ResNet-50 ~25 MB), small beside the vectors of any real collection.

Files are named by what determines the model (model config with its descriptor,
weights identity, calibration id), so an interrupted rebuild that calibrated
again never replaces the model the committed index still needs; the others are
pruned after a commit (:func:`prune_int8_models`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from ..errors import WriteError
from ..fsutil import atomic_write_bytes, atomic_write_json, bytes_sha256, file_sha256
from .quantize import QUANT_SETTINGS, Calibration
from .registry import ModelConfig

INT8_DIR = "int8"
log = logging.getLogger(__name__)


def int8_model_key(config: ModelConfig, weights_id: str, calibration: Calibration) -> str:
    """What names an int8 model: everything its graph depends on, but no library versions."""
    ident = {"config": config.as_dict(), "weights": weights_id, "calibration": calibration.id,
             "quantisation": QUANT_SETTINGS}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def _paths(index_dir: str | os.PathLike[str], key: str) -> tuple[Path, Path]:
    folder = Path(index_dir) / INT8_DIR
    return folder / f"model-{key}.onnx", folder / f"model-{key}.json"


def find_int8_model(index_dir: str | os.PathLike[str], key: str) -> Path | None:
    """The index's copy of the int8 model ``key`` when its sha256 matches its
    sidecar; None when there is none (an index made before it kept one), and a
    warning when it is damaged (the caller falls back to the cache or re-quantising)."""
    model, meta = _paths(index_dir, key)
    try:
        recorded = json.loads(meta.read_text(encoding="ascii"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        recorded = None
    try:
        ok = isinstance(recorded, dict) and file_sha256(model) == recorded.get("sha256")
    except OSError:
        ok = False
    if not ok:
        log.warning("warning: %s: the index's int8 model is damaged (checksum mismatch); using the model "
                    "cache or re-calibrating instead (`cbir index` writes a good copy)", model)
        return None
    return model


def keep_int8_model(index_dir: str | os.PathLike[str], key: str, source: Path, calibration: Calibration) -> None:
    """Copy the int8 model at ``source`` into the index (atomically; model first,
    then its sidecar, so a reader never accepts half a file)."""
    model, meta = _paths(index_dir, key)
    model.parent.mkdir(parents=True, exist_ok=True)
    try:
        data = source.read_bytes()
    except OSError as exc:
        raise WriteError(f"{source}: cannot read the int8 model ({exc.strerror or exc})") from None
    atomic_write_bytes(model, data)
    record: dict[str, Any] = {"sha256": bytes_sha256(data), "size": len(data), "calibration": calibration.id,
                              "quantisation": QUANT_SETTINGS}
    atomic_write_json(meta, record)


def damaged_int8_models(index_dir: str | os.PathLike[str]) -> list[str]:
    """One line per int8 model in the index whose file does not match its sidecar
    (for ``cbir check``; an index without int8 models has none)."""
    folder = Path(index_dir) / INT8_DIR
    if not folder.is_dir():
        return []
    problems = []
    for meta in sorted(folder.glob("model-*.json")):
        model = meta.with_suffix(".onnx")
        try:
            ok = file_sha256(model) == json.loads(meta.read_text(encoding="ascii")).get("sha256")
        except (OSError, ValueError, AttributeError):
            ok = False
        if not ok:
            problems.append(f"{model}: int8 model damaged or missing (checksum mismatch); "
                            "`cbir index` writes it again from the model cache or the calibration photos")
    return problems


def prune_int8_models(index_dir: str | os.PathLike[str], keep: str | None) -> None:
    """Remove the index's int8 models other than ``keep`` (after a commit: a rebuild
    that calibrated again, or one to fp32, no longer needs them)."""
    folder = Path(index_dir) / INT8_DIR
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        if keep is None or f"-{keep}." not in path.name:
            path.unlink(missing_ok=True)
