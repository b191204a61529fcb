"""A registry model on PyTorch: its convolutional trunk with its weights, then the
descriptor's pooling (GAP, MAC or GeM) and L2 normalisation, on the CPU or a CUDA
device (bf16 autocast there; pooling in float32)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from .preprocess import image_preprocessor
from .protocol import EmbedderBase, model_fingerprint_of
from .registry import CnnConfig, DescriptorSettings, build_classifier, trunk_of
from .scales import embed_batch
from .weights import apply_state_dict, pretrained_state_dict, weights_id_for

if TYPE_CHECKING:
    import numpy as np
    import torch

# GeM clamps the feature map here before the power: ReLU maps hold exact zeros, and
# a fractional power (or its gradient, or fp16) of 0 misbehaves.
GEM_EPS = 1e-6


def build_backbone(config: CnnConfig, weights: str | os.PathLike[str] | None = None) -> tuple[torch.nn.Module, str]:
    """The model's convolutional trunk (feature map out) in eval mode, and a weights
    id for the store manifest.

    ``weights``: a local state dict file; default: the config's pretrained weights
    (torchvision cache, then download, then a clear error); none for the random
    test models.
    """
    model = build_classifier(config.name)
    weights_id = weights_id_for(config, weights)
    if weights is not None or config.torchvision_weights:
        state, source = pretrained_state_dict(config, weights)
        apply_state_dict(model, state, config, source)
    return trunk_of(config.name, model).eval(), weights_id


def pooling_module(descriptor: DescriptorSettings) -> torch.nn.Module:
    """Feature map (n, C, h, w) -> (n, C) by the descriptor's pooling, in float32.

    Reductions over the spatial axes only (``mean``/``amax``), so the ONNX export
    takes any input size; a cirtorch-style ``avg_pool2d`` with the map's size as
    kernel does not export with dynamic height and width."""
    import torch

    class Pooling(torch.nn.Module):
        def __init__(self, kind: str, p: float) -> None:
            super().__init__()
            self.kind, self.p = kind, p

        def forward(self, fmap: torch.Tensor) -> torch.Tensor:
            fmap = fmap.float()
            if self.kind == "mac":
                return fmap.amax(dim=(-2, -1))
            if self.kind == "gem":
                return fmap.clamp(min=GEM_EPS).pow(self.p).mean(dim=(-2, -1)).pow(1.0 / self.p)
            return fmap.mean(dim=(-2, -1))

    return Pooling(descriptor.pooling, descriptor.gem_p)


class TorchEmbedder(EmbedderBase):
    """A model ready to turn uint8 image tensors into L2-normalised float32 vectors."""

    def __init__(self, config: CnnConfig, module: torch.nn.Module, weights_id: str, device: str = "cpu") -> None:
        import torch

        self.config = config
        self.weights_id = weights_id
        self.device = torch.device(device)
        self.on_cuda = self.device.type == "cuda"
        # channels_last is faster for convolutions on both CPU (oneDNN) and GPU.
        self.module = module.to(self.device, memory_format=torch.channels_last).eval()
        self.pool = pooling_module(config.descriptor)
        shape = (1, 3, 1, 1)
        self._mean = torch.tensor(config.mean, device=self.device).view(shape) * 255.0
        self._std = torch.tensor(config.std, device=self.device).view(shape) * 255.0
        self.preprocess = image_preprocessor(config)

    def fingerprint(self) -> dict[str, Any]:
        """What a store records so it can refuse vectors from another model."""
        return model_fingerprint_of(self.config, self.weights_id)

    def embed(self, batch: Any) -> np.ndarray:
        """A batch of preprocessed images (a stacked uint8 (n, 3, H, W) array or
        tensor, or a list of per-image inputs: see :mod:`.scales`) -> float32 (n, dim),
        rows L2-normalised."""
        return embed_batch(batch, self._embed_group, self.dim)

    def _embed_group(self, batch: torch.Tensor | np.ndarray) -> np.ndarray:
        """uint8 (n, 3, H, W), one shape -> float32 (n, dim), rows L2-normalised."""
        import torch

        if not isinstance(batch, torch.Tensor):
            batch = torch.from_numpy(batch)
        with torch.inference_mode():
            x = batch.to(self.device, non_blocking=True).float()
            x = ((x - self._mean) / self._std).contiguous(memory_format=torch.channels_last)
            if self.on_cuda:
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    fmap = self.module(x)
            else:
                fmap = self.module(x)
            feats = torch.nn.functional.normalize(self.pool(fmap).flatten(1), dim=1)
            return feats.cpu().numpy().astype("float32", copy=False)
