"""The built-in model family: torchvision CNNs (:mod:`.registry`'s table), whose
last convolutional feature map is pooled into one vector (:class:`~.registry.DescriptorSettings`),
run with PyTorch or ONNX Runtime (fp32, or int8 on the CPU). Their names carry no
``cnn:`` prefix (``resnet50``): every store made before families existed names them so.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..errors import CbirError
from .family import Weights, vector_problems
from .protocol import Embedder, model_fingerprint_of
from .quantize import Calibration
from .registry import CnnConfig, DescriptorSettings, get_model_config, model_names
from .weights import weights_id_for, weights_status


class CnnFamily:
    """The :class:`~.family.ModelFamily` of the registry's CNNs."""

    name = "cnn"
    description = "torchvision CNNs, their last feature map pooled (GeM, MAC, GAP)"

    def model_names(self) -> Sequence[str]:
        return model_names()

    def config(self, model: str) -> CnnConfig:
        return get_model_config(model)

    def weights_status(self, model: str) -> str:
        return weights_status(model)

    def load(self, model: str, weights: Weights, device: str, runtime: str,
             descriptor: DescriptorSettings | None, calibration: Calibration | None) -> Embedder:
        from .loading import resolve_device, resolve_runtime

        config = get_model_config(model).with_descriptor(descriptor)
        # An int8 index is queried where int8 runs, whatever ``auto`` would pick.
        device = "cpu" if calibration is not None and device == "auto" else resolve_device(device)
        if calibration is not None:
            if device != "cpu" or runtime == "torch":
                raise CbirError("int8 precision runs on the CPU with ONNX Runtime only; use fp32 precision here")
            runtime = "onnx"
        if resolve_runtime(runtime, device, config) == "onnx":
            from .onnx_embedder import load_onnx_embedder

            return load_onnx_embedder(config, weights, calibration=calibration)
        from .torch_embedder import TorchEmbedder, build_backbone

        module, weights_id = build_backbone(config, weights)
        return TorchEmbedder(config, module, weights_id, device)

    def fingerprint(self, model: str, weights: Weights, descriptor: DescriptorSettings | None,
                    calibration: Calibration | None) -> dict[str, Any]:
        config = get_model_config(model).with_descriptor(descriptor)
        fingerprint = model_fingerprint_of(config, weights_id_for(config, weights))
        if calibration is not None:
            fingerprint.update(calibration.fingerprint())
        return fingerprint

    def fingerprint_problems(self, fp: dict[str, Any], weights_path: str | None, where: Any) -> list[str]:
        try:
            config = get_model_config(str(fp.get("model")))
        except CbirError:
            return [f"{where}: unknown model {fp.get('model')!r}; its vectors cannot be queried"]
        problems = []
        try:
            DescriptorSettings.from_fingerprint(fp.get("descriptor"))
        except CbirError as exc:
            problems.append(f"{where}: {exc.message}")
        return problems + vector_problems(fp, config, weights_path, where, lambda path: weights_id_for(config, path))


CNN_FAMILY = CnnFamily()
