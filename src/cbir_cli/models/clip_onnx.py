"""Both towers of a CLIP model on ONNX Runtime (``--runtime onnx``, the CPU).

The image tower is exported as uint8 pixels (n, 3, S, S) -> unit vectors (the
normalisation inside the graph, as for the CNNs), the text tower as open_clip's
token ids (n, context) -> unit vectors; the tokenizer stays open_clip's. Each
export is checked against PyTorch (cosine >= :data:`~.onnx_embedder.MIN_EXPORT_COSINE`
on random pixels and a few sentences; refused and deleted below it) and cached
beside the CNN exports, keyed by the config, the weights and torch's version. fp32
only: no int8 form has been measured for these models. ``auto`` keeps PyTorch for
them (no speed measured here for a real CLIP model).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CbirError
from ..fsutil import atomic_write_bytes
from .clip_config import ClipConfig
from .clip_embedder import ClipEmbedder
from .onnx_embedder import MIN_EXPORT_COSINE, OPSET, _default_threads, _session, onnx_cache_dir
from .protocol import EmbedderBase

if TYPE_CHECKING:
    import numpy as np
    import torch

# Bump when an exported graph changes, so old cache files are not reused.
EXPORT_VERSION = 1
CHECK_TEXTS = ("a photo of a dog", "a yellow flower at night", "x")


def clip_export_paths(config: ClipConfig, weights_id: str, cache_dir: Path | None = None) -> tuple[Path, Path]:
    """(image tower, text tower) files in the export cache."""
    from importlib.metadata import version

    ident = {"config": config.as_dict(), "weights": weights_id, "torch": version("torch"),
             "export": EXPORT_VERSION, "opset": OPSET}
    key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    stem = config.name.replace(":", "-").replace("/", "-")
    folder = cache_dir or onnx_cache_dir()
    return folder / f"{stem}-{key}-image.onnx", folder / f"{stem}-{key}-text.onnx"


def _towers(embedder: ClipEmbedder) -> tuple[torch.nn.Module, torch.nn.Module]:
    import torch

    model = embedder.model.to("cpu")

    class ImageTower(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.register_buffer("mean", embedder._mean.detach().cpu())
            self.register_buffer("std", embedder._std.detach().cpu())

        def forward(self, pixels: torch.Tensor) -> torch.Tensor:
            x = (pixels.float() / 255.0 - self.mean) / self.std
            return torch.nn.functional.normalize(self.model.encode_image(x), dim=-1)

    class TextTower(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.normalize(self.model.encode_text(tokens), dim=-1)

    return ImageTower().eval(), TextTower().eval()


def _export(module: torch.nn.Module, example: torch.Tensor, name: str, path: Path) -> None:
    """One tower to ``path`` (dynamic batch), written atomically."""
    import torch

    tmp = path.with_name(f".{path.name}.export-{os.getpid()}")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's legacy notice
            torch.onnx.export(module, (example,), str(tmp), input_names=[name], output_names=["embedding"],
                              dynamic_axes={name: {0: "batch"}, "embedding": {0: "batch"}},
                              opset_version=OPSET, dynamo=False)
        atomic_write_bytes(path, tmp.read_bytes())
    finally:
        tmp.unlink(missing_ok=True)


class ClipOnnxEmbedder(EmbedderBase):
    """A :class:`~.protocol.TextEmbedder` on two ONNX Runtime sessions: same inputs,
    outputs and fingerprint as the :class:`~.clip_embedder.ClipEmbedder` it came from."""

    device = "cpu"

    def __init__(self, reference: ClipEmbedder, image_path: Path, text_path: Path) -> None:
        self.config = reference.config
        self.weights_id = reference.weights_id
        self.tokenizer = reference.tokenizer
        self.preprocess = reference.preprocess
        self._fingerprint = reference.fingerprint()
        threads = _default_threads()
        self.image_session = _session(image_path, threads)
        self.text_session = _session(text_path, threads)

    def fingerprint(self) -> dict[str, Any]:
        return dict(self._fingerprint)

    def embed(self, batch: Any) -> np.ndarray:
        import numpy as np

        pixels = np.stack([np.asarray(b) for b in batch]) if not hasattr(batch, "shape") else np.asarray(batch)
        if len(pixels) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        (out,) = self.image_session.run(None, {"pixels": np.ascontiguousarray(pixels, dtype=np.uint8)})
        return out.astype(np.float32, copy=False)

    def embed_text(self, texts: Sequence[str]) -> np.ndarray:
        import numpy as np

        tokens = self.tokenizer(list(texts)).numpy().astype(np.int64)
        (out,) = self.text_session.run(None, {"tokens": tokens})
        return out.astype(np.float32, copy=False)

    def check_against(self, reference: ClipEmbedder, paths: Sequence[Path]) -> None:
        """Refuse (and delete) exports whose vectors differ from PyTorch's."""
        import numpy as np

        pixels = np.random.default_rng(0).integers(0, 256, (2, 3, self.config.input_size, self.config.input_size),
                                                   dtype=np.uint8)
        cosine = min(float((self.embed(pixels) * reference.embed(pixels)).sum(axis=1).min()),
                     float((self.embed_text(CHECK_TEXTS) * reference.embed_text(CHECK_TEXTS)).sum(axis=1).min()))
        if not cosine >= MIN_EXPORT_COSINE:
            for path in paths:
                path.unlink(missing_ok=True)
            raise CbirError(f"ONNX export of {self.name} disagrees with PyTorch (cosine {cosine:.4f}); "
                            "use --runtime torch")


def clip_onnx_embedder(reference: ClipEmbedder, cache_dir: Path | None = None) -> ClipOnnxEmbedder:
    """The ONNX form of ``reference`` (a CPU PyTorch embedder): exported and checked
    once, then read from the cache."""
    import torch

    image_path, text_path = clip_export_paths(reference.config, reference.weights_id, cache_dir)
    if image_path.is_file() and text_path.is_file():
        return ClipOnnxEmbedder(reference, image_path, text_path)
    image, text = _towers(reference)
    size = reference.config.input_size
    _export(image, torch.zeros((2, 3, size, size), dtype=torch.uint8), "pixels", image_path)
    _export(text, reference.tokenizer(list(CHECK_TEXTS[:2])), "tokens", text_path)
    embedder = ClipOnnxEmbedder(reference, image_path, text_path)
    embedder.check_against(reference, (image_path, text_path))
    return embedder

