"""The model configs, and the table of the built-in CNN family
(:mod:`.cnn_family`): one config per model, from which everything else is derived.

:class:`ModelConfig` is what every family's config has; each :class:`CnnConfig`
carries the backbone, the pretrained weights (a torchvision weights enum member
and its file name), the embedding dimension, the
preprocessing (resize, crop, mean/std, interpolation), the network's output stride
and the :class:`DescriptorSettings` (pooling, input, scales) that turn its last
convolutional feature map into one vector. The preprocessing an embedder applies
and the pooling it runs are *derived* from its config, and the config is what a
feature store records, so vectors from different models, preprocessing or
descriptors can never be mixed up silently (compare timm's pretrained_cfg).

Nothing heavy happens at import: torch/torchvision are imported when a model is
built.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

from ..errors import CbirError

if TYPE_CHECKING:
    import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OFFLINE_ENV = "CBIR_OFFLINE"

POOLINGS = ("gap", "gem", "mac")
INPUTS = ("crop", "full")
# The largest scale factor accepted (x4 the model's input size is already ~16x the work).
MAX_SCALE = 4.0


@dataclass(frozen=True)
class DescriptorSettings:
    """How a model's last convolutional feature map becomes one vector.

    * ``pooling``: ``gap`` (global average), ``mac`` (global max) or ``gem``
      (generalised mean with exponent ``gem_p``: 1 = average, large = max);
    * ``input``: ``crop`` (resize, then the centre square, as ImageNet training
      does) or ``full`` (the whole image, aspect ratio kept, short side = the
      model's input size; sizes are rounded to the network's stride so that many
      images share one and batch together);
    * ``scales``: the input size is multiplied by each; the per-scale vectors are
      L2-normalised, averaged and L2-normalised again.

    :data:`LEGACY_DESCRIPTOR` is what every index built before these settings
    existed holds (and what their fingerprint, which has no ``descriptor`` key,
    means)."""

    pooling: str = "gem"
    gem_p: float = 3.0
    input: str = "full"
    scales: tuple[float, ...] = (1.0, 1.4)

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise CbirError(f"unknown pooling {self.pooling!r}; choose one of: {', '.join(POOLINGS)}")
        if self.input not in INPUTS:
            raise CbirError(f"unknown input {self.input!r}; choose one of: {', '.join(INPUTS)}")
        if not 1.0 <= float(self.gem_p) <= 16.0:
            raise CbirError(f"the GeM exponent must be between 1 and 16 (got {self.gem_p})")
        scales = tuple(dict.fromkeys(round(float(s), 4) for s in self.scales))
        if not scales or any(not 0.25 <= s <= MAX_SCALE for s in scales):
            raise CbirError(f"scales must be between 0.25 and {MAX_SCALE:g} (got {', '.join(map(str, self.scales))})")
        object.__setattr__(self, "scales", scales)
        # p means nothing without GeM: normalise it so equal descriptors compare equal.
        object.__setattr__(self, "gem_p", float(self.gem_p) if self.pooling == "gem" else 3.0)

    @property
    def is_legacy(self) -> bool:
        return self == LEGACY_DESCRIPTOR

    @property
    def one_input_shape(self) -> bool:
        """Whether every image becomes one array of the same shape (a centre crop at
        one scale), so that batches stack; otherwise inputs are lists (:mod:`.scales`)."""
        return self.input == "crop" and self.scales == (1.0,)

    def fingerprint(self) -> dict[str, Any] | None:
        """What a store records (None for the legacy descriptor: old stores have no key)."""
        if self.is_legacy:
            return None
        out: dict[str, Any] = {"pooling": self.pooling, "input": self.input, "scales": list(self.scales)}
        if self.pooling == "gem":
            out["gem_p"] = self.gem_p
        return out

    @classmethod
    def from_fingerprint(cls, recorded: Any) -> DescriptorSettings:
        """The settings a store's fingerprint records; absent means legacy."""
        if recorded is None:
            return LEGACY_DESCRIPTOR
        if not isinstance(recorded, dict):
            raise CbirError(f"unreadable descriptor record {recorded!r}")
        try:
            return cls(str(recorded["pooling"]), float(recorded.get("gem_p", 3.0)), str(recorded["input"]),
                       tuple(float(s) for s in recorded["scales"]))
        except (KeyError, TypeError, ValueError):
            raise CbirError(f"unreadable descriptor record {recorded!r}") from None

    def with_options(self, pooling: str | None = None, gem_p: float | None = None, input: str | None = None,
                     scales: Sequence[float] | None = None) -> DescriptorSettings:
        """These settings with the given ones replaced."""
        changes: dict[str, Any] = {k: v for k, v in (("pooling", pooling), ("gem_p", gem_p), ("input", input))
                                   if v is not None}
        if scales is not None:
            changes["scales"] = tuple(scales)
        return replace(self, **changes)

    def label(self) -> str:
        """Short human description, e.g. ``GeM p=3, full image, scales 1+1.4``."""
        pool = f"GeM p={self.gem_p:g}" if self.pooling == "gem" else self.pooling.upper()
        where = "centre crop" if self.input == "crop" else "full image"
        scales = "" if self.scales == (1.0,) else ", scales " + "+".join(f"{s:g}" for s in self.scales)
        return f"{pool}, {where}{scales}"


