"""The one way to get an :class:`~cbir_cli.models.protocol.Embedder`, and the one
place that decides where it runs: :func:`load_embedder` hands a model to its
family (:mod:`.family`) and builds hand-crafted descriptors; :func:`resolve_device`
(``auto``: CUDA when present) and :func:`resolve_runtime` (``auto``: ONNX Runtime on
the CPU, PyTorch on CUDA) are what the families decide with.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from ..errors import CbirError
from .family import DEFAULT_FAMILY, family_of
from .protocol import Embedder
from .quantize import Calibration
from .registry import DescriptorSettings, ModelConfig, get_model_config

DEVICES = ("auto", "cpu", "cuda")
RUNTIMES = ("auto", "torch", "onnx")


def _no_nvidia_device() -> bool:
    """True when CUDA certainly cannot be available: Linux without NVIDIA device
    nodes. Lets ``auto`` settle on the CPU without importing torch."""
    return sys.platform.startswith("linux") and "torch" not in sys.modules and not os.path.exists("/dev/nvidiactl")


def resolve_device(device: str = "auto") -> str:
    """``cpu``, ``cuda`` or ``cuda:N`` for a requested device (``auto``: CUDA if present)."""
    if device not in DEVICES and not device.startswith("cuda:"):
        raise CbirError(f"unknown device {device!r}; choose one of: {', '.join(DEVICES)}")
    if device == "cpu" or (device == "auto" and _no_nvidia_device()):
        return "cpu"
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not torch.cuda.is_available():
        raise CbirError("a CUDA device was requested but no CUDA GPU is available; use the CPU (or auto)")
    return device


def onnx_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("onnxruntime") is not None and importlib.util.find_spec("onnx") is not None


def resolve_runtime(runtime: str, device: str, config: ModelConfig) -> str:
    """``auto``: ONNX Runtime on CPU (faster there), PyTorch on CUDA. The random test
    models stay on PyTorch under ``auto``: for a 2-layer CNN the export costs more
    than it saves, and tests compare their vectors bit for bit."""
    if runtime not in RUNTIMES:
        raise CbirError(f"unknown runtime {runtime!r}; choose one of: {', '.join(RUNTIMES)}")
    on_cuda = device.startswith("cuda")
    if runtime == "onnx":
        if on_cuda:
            raise CbirError("the onnx runtime runs on the CPU only; use the torch runtime on a CUDA device")
        if not onnx_available():
            raise CbirError("the onnx runtime needs the onnxruntime and onnx packages (pip install onnxruntime onnx)")
        return "onnx"
    if runtime == "torch" or on_cuda or "test" in config.tags or not onnx_available():
        return "torch"
    return "onnx"


def load_embedder(name: str, weights: str | os.PathLike[str] | None = None, device: str = "auto",
                  runtime: str = "torch", descriptor: DescriptorSettings | None = None,
                  calibration: Calibration | None = None) -> Embedder:
    """A registered model (``resnet50``, ``family:model`` of a plugin family) with its
    weights on a device, or a hand-crafted descriptor (``weights``: sift_bovw's
    vocabulary file).

    ``runtime``: ``torch``, ``onnx`` (ONNX Runtime, CPU) or ``auto`` (the faster one
    for the device). Every runtime gives the same fingerprint and interchangeable
    vectors. ``descriptor``: pooling, input and scales (default: the model's).
    ``calibration``: the int8 model calibrated on these images (ONNX Runtime on the
    CPU only; see :mod:`.quantize`).

    Args:
        name: the model's registered name (``cbir models`` lists them).
        weights: a weights file instead of the installed official ones.
        device: ``auto``, ``cpu`` or ``cuda``.
        runtime: ``torch``, ``onnx`` or ``auto``.
        descriptor: pooling, input and scales; None: the model's default.
        calibration: images to calibrate an int8 model on; None: fp32.

    Returns:
        The embedder, ready to ``embed`` preprocessed batches.

    Raises:
        CbirError: unknown model, device or runtime, missing weights, or a runtime
            this device or model cannot use.
    """
    from .descriptors import DESCRIPTORS, descriptor_embedder

    if name in DESCRIPTORS:
        return descriptor_embedder(name, weights)
    family, model = family_of(name)
    return family.load(model, weights, device, runtime, descriptor, calibration)


# Models whose int8 vectors were measured as good as fp32 on every dataset (README,
# Performance; the default descriptor, re-ranked: MobileNetV2 Oxford-17 R@1 0.9287
# vs 0.9294 fp32, mAP 0.7759 vs 0.7697; UKBench-mini N-S 4.00 both). ResNet-50's
# official weights are not available on the machine that measured this, so it
# stays fp32 by default until measured.
INT8_BY_DEFAULT = frozenset({"mobilenet_v2"})


def default_precision(name: str, device: str = "auto", runtime: str = "auto") -> str:
    """What ``precision=auto`` means for a new store: int8 for the models in
    :data:`INT8_BY_DEFAULT` where int8 runs (the CPU with ONNX Runtime, ~2.4x the
    model speed there), else fp32 (``--precision int8`` works for every model)."""
    if name not in INT8_BY_DEFAULT or runtime == "torch" or not onnx_available():
        return "fp32"
    return "int8" if resolve_device(device) == "cpu" else "fp32"


def model_fingerprint(name: str, weights: str | os.PathLike[str] | None = None,
                      descriptor: DescriptorSettings | None = None,
                      calibration: Calibration | None = None) -> dict[str, Any]:
    """What an embedder of this registered model would record, without building it."""
    family, model = family_of(name)
    return family.fingerprint(model, weights, descriptor, calibration)


def keep_int8_model(name: str, weights: str | os.PathLike[str] | None, descriptor: DescriptorSettings | None,
                    calibration: Calibration, index_dir: str | os.PathLike[str]) -> str:
    """Make the index at ``index_dir`` hold a checksummed copy of the int8 model of
    ``calibration`` (quantised first if need be), so that it never needs its photos
    again; returns the model's key (see :mod:`.int8_store`)."""
    from .onnx_embedder import keep_int8_in_index

    family, model = family_of(name)
    if family.name != DEFAULT_FAMILY:
        raise CbirError(f"int8 precision is for the built-in CNN models; use fp32 precision with {name}")
    return keep_int8_in_index(get_model_config(model).with_descriptor(descriptor), weights, calibration, index_dir)


def shared_calibration_for(name: str, weights: str | os.PathLike[str] | None,
                           descriptor: DescriptorSettings | None) -> Calibration | None:
    """The int8 calibration a new index of this model, weights and descriptor reuses
    instead of calibrating again (see :mod:`.calibration_cache`); None before the first."""
    from .onnx_embedder import shared_int8_calibration

    return shared_int8_calibration(get_model_config(name).with_descriptor(descriptor), weights)


def descriptor_of(fingerprint: dict[str, Any]) -> DescriptorSettings:
    """The descriptor settings a store's fingerprint records (none recorded: the
    legacy GAP / centre crop of stores made before they were configurable)."""
    return DescriptorSettings.from_fingerprint(fingerprint.get("descriptor"))


def runtime_of(embedder: Embedder) -> str:
    """'onnx', 'torch' or 'descriptor' (for reports and benchmarks)."""
    from .descriptors import DescriptorEmbedder

    if isinstance(embedder, DescriptorEmbedder):
        return "descriptor"
    return "onnx" if type(embedder).__name__ == "OnnxEmbedder" else "torch"


def fingerprint_problems(fp: dict[str, Any], weights_path: str | None, where: Any) -> list[str]:
    """Whether the model's family can still make vectors like the ones ``fp``
    describes: the model is known, with the same dimension and preprocessing, and a
    weights file (if one was used) still has the recorded hash. ``where`` names the record."""
    try:
        family, _ = family_of(str(fp.get("model")))
    except CbirError as exc:
        return [f"{where}: {exc.message}; its vectors cannot be queried"]
    return family.fingerprint_problems(fp, weights_path, where)
