"""Loading an open_clip model and running its two towers (imports torch and
open_clip; :mod:`.clip_family` imports this module only to load a model).

Weights come through open_clip's own loader: ``create_model(arch, pretrained=...)``
with the pretrained tag (its hub download, or the file its cache holds) or with a
local checkpoint file (``--weights``; open_clip's format: a state dict, optionally
under ``state_dict``, or a ``.safetensors`` file). With ``$CBIR_OFFLINE`` set
nothing is downloaded: the cached file is used when there is one, else one
paragraph names the file to fetch and how to pass it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

from ..errors import CbirError, WeightsUnavailableError
from .clip_config import OPENAI_MEAN, OPENAI_STD, ClipConfig, clip_fingerprint
from .family import Weights
from .preprocess import centre_crop_pixels
from .protocol import EmbedderBase
from .registry import OFFLINE_ENV

if TYPE_CHECKING:
    import numpy as np

# The file name open_clip fetches from a hub repository that names none.
HF_DEFAULT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def _open_clip() -> Any:
    try:
        import open_clip
    except ImportError:
        raise CbirError("the clip models need open_clip: pip install 'cbir-cli[clip]' "
                        "(or pip install open-clip-torch)") from None
    return open_clip


def open_clip_config(arch: str, tag: str | None) -> tuple[int, int, tuple, tuple, str]:
    """(dim, input size, mean, std, interpolation) of an architecture open_clip knows."""
    open_clip = _open_clip()
    config = open_clip.get_model_config(arch)
    if config is None:
        raise CbirError(f"open_clip knows no model {arch!r}; open_clip.list_models() lists them")
    pretrained = open_clip.get_pretrained_cfg(arch, tag) if tag else {}
    if tag and not pretrained:
        raise CbirError(f"open_clip has no pretrained tag {tag!r} for {arch}; choose one of: "
                        f"{', '.join(open_clip.list_pretrained_tags_by_model(arch)) or 'none (use --weights FILE)'}")
    image_size = config["vision_cfg"].get("image_size", 224)
    size = int(image_size if isinstance(image_size, int) else image_size[0])
    preprocess = {**config.get("preprocess_cfg", {}), **pretrained}
    return (int(config["embed_dim"]), size, tuple(preprocess.get("mean") or OPENAI_MEAN),
            tuple(preprocess.get("std") or OPENAI_STD), str(preprocess.get("interpolation") or "bicubic"))


def _hub_file(arch: str, tag: str) -> tuple[str, str]:
    """(repository, file) open_clip downloads ``arch``/``tag`` from."""
    hub = _open_clip().get_pretrained_cfg(arch, tag).get("hf_hub", "")
    repo, filename = os.path.split(hub)  # "org/name/" names no file: open_clip's default
    return repo, filename or HF_DEFAULT_FILES[1]


def _offline_message(config: ClipConfig, reason: str) -> str:
    repo, filename = _hub_file(config.arch, str(config.pretrained))
    source = f"the Hugging Face hub repository {repo} (file {filename}, or {HF_DEFAULT_FILES[0]} where it has one)" \
        if repo else "its URL in open_clip's pretrained table"
    return (f"no weights for model {config.name}: open_clip downloads them from {source} and {reason}. "
            f"Fetch that file on a machine with internet (e.g. `huggingface-cli download {repo or 'REPO'} "
            f"{filename}`), copy it here and pass it with --weights FILE and the model clip:{config.arch}; "
            "or run once online to fill the hub cache (HF_HOME sets its place)")


def _cached_hub_file(config: ClipConfig) -> str | None:
    """The file open_clip would load for ``config``'s tag, if the hub cache holds it."""
    repo, filename = _hub_file(config.arch, str(config.pretrained))
    if not repo:
        return None
    from huggingface_hub import try_to_load_from_cache

    for name in (HF_DEFAULT_FILES[0], filename) if filename == HF_DEFAULT_FILES[1] else (filename,):
        found = try_to_load_from_cache(repo, name)
        if isinstance(found, str):
            return found
    return None


def _create(config: ClipConfig, weights: Weights) -> Any:
    """open_clip's model with its weights, in eval mode on the CPU."""
    open_clip = _open_clip()
    if weights is not None:
        source = str(weights)
    else:
        assert config.pretrained is not None  # clip_weights_id refused a name without a tag
        cached = _cached_hub_file(config)
        if cached is None and os.environ.get(OFFLINE_ENV):
            raise WeightsUnavailableError(_offline_message(config, f"{OFFLINE_ENV} is set"))
        source = cached or config.pretrained
    try:
        model = open_clip.create_model(config.arch, pretrained=source)
    except (RuntimeError, KeyError, ValueError) as exc:
        if weights is not None:
            raise WeightsUnavailableError(f"{weights}: not an open_clip {config.arch} checkpoint "
                                          f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
        raise
    except OSError as exc:  # the hub download failed (offline, no such file)
        if weights is not None:
            raise WeightsUnavailableError(f"{weights}: cannot read ({exc})") from None
        raise WeightsUnavailableError(_offline_message(config, f"that failed ({type(exc).__name__})")) from None
    return model.eval()


def clip_pixels(img: Any, size: int, interpolation: str) -> np.ndarray:
    """open_clip's preprocessing (short side to ``size``, centre crop) as uint8 (3, size, size):
    module level, so decoding workers can run it."""
    return centre_crop_pixels(img.convert("RGB"), size, size, interpolation)


class ClipEmbedder(EmbedderBase):
    """A CLIP model's image tower (:meth:`embed`) and text tower (:meth:`embed_text`)."""

    def __init__(self, config: ClipConfig, model: Any, tokenizer: Any, weights_id: str, device: str) -> None:
        import torch

        self.config = config
        self.device = torch.device(device)
        self.on_cuda = self.device.type == "cuda"
        self.model = model.to(self.device)
        self.tokenizer = tokenizer
        self.weights_id = weights_id
        self.preprocess = partial(clip_pixels, size=config.input_size, interpolation=config.interpolation)
        self._mean = torch.tensor(config.mean, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(config.std, device=self.device).view(1, 3, 1, 1)

    def fingerprint(self) -> dict[str, Any]:
        return clip_fingerprint(self.config, self.weights_id)

    def embed(self, batch: Any) -> np.ndarray:
        import numpy as np
        import torch

        pixels = torch.as_tensor(np.stack([np.asarray(b) for b in batch]) if not hasattr(batch, "shape") else batch)
        with torch.inference_mode():
            x = (pixels.to(self.device).float() / 255.0 - self._mean) / self._std
            return self._unit(self.model.encode_image(x))

    def embed_text(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self._unit(self.model.encode_text(self.tokenizer(list(texts)).to(self.device)))

    @staticmethod
    def _unit(features: Any) -> np.ndarray:
        import torch

        return torch.nn.functional.normalize(features.float(), dim=-1).cpu().numpy().astype("float32")


def load_clip_embedder(config: ClipConfig, weights: Weights, weights_id: str, device: str) -> ClipEmbedder:
    model = _create(config, weights)
    tokenizer = _open_clip().get_tokenizer(config.arch)
    return ClipEmbedder(config, model, tokenizer, weights_id, device)