LEGACY_DESCRIPTOR = DescriptorSettings(pooling="gap", input="crop", scales=(1.0,))
DEFAULT_DESCRIPTOR = DescriptorSettings()


def parse_scales(text: str) -> tuple[float, ...]:
    """``"1,1.4"`` -> (1.0, 1.4)."""
    try:
        return tuple(float(t) for t in text.replace("+", ",").split(",") if t.strip())
    except ValueError:
        raise CbirError(f"scales must be comma-separated numbers, e.g. 1,1.4 (got {text!r})") from None


@dataclass(frozen=True)
class ModelConfig:
    """What every model family's config has: the name users type (``family:model``
    outside the built-in CNN family), the vectors' dimension and the input pixels.
    A family subclasses it with its own fields (:class:`CnnConfig`)."""

    name: str
    description: str
    dim: int
    input_size: int = 224
    resize_size: int = 256
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"
    tags: tuple[str, ...] = field(default=())
    # Whether the family's embedders also embed words (``embed_text``, see models.protocol.TextEmbedder).
    has_text: bool = False

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

    @property
    def draft_size(self) -> int:
        """The smallest short side decoding may reduce an image to (JPEG draft mode)
        without the preprocessing having to enlarge it again."""
        return self.resize_size

    @property
    def gpu_decodable(self) -> bool:
        """Whether the device JPEG decoder (resize, centre crop) reproduces this
        model's preprocessing: unknown for a family's own preprocessing."""
        return False


@dataclass(frozen=True)
class CnnConfig(ModelConfig):
    """A CNN of the built-in family: its torchvision weights, its output stride and
    how its last convolutional feature map is pooled into one vector."""

    # torchvision weights enum member, e.g. "ResNet50_Weights.IMAGENET1K_V1"; None for
    # models whose weights are made in code (the random test models).
    torchvision_weights: str | None = None
    # File name torchvision caches the weights under (TORCH_HOME/hub/checkpoints/).
    weights_file: str | None = None
    weights_url: str | None = None
    # Total stride of the last feature map: full-image inputs are rounded to multiples of it.
    stride: int = 32
    descriptor: DescriptorSettings = DEFAULT_DESCRIPTOR

    def with_descriptor(self, descriptor: DescriptorSettings | None) -> CnnConfig:
        """This model with ``descriptor`` (None: keep the model's default)."""
        return self if descriptor is None or descriptor == self.descriptor else replace(self, descriptor=descriptor)

    def scaled(self, size: float) -> int:
        """``size`` rounded to a multiple of the stride (at least one stride)."""
        return max(self.stride, round(size / self.stride) * self.stride)

    @property
    def draft_size(self) -> int:
        top = max(self.descriptor.scales)
        if self.descriptor.input == "crop":
            return round(self.resize_size * top)
        return self.scaled(self.input_size * top)

    @property
    def gpu_decodable(self) -> bool:
        """The device decoder resizes and centre-crops at one scale."""
        return self.descriptor.one_input_shape


