"""Model registry: one config per model, from which everything else is derived.

Each :class:`ModelConfig` carries the backbone, the pretrained weights (a
torchvision weights enum member and its file name), the embedding dimension and
the preprocessing (resize, crop, mean/std, interpolation). The preprocessing an
embedder applies is *derived* from its config, and the config is what a feature
store records, so vectors from different models or preprocessing can never be
mixed up silently (compare timm's pretrained_cfg).

Nothing heavy happens at import: torch/torchvision are imported when a model is
built.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import CbirError

if TYPE_CHECKING:
    import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OFFLINE_ENV = "CBIR_OFFLINE"


@dataclass(frozen=True)
class ModelConfig:
    """Everything that defines the vectors a model produces."""

    name: str
    description: str
    dim: int
    input_size: int = 224
    resize_size: int = 256
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"
    # torchvision weights enum member, e.g. "ResNet50_Weights.IMAGENET1K_V1"; None for
    # models whose weights are made in code (the random test models).
    torchvision_weights: str | None = None
    # File name torchvision caches the weights under (TORCH_HOME/hub/checkpoints/).
    weights_file: str | None = None
    weights_url: str | None = None
    tags: tuple[str, ...] = field(default=())

    def preprocessing(self) -> dict[str, Any]:
        """The part of the config that determines the input pixels (recorded in stores)."""
        return {
            "resize_size": self.resize_size,
            "input_size": self.input_size,
            "interpolation": self.interpolation,
            "mean": list(self.mean),
            "std": list(self.std),
        }

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


_REGISTRY: dict[str, ModelConfig] = {}
_BUILDERS: dict[str, Callable[[], torch.nn.Module]] = {}


def register_model(config: ModelConfig, builder: Callable[[], torch.nn.Module]) -> ModelConfig:
    """Add a model. ``builder`` returns the headless backbone (pooled features out)
    with *random* weights; pretrained weights are loaded separately."""
    if config.name in _REGISTRY:
        raise ValueError(f"model {config.name!r} is already registered")
    _REGISTRY[config.name] = config
    _BUILDERS[config.name] = builder
    return config


def list_models() -> list[ModelConfig]:
    return list(_REGISTRY.values())


def get_model_config(name: str) -> ModelConfig:
    try:
        return _REGISTRY[name]
    except KeyError:
        choices = ", ".join(sorted(_REGISTRY))
        raise CbirError(f"unknown model {name!r}; choose one of: {choices}") from None


def model_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def build_classifier(name: str) -> torch.nn.Module:
    """The registered architecture with random weights, classifier head included
    (so an official state dict loads strictly); see :data:`HEADS`."""
    get_model_config(name)
    return _BUILDERS[name]()


# ---------------------------------------------------------------------------
# Backbones. Each returns the full torchvision classifier; the head is removed
# after the weights are loaded (so an official state dict loads strictly).


def _resnet50() -> torch.nn.Module:
    from torchvision.models import resnet50

    return resnet50(weights=None)


def _mobilenet_v2() -> torch.nn.Module:
    from torchvision.models import mobilenet_v2

    return mobilenet_v2(weights=None)


def _tiny_cnn() -> torch.nn.Module:
    """A deterministic random-weight CNN for tests: fast, and — thanks to 4x4
    spatial pooling — discriminative enough for near-duplicate retrieval."""
    import torch
    from torch import nn

    generator_state = torch.random.get_rng_state()
    torch.manual_seed(0)
    try:
        model = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
        )
    finally:
        torch.random.set_rng_state(generator_state)
    return model


# Head attribute per architecture: replaced by Identity to expose pooled features.
HEADS = {"resnet50": "fc", "mobilenet_v2": "classifier"}

register_model(
    ModelConfig(
        name="resnet50",
        description="torchvision ResNet-50, ImageNet (IMAGENET1K_V1), global-average-pooled 2048-d",
        dim=2048,
        torchvision_weights="ResNet50_Weights.IMAGENET1K_V1",
        weights_file="resnet50-0676ba61.pth",
        weights_url="https://download.pytorch.org/models/resnet50-0676ba61.pth",
        tags=("default",),
    ),
    _resnet50,
)
register_model(
    ModelConfig(
        name="mobilenet_v2",
        description="torchvision MobileNetV2, ImageNet (IMAGENET1K_V1), global-average-pooled 1280-d",
        dim=1280,
        torchvision_weights="MobileNet_V2_Weights.IMAGENET1K_V1",
        weights_file="mobilenet_v2-b0353104.pth",
        weights_url="https://download.pytorch.org/models/mobilenet_v2-b0353104.pth",
        tags=("offline-installable",),
    ),
    _mobilenet_v2,
)
register_model(
    ModelConfig(
        name="test_tiny",
        description="tiny random-weight CNN (seed 0), 256-d, 64 px input: for tests only",
        dim=256,
        input_size=64,
        resize_size=72,
        tags=("test",),
    ),
    _tiny_cnn,
)

