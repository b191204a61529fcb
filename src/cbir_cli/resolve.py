"""Which index folder and which model: decided here, once, for every command.

(Where the model runs -- device and runtime -- is decided by
:func:`cbir_cli.models.loading.load_embedder`, which every command goes through.)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import CbirError
from .models.family import model_config
from .models.registry import CnnConfig, DescriptorSettings, get_model_config
from .models.weights import torch_hub_checkpoint_dir, weights_downloadable
from .paths import cache_root, default_index_dir

if TYPE_CHECKING:
    from .store.feature_store import FeatureStore

DEFAULT_MODEL = "resnet50"
FALLBACK_MODEL = "mobilenet_v2"
FALLBACK_NOTED = f"{FALLBACK_MODEL}-instead-of-{DEFAULT_MODEL}"  # marker: the fallback note was said


@dataclass(frozen=True)
class ModelSettings:
    """The model as asked for (None: decided by :func:`resolve_model` and
    :func:`resolve_descriptor`): a registered name, a weights file, a descriptor."""

    model: str | None = None
    weights: str | os.PathLike[str] | None = None
    descriptor: DescriptorSettings | None = None


def resolve_index_dir(index_dir: str | os.PathLike[str] | None) -> Path:
    """The index folder asked for, else ``$CBIR_INDEX``, else the per-user data dir."""
    return Path(index_dir).expanduser() if index_dir is not None else default_index_dir()


@dataclass(frozen=True)
class ModelChoice:
    """The model to embed with, its weights file (None: the official weights) and,
    when the choice is not the obvious one, a notice saying why."""

    name: str
    weights: str | os.PathLike[str] | None = None
    notice: str | None = None


def choose_default_model() -> ModelChoice:
    """The paper's ResNet-50 wherever its weights can be had (cached, or
    downloadable now: they are then downloaded when the model loads); on an
    offline machine where only MobileNetV2's weights are installed, MobileNetV2
    with a notice (never silently)."""
    resnet = get_model_config(DEFAULT_MODEL)
    fallback = get_model_config(FALLBACK_MODEL)
    checkpoints = torch_hub_checkpoint_dir()
    if (checkpoints / str(resnet.weights_file)).exists():
        return ModelChoice(DEFAULT_MODEL)
    if (checkpoints / str(fallback.weights_file)).exists() and not weights_downloadable(resnet):
        notice = (f"note: {DEFAULT_MODEL} weights are not installed ({checkpoints / str(resnet.weights_file)}) and "
                  f"cannot be downloaded now; using {FALLBACK_MODEL}, whose weights are (name {DEFAULT_MODEL} as "
                  "the model to require it; this note is shown once)")
        return ModelChoice(FALLBACK_MODEL, notice=notice if first_time(FALLBACK_NOTED) else None)
    return ModelChoice(DEFAULT_MODEL)


def first_time(marker: str) -> bool:
    """True the first time it is asked about ``marker`` (a file in the cache then
    remembers it), so a notice that holds for every run is said once, not on every
    new index or evaluation; True again wherever the cache cannot be written."""
    path = cache_root() / "notices" / marker
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "x"):
            pass
    except FileExistsError:
        return False
    except OSError:
        return True
    return True


def resolve_model(model: str | None, weights: str | os.PathLike[str] | None,
                  existing: FeatureStore | None = None) -> ModelChoice:
    """The model (and weights file) to embed with: the one named; else the one an
    ``existing`` store was built with (and its weights file); else the default."""
    if model is not None:
        return ModelChoice(model, weights)
    if existing is not None:
        return ModelChoice(str(existing.fingerprint["model"]), weights or existing.manifest.get("weights_path"))
    choice = choose_default_model()
    return ModelChoice(choice.name, weights, choice.notice)


def resolve_descriptor(requested: DescriptorSettings | None, model: str, existing: FeatureStore | None = None,
                       rebuild: bool = False) -> tuple[DescriptorSettings | None, str | None]:
    """The descriptor to embed with, and a notice when it is not the model's default.

    The one asked for; else, growing an ``existing`` store, the one its vectors were
    made with (a store made before descriptors were configurable records none: the
    legacy GAP / centre crop); else -- a new store, or a rebuild -- the model's default.
    None for a model that is no CNN (its family makes one vector per image its own way)."""
    config = model_config(model)
    if not isinstance(config, CnnConfig):
        if requested is not None:
            raise CbirError(f"--pooling, --input and --scales pool a CNN's feature map; {model} has none")
        return None, None
    default = config.descriptor
    if requested is not None:
        return requested, None
    if existing is not None and not rebuild and str(existing.fingerprint.get("model")) == model:
        current = DescriptorSettings.from_fingerprint(existing.fingerprint.get("descriptor"))
        if current != default:
            return current, (f"note: {existing.root} holds {current.label()} vectors, so new images get the same; "
                             f"rebuilding it moves it to the default, {default.label()}")
        return current, None
    return default, None