_REGISTRY: dict[str, CnnConfig] = {}
_BUILDERS: dict[str, Callable[[], torch.nn.Module]] = {}


def register_model(config: CnnConfig, builder: Callable[[], torch.nn.Module]) -> CnnConfig:
    """Add a CNN to the built-in family. ``builder`` returns the classifier with *random* weights (its
    trunk is taken by :func:`trunk_of`); pretrained weights are loaded separately."""
    if config.name in _REGISTRY:
        raise ValueError(f"model {config.name!r} is already registered")
    _REGISTRY[config.name] = config
    _BUILDERS[config.name] = builder
    return config


def list_models() -> list[CnnConfig]:
    return list(_REGISTRY.values())


def get_model_config(name: str) -> CnnConfig:
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
# Backbones. Each returns the full torchvision classifier (so an official state
# dict loads strictly); the embedders keep its trunk (see trunk_of).


def _resnet50() -> torch.nn.Module:
    from torchvision.models import resnet50

    return resnet50(weights=None)


def _mobilenet_v2() -> torch.nn.Module:
    from torchvision.models import mobilenet_v2

    return mobilenet_v2(weights=None)


def _tiny_cnn() -> torch.nn.Module:
    """A deterministic random-weight CNN for tests: fast, stride 8, and with 256
    channels discriminative enough for near-duplicate retrieval."""
    import torch
    from torch import nn

    generator_state = torch.random.get_rng_state()
    torch.manual_seed(0)
    try:
        model = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 64, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(64, 256, 3, stride=2, padding=1),
            nn.ReLU(),
        )
    finally:
        torch.random.set_rng_state(generator_state)
    return model


# Head attribute per architecture: its weights may be absent from a state dict.
HEADS = {"resnet50": "fc", "mobilenet_v2": "classifier"}


def trunk_of(name: str, classifier: torch.nn.Module) -> torch.nn.Module:
    """The convolutional trunk of a built classifier: everything up to (and
    including the activation of) the last feature map, no pooling, no head.
    Global average pooling of it is exactly what the classifier computed."""
    from torch import nn

    if name == "resnet50":
        return nn.Sequential(*list(classifier.children())[:-2])  # up to layer4 (avgpool, fc dropped)
    if name == "mobilenet_v2":
        return classifier.features  # ends with ReLU6
    return classifier

register_model(
    CnnConfig(
        name="resnet50",
        description="torchvision ResNet-50, ImageNet (IMAGENET1K_V1), 2048-d",
        dim=2048,
        torchvision_weights="ResNet50_Weights.IMAGENET1K_V1",
        weights_file="resnet50-0676ba61.pth",
        weights_url="https://download.pytorch.org/models/resnet50-0676ba61.pth",
        tags=("default",),
    ),
    _resnet50,
)
register_model(
    CnnConfig(
        name="mobilenet_v2",
        description="torchvision MobileNetV2, ImageNet (IMAGENET1K_V1), 1280-d",
        dim=1280,
        torchvision_weights="MobileNet_V2_Weights.IMAGENET1K_V1",
        weights_file="mobilenet_v2-b0353104.pth",
        weights_url="https://download.pytorch.org/models/mobilenet_v2-b0353104.pth",
        tags=("offline-installable",),
    ),
    _mobilenet_v2,
)
register_model(
    CnnConfig(
        name="test_tiny",
        description="tiny random-weight CNN (seed 0), 256-d, 64 px input, stride 8: for tests only",
        dim=256,
        input_size=64,
        resize_size=72,
        tags=("test",),
        stride=8,
    ),
    _tiny_cnn,
)

