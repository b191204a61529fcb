"""What produced an evaluation's figures, so that a number in ``--json`` or the report
can be reproduced or told apart: the tool and library versions, and per column the
model, weights, precision, runtime, descriptor and re-ranking settings."""

from __future__ import annotations

import platform
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .compare import Variant
    from .features import FeatureSource

# Distributions that may provide a library (the first one installed wins).
_LIBRARIES = {"onnxruntime": ("onnxruntime", "onnxruntime-gpu"), "faiss": ("faiss-cpu", "faiss-gpu", "faiss")}
# The fingerprint's keys worth showing (preprocessing is in the store's manifest).
_FINGERPRINT_KEYS = ("model", "weights", "dim", "descriptor")


def _installed(dists: tuple[str, ...]) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    for dist in dists:
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return None


def environment() -> dict[str, str | None]:
    """Versions of cbir-cli, Python and the libraries that compute and search the
    vectors (None: not installed), read from package metadata: nothing is imported."""
    from .. import __version__
    from ..store.manifest import library_versions

    versions: dict[str, str | None] = {"cbir-cli": __version__, "python": platform.python_version()}
    stored = library_versions()  # what the feature stores' manifests record too
    for name in ("numpy", "torch", "torchvision", "pillow"):
        versions[name] = stored.get(name)
    versions.update({name: _installed(dists) for name, dists in _LIBRARIES.items()})
    return versions


def column_settings(source: FeatureSource, variant: Variant) -> dict[str, Any]:
    """One column's model (or hand-crafted descriptor), weights, precision, runtime,
    descriptor and re-ranking, as JSON-ready values."""
    from .compare import NO_DBA

    settings: dict[str, Any] = {key: source.fingerprint.get(key) for key in _FINGERPRINT_KEYS
                                if key in source.fingerprint}
    settings.update(source.settings)
    settings["reranked"] = variant.reranked
    settings["rerank"] = asdict(variant.rerank) if variant.reranked else None
    dba = variant.dba if variant.reranked and variant.rerank.use_dba else NO_DBA
    settings["dba"] = asdict(dba) if dba.enabled else None
    return settings


def describe_environment(versions: dict[str, str | None]) -> str:
    """One line: ``cbir-cli 0.1.0, python 3.12.3, onnxruntime 1.32.0, ...``."""
    return ", ".join(f"{name} {version}" for name, version in versions.items() if version is not None)


def describe_settings(settings: dict[str, Any]) -> str:
    """One column's model, weights, precision, runtime and device in words."""
    keys = ("model", "weights", "weights_file", "precision", "runtime", "device")
    return ", ".join(f"{key} {settings[key]}" for key in keys if settings.get(key) is not None)
