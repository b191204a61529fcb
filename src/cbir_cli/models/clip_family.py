"""The built-in ``clip`` model family: CLIP models through open_clip (the
``[clip]`` extra), an image tower that indexes like any model and a text tower
that embeds words into the same space (``cbir query --text``).

A model is ``clip:ARCH/TAG`` (``clip:ViT-B-32/laion2b_s34b_b79k``): open_clip's
architecture name and pretrained tag, weights through open_clip's own loader (its
Hugging Face hub download, or the cache it left). ``clip:ARCH`` with ``--weights
FILE`` loads a local checkpoint in open_clip's format instead. The table below
names the models ``cbir models`` lists without importing open_clip; any other
architecture open_clip knows works by name too (its config read from open_clip).
Nothing here imports torch or open_clip: :mod:`.clip_embedder` does, on load.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..errors import CbirError
from .clip_config import FAMILY, OPENAI_MEAN, OPENAI_STD, ClipConfig, clip_fingerprint
from .family import Weights, vector_problems
from .protocol import Embedder
from .quantize import Calibration
from .registry import DescriptorSettings


def _known(arch: str, tag: str, dim: int, description: str, size: int = 224,
           mean: tuple[float, float, float] = OPENAI_MEAN, std: tuple[float, float, float] = OPENAI_STD,
           interpolation: str = "bicubic") -> ClipConfig:
    return ClipConfig(name=f"{FAMILY}:{arch}/{tag}", description=description, dim=dim, input_size=size,
                      resize_size=size, mean=mean, std=std, interpolation=interpolation, has_text=True,
                      arch=arch, pretrained=tag)


# What open_clip 3.3's configs and pretrained table say of them (dim, input size, normalisation).
KNOWN_MODELS: dict[str, ClipConfig] = {c.name.partition(":")[2]: c for c in (
    _known("ViT-B-32", "laion2b_s34b_b79k", 512, "CLIP ViT-B/32 trained on LAION-2B (open_clip)"),
    _known("ViT-B-16", "laion2b_s34b_b88k", 512, "CLIP ViT-B/16 trained on LAION-2B (open_clip)"),
    _known("ViT-B-16", "openai", 512, "OpenAI's CLIP ViT-B/16"),
    _known("ViT-L-14", "laion2b_s32b_b82k", 768, "CLIP ViT-L/14 trained on LAION-2B (open_clip)",
           mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
    _known("MobileCLIP-S2", "datacompdr", 512, "Apple's MobileCLIP-S2 (small, fast on a CPU)", size=256,
           mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), interpolation="bilinear"),
)}


def split_clip_name(model: str) -> tuple[str, str | None]:
    """``"ViT-B-32/laion2b_s34b_b79k"`` -> ("ViT-B-32", "laion2b_s34b_b79k"); no tag -> None."""
    arch, sep, tag = model.partition("/")
    if not arch or (sep and not tag):
        raise CbirError(f"clip model {model!r}: expected clip:ARCH/PRETRAINED (e.g. clip:ViT-B-32/laion2b_s34b_b79k) "
                        "or clip:ARCH with --weights FILE")
    return arch, tag or None


def clip_config(model: str) -> ClipConfig:
    """The config of ``model`` (the name after ``clip:``): from the table, else from open_clip."""
    if model in KNOWN_MODELS:
        return KNOWN_MODELS[model]
    arch, tag = split_clip_name(model)
    from .clip_embedder import open_clip_config

    dim, size, mean, std, interpolation = open_clip_config(arch, tag)
    return ClipConfig(name=f"{FAMILY}:{model}", description=f"open_clip {arch}" + (f" ({tag})" if tag else ""),
                      dim=dim, input_size=size, resize_size=size, mean=mean, std=std, interpolation=interpolation,
                      has_text=True, arch=arch, pretrained=tag)


def clip_weights_id(config: ClipConfig, weights: Weights) -> str:
    """A local file by its content; else open_clip's pretrained tag."""
    if weights is not None:
        from pathlib import Path

        from ..errors import WeightsUnavailableError
        from ..fsutil import file_sha256

        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsUnavailableError(f"{path}: weights file does not exist")
        return f"file-sha256:{file_sha256(path)[:16]}"
    if config.pretrained is None:
        raise CbirError(f"model {config.name} names no pretrained tag: give its checkpoint with --weights FILE, "
                        f"or name one, e.g. clip:{config.arch}/TAG (open_clip.list_pretrained() lists them)")
    return f"open_clip:{config.arch}/{config.pretrained}"


class ClipFamily:
    """The :class:`~.family.ModelFamily` of open_clip's CLIP models."""

    name = FAMILY
    description = "CLIP image and text towers through open_clip (search by words: cbir query --text)"

    def model_names(self) -> Sequence[str]:
        return tuple(KNOWN_MODELS)

    def config(self, model: str) -> ClipConfig:
        return clip_config(model)

    def weights_status(self, model: str) -> str:
        import importlib.util

        return "download" if importlib.util.find_spec("open_clip") else "needs the [clip] extra"

    def load(self, model: str, weights: Weights, device: str, runtime: str,
             descriptor: DescriptorSettings | None, calibration: Calibration | None) -> Embedder:
        if calibration is not None:
            raise CbirError("the clip models have no int8 form yet; use fp32 precision")
        from .clip_embedder import load_clip_embedder
        from .loading import resolve_device, resolve_runtime

        config = clip_config(model)
        device = resolve_device(device)
        # auto: PyTorch (ONNX Runtime is not measured faster for these models yet).
        use_onnx = runtime == "onnx" and resolve_runtime(runtime, device, config) == "onnx"
        embedder = load_clip_embedder(config, weights, clip_weights_id(config, weights), "cpu" if use_onnx else device)
        if use_onnx:
            from .clip_onnx import clip_onnx_embedder

            return clip_onnx_embedder(embedder)
        return embedder

    def fingerprint(self, model: str, weights: Weights, descriptor: DescriptorSettings | None,
                    calibration: Calibration | None) -> dict[str, Any]:
        config = clip_config(model)
        return clip_fingerprint(config, clip_weights_id(config, weights))

    def fingerprint_problems(self, fp: dict[str, Any], weights_path: str | None, where: Any) -> list[str]:
        try:
            config = clip_config(str(fp.get("model")).partition(":")[2])
        except CbirError as exc:
            return [f"{where}: {exc.message}"]
        return vector_problems(fp, config, weights_path, where, lambda path: clip_weights_id(config, path))


CLIP_FAMILY = ClipFamily()
