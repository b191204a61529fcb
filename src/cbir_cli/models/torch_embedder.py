"""A registry model on PyTorch: the headless backbone with its weights, on the CPU
or a CUDA device (bf16 autocast there)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from .preprocess import image_preprocessor
from .protocol import EmbedderBase, model_fingerprint_of
from .registry import HEADS, ModelConfig, build_classifier
from .weights import apply_state_dict, pretrained_state_dict, weights_id_for

if TYPE_CHECKING:
    import numpy as np
    import torch


def build_backbone(config: ModelConfig, weights: str | os.PathLike[str] | None = None) -> tuple[torch.nn.Module, str]:
    """Headless backbone in eval mode, and a weights id for the store manifest.

    ``weights``: a local state dict file; default: the config's pretrained weights
    (torchvision cache, then download, then a clear error); none for the random
    test models.
    """
    from torch import nn

    model = build_classifier(config.name)
    weights_id = weights_id_for(config, weights)
    if weights is not None or config.torchvision_weights:
        state, source = pretrained_state_dict(config, weights)
        apply_state_dict(model, state, config, source)
    head = HEADS.get(config.name)
    if head:
        setattr(model, head, nn.Identity())
    return model.eval(), weights_id


class TorchEmbedder(EmbedderBase):
    """A model ready to turn uint8 image tensors into L2-normalised float32 vectors."""

    def __init__(self, config: ModelConfig, module: torch.nn.Module, weights_id: str, device: str = "cpu") -> None:
        import torch

        self.config = config
        self.weights_id = weights_id
        self.device = torch.device(device)
        self.on_cuda = self.device.type == "cuda"
        # channels_last is faster for convolutions on both CPU (oneDNN) and GPU.
        self.module = module.to(self.device, memory_format=torch.channels_last).eval()
        shape = (1, 3, 1, 1)
        self._mean = torch.tensor(config.mean, device=self.device).view(shape) * 255.0
        self._std = torch.tensor(config.std, device=self.device).view(shape) * 255.0
        self.preprocess = image_preprocessor(config)

    def fingerprint(self) -> dict[str, Any]:
        """What a store records so it can refuse vectors from another model."""
        return model_fingerprint_of(self.config, self.weights_id)

    def embed(self, batch: torch.Tensor | np.ndarray) -> np.ndarray:
        """uint8 (n, 3, H, W) -> float32 (n, dim), rows L2-normalised."""
        import torch

        if not isinstance(batch, torch.Tensor):
            batch = torch.from_numpy(batch)
        with torch.inference_mode():
            x = batch.to(self.device, non_blocking=True).float()
            x = ((x - self._mean) / self._std).contiguous(memory_format=torch.channels_last)
            if self.on_cuda:
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    feats = self.module(x)
            else:
                feats = self.module(x)
            feats = torch.nn.functional.normalize(feats.float().flatten(1), dim=1)
            return feats.cpu().numpy().astype("float32", copy=False)
